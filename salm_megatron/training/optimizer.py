"""Megatron-Core DDP, the (distributed) Adam optimizer with per-part learning rates, the LR
schedule, and an optimizer step that skips non-finite gradients instead of applying them."""

from __future__ import annotations

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

from ..config import Config, ConfigError
from ..models.audio_split import reduce_replicated_grads


def wrap_ddp(cfg: Config, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    """Megatron DDP around every model chunk. Frozen parameters get no gradient buffer."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.optim.distributed,
        overlap_grad_reduce=False,
    )
    for chunk in chunks:
        chunk.config.finalize_model_grads_func = finalize_grads(cfg)
    return [
        DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]


def finalize_grads(cfg: Config):
    """Megatron's ``finalize_model_grads``, after making one over TP the gradients of the parts
    outside the LLM that TP ranks replicate (summed where each rank trained from its own share of
    the segments, ``parallel.split_audio_over_tp``; averaged otherwise)."""
    if cfg.parallel.tensor_model_parallel_size == 1:
        return finalize_model_grads
    split = cfg.parallel.split_audio_over_tp

    def finalize(model, *args, **kwargs):
        reduce_replicated_grads(model, split)
        return finalize_model_grads(model, *args, **kwargs)

    return finalize


@torch.no_grad()
def average_batchnorm_statistics(cfg: Config, chunks: list[torch.nn.Module]) -> None:
    """Average BatchNorm running statistics (the encoder's) over the ranks that see different
    audio: data-parallel ranks, and TP ranks when they split the segments.

    Megatron's DDP reduces gradients only; buffers would drift apart. Averaged after every step
    they stay equal, so every rank evaluates alike and a checkpoint (which stores one copy) holds
    the whole state. Frozen parts (in eval mode) are left out: their statistics do not change, and
    averaging would round them anew every step.
    """
    if cfg.parallel.split_audio_over_tp and cfg.parallel.tensor_model_parallel_size > 1:
        group = parallel_state.get_tensor_and_data_parallel_group()
    else:
        group = parallel_state.get_data_parallel_group()
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
