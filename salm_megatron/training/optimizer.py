"""Megatron-Core DDP, the (distributed) Adam optimizer with per-part learning rates, the LR
schedule, and an optimizer step that skips non-finite gradients instead of applying them."""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    ParamKey,
    ParamPredicate,
    clip_grads,
    get_megatron_optimizer,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.moe_layer import MoELayer

from ..config import Config, ConfigError
from ..models.audio_split import reduce_replicated_grads


def ddp_config(cfg: Config) -> DistributedDataParallelConfig:
    """Megatron DDP's settings for ``cfg.optim``.

    Gradients are reduced in fp32 (bf16 training needs no loss scaling). ``average_in_collective``
    stays off: the loss is a sum over answer tokens that ``finalize_model_grads`` divides by the
    global token count (``calculate_per_token_loss``), which Megatron requires it for. NaN/inf
    checks before the reduction stay off too: :func:`optimizer_step` skips such steps instead.
    """
    optim = cfg.optim
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=optim.distributed,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        # As Megatron-LM: only the distributed optimizer gathers parameters, and only an
        # overlapped gradient reduction leaves the all-gather for the next forward pass.
        overlap_param_gather=optim.overlap_param_gather
        and optim.distributed
        and optim.overlap_grad_reduce,
        bucket_size=optim.bucket_size,  # None: Megatron's default (used only when overlapping)
    )


class SpeechDDP(DistributedDataParallel):
    """Megatron's DDP around one model chunk, whose gradient sync also makes the gradients of the
    parts TP ranks replicate (:func:`reduce_replicated_grads`) one over the TP group.

    ``finalize_model_grads`` calls :meth:`finish_grad_sync` once per chunk. The chunk's
    data-parallel reduce(-scatter) is complete only when the parent's returns (with
    ``overlap_grad_reduce`` it runs during the backward pass, reading ``main_grad``), so the TP
    reduction follows it; a sum or mean over TP commutes with the sum over DP.
    """

    def __init__(self, *args, split_audio: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_audio = split_audio

    def finish_grad_sync(self, *args, **kwargs):
        if self.ddp_config.overlap_grad_reduce:
            self._register_unused_parameters()
        super().finish_grad_sync(*args, **kwargs)
        reduce_replicated_grads([self], self.split_audio)

    def _register_unused_parameters(self) -> None:
        """Mark ready the parameters the last micro-batch gave no gradient (a CTC head without
        transcripts; the audio path of a TP rank without segments), as a zero one.

        An overlapped bucket is reduced once every parameter in it has reported its gradient;
        one that never reports would keep its bucket from being reduced (Megatron fails then),
        or, missing from the first step, from being counted. Nothing is added to ``main_grad``.
        """
        for group in self.bucket_groups + self.expert_parallel_bucket_groups:
            for param in group.params - group.per_param_grad_ready_counts.keys():
                group.register_grad_ready(param, self.force_all_reduce)


def mark_experts_apart(chunk: torch.nn.Module) -> None:
    """MoE experts' parameters as Megatron marks them under expert parallelism
    (``allreduce=False``), also at EP=1.

    Megatron-Core marks them so only at EP > 1; they then get DDP buffers reduced over the
    expert data-parallel group and an optimizer of their own, chained after the dense one. At
    EP=1 they would join the dense buffers and optimizer, and a checkpoint's optimizer state would
    have another structure (one optimizer instead of two, other param groups), which does not
    load across EP. Marked always, every EP has the same structure, and ``fully_reshardable``
    optimizer state reshards between EP sizes like the model. At EP=1 the expert data-parallel
    group is the data-parallel one (the same sums), or with a smaller expert TP than TP it also
    holds the TP ranks that each run a whole expert on their share of the sequence."""
    for module in chunk.modules():
        if isinstance(module, MoELayer):
            for param in module.experts.parameters():
                param.allreduce = False


def wrap_ddp(cfg: Config, chunks: list[torch.nn.Module]) -> list[SpeechDDP]:
    """Megatron DDP around every model chunk. Frozen parameters get no gradient buffer.

    Buckets as Megatron-LM makes them (the chunks after the first, and the pipeline stages after
    the first, in one bucket each); with ``optim.overlap_grad_reduce`` the schedule holds the
    reductions back until each chunk's last micro-batch (``no_sync_func``).
    """
    config = ddp_config(cfg)
    split = cfg.parallel.split_audio_over_tp
    for chunk in chunks:
        mark_experts_apart(chunk)
    model = [
        SpeechDDP(
            config=chunk.config,
            ddp_config=config,
            module=chunk,
            disable_bucketing=i > 0,
            split_audio=split,
        )
        for i, chunk in enumerate(chunks)
    ]
    for chunk in chunks:  # the schedule reads the first chunk's config; each is set alike
        chunk.config.finalize_model_grads_func = finalize_model_grads
        if config.overlap_grad_reduce:
            no_sync = [c.no_sync for c in model]
            chunk.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return model


@contextlib.contextmanager
def whole_parameters(model: list[DistributedDataParallel]):
    """Every parameter complete on every rank inside the block (checkpoints, validation).

    With ``overlap_param_gather`` each rank holds only its shard of the updated parameters after
    an optimizer step; the rest arrive by all-gather in the forward pre-hooks of the next pass.
    Megatron-LM disables the hooks around saving and evaluation (gathering all first), then
    enables them again; so does this.
    """
    hooked = [chunk for chunk in model if chunk.use_forward_hook]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


@torch.no_grad()
def average_batchnorm_statistics(cfg: Config, chunks: list[torch.nn.Module]) -> None:
    """Average BatchNorm running statistics (the encoder's) over the ranks that see different
    audio: data-parallel ranks, CP ranks (which split the segments), and TP ranks when they
    split them too.

    Megatron's DDP reduces gradients only; buffers would drift apart. Averaged after every step
    they stay equal, so every rank evaluates alike and a checkpoint (which stores one copy) holds
    the whole state. Frozen parts (in eval mode) are left out: their statistics do not change, and
    averaging would round them anew every step.
    """
    if cfg.parallel.split_audio_over_tp and cfg.parallel.tensor_model_parallel_size > 1:
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    else:
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return
    stats = [
        buffer
        for chunk in chunks
        for module in chunk.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.training  # a frozen encoder's statistics stay as loaded (and equal)
        for buffer in (module.running_mean, module.running_var)
    ]
    if not stats:
        return
    flat = torch.cat([b.float().flatten() for b in stats])
    torch.distributed.all_reduce(flat, group=group)
    flat /= size
    for buffer, value in zip(stats, flat.split([b.numel() for b in stats]), strict=True):
        buffer.copy_(value.view_as(buffer))


def param_group_overrides(cfg: Config) -> dict:
    """No weight decay on norms and biases (1-D parameters); the encoder's and the adapter's own
    peak LR, each with the minimum LR scaled alike."""
    optim = cfg.optim
    one_dimensional = ParamPredicate(name="one_dimensional", fn=lambda p: p.dim() == 1)
    overrides = {ParamKey(name="*.bias", predicate=one_dimensional): {"wd_mult": 0.0}}
    parts = {
        "encoder": (optim.encoder_lr, ("*audio.encoder.*", "*ctc.*")),
        "adapter": (optim.adapter_lr, ("*audio.adapter.*", "*cross_attention.*")),
    }
    for lr, names in parts.values():
        if lr is not None and lr != optim.lr:
            min_lr = optim.min_lr * lr / optim.lr if optim.lr else 0.0
            overrides[ParamKey(name=names)] = {"max_lr": lr, "min_lr": min_lr}
    return overrides


def build_optimizer(
    cfg: Config, model: list[DistributedDataParallel], params_dtype: torch.dtype
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """Adam (decoupled weight decay) over the trainable parameters, and its LR schedule."""
    optim = cfg.optim
    if not any(p.requires_grad for chunk in model for p in chunk.parameters()):
        raise ConfigError("nothing to train: model.freeze_llm/encoder/adapter freeze every part")
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=optim.distributed,
    )
    optimizer = get_megatron_optimizer(config, model, config_overrides=param_group_overrides(cfg))
    decay_steps = optim.decay_steps or max(1, cfg.train.steps - optim.warmup_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=optim.warmup_steps + decay_steps,
        lr_decay_style=optim.schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=optim.warmup_steps + decay_steps,
        wd_incr_style="constant",
        # On resume the config's schedule applies (raise train.steps to train longer).
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def current_lr(optimizer: MegatronOptimizer) -> float:
    """The LR of the parameter groups on the default schedule (the LLM's)."""
    groups = optimizer.param_groups
    default = [g for g in groups if g.get("default_config", True)] or groups
    return float(default[0]["lr"])


@torch.no_grad()
def optimizer_step(optimizer: MegatronOptimizer, clip_grad: float) -> tuple[bool, float]:
    """Clip and apply the gradients, unless their global norm is NaN/inf (then nothing changes).

    Megatron's own ``step`` would apply non-finite fp32/bf16 gradients (only fp16 loss scaling
    checks them); the norm here is the same global all-reduced value on every rank, so every
    rank skips together. Returns (applied, grad norm).
    """
    if optimizer.prepare_grads():  # a loss scaler found inf
        return False, math.inf
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    if clip_grad > 0:
        for part in optimizer.chained_optimizers:
            params = part.get_parameters()
            if params:
                clip_grads.clip_grad_by_total_norm_fp32(  # looked up late: cpu_compat wraps it
                    params,
                    clip_grad,
                    grad_norm,
                    use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
    return optimizer.step_with_ready_grads(), grad_norm
