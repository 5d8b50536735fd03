"""Build Llama-family decoders (Llama 2/3, Mistral, Qwen2) on Megatron-Core's ``GPTModel``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.language_module import language_module
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import _grad_accum_fusion_available
from megatron.core.tensor_parallel.random import HAVE_TE
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import UNEVEN_STAGE_FIELDS, ConfigError, LLMConfig, ParallelConfig, validate_layout
from .specs import decoder_spec, uses_transformer_engine

# Selective-recompute modules a layer spec cannot recompute, and why (config.RECOMPUTE_MODULES
# has those this decoder has at all).
_TE_FUSED_NORMS = (
    "the TE spec fuses both norms into the following linear, so there is no norm output to drop; "
    "use core_attn or mlp"
)
_NORMS_NEED_TE = (
    "Megatron-Core 0.16 recomputes norms through CheckpointWithoutOutput, which reads Transformer "
    "Engine's FP8 state even without FP8, so it needs Transformer Engine installed; use core_attn "
    "or mlp"
)
_ACT_NEEDS_GROUPED_GEMM = (
    "Megatron-Core recomputes the experts' activation only inside Transformer Engine's grouped "
    "GEMM experts; use moe"
)
NOT_RECOMPUTABLE = {
    "transformer_engine": {"layernorm": _TE_FUSED_NORMS},
    "local": {"moe_act": _ACT_NEEDS_GROUPED_GEMM}
    | ({} if HAVE_TE else {"layernorm": _NORMS_NEED_TE}),
}


def recompute_settings(llm: LLMConfig, te: bool) -> dict:
    """``TransformerConfig``'s recompute fields for ``llm.recompute``: full recomputes each
    layer from its input; selective the ``llm.recompute_modules`` the layer spec can."""
    if llm.recompute == "full":
        return dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    if llm.recompute != "selective":
        return {}
    spec = "transformer_engine" if te else "local"
    for module in llm.recompute_modules:
        why = NOT_RECOMPUTABLE[spec].get(module)
        if why:
            raise ConfigError(
                f"llm.recompute_modules: {module!r} with the {spec} layer spec: {why}"
            )
    return dict(recompute_granularity="selective", recompute_modules=list(llm.recompute_modules))


def kernel_settings(te: bool, interleaved: bool) -> dict:
    """``TransformerConfig``'s fused kernels and pipeline memory: each on where what it needs is
    here (a CUDA device; Transformer Engine or apex), off elsewhere. The unfused paths compute
    the same thing."""
    on_gpu = torch.cuda.is_available()
    return dict(
        apply_rope_fusion=te,
        bias_activation_fusion=te,
        bias_dropout_fusion=on_gpu,  # a torch.jit kernel for CUDA
        masked_softmax_fusion=te,
        persist_layer_norm=False,
        # Weight gradients added to DDP's fp32 main_grad inside the GEMM (no bf16 .grad, no
        # extra add). TE's linears can; GPTModel's output layer is always Megatron's own, which
        # needs apex's fused_weight_gradient_mlp_cuda (Megatron refuses the setting without it).
        # A backward pass then needs Megatron's DDP around the model (it makes main_grad).
        gradient_accumulation_fusion=on_gpu and _grad_accum_fusion_available,
        # The vocab-parallel cross entropy in one fused kernel: TE's with the TE spec (when
        # this TE has it), else Megatron's own (torch.compile'd, built for CUDA here).
        cross_entropy_loss_fusion=on_gpu,
        cross_entropy_fusion_impl=(
            "te" if te and language_module.te_parallel_cross_entropy is not None else "native"
        ),
        # A pipeline stage's output keeps only its autograd graph once sent (its data freed).
        # On the CPU only where sends complete before that: gloo reads an in-flight send's
        # memory, which freeing it would hand back (overlap_p2p_comm, below, sends async).
        deallocate_pipeline_outputs=on_gpu or not interleaved,
    )


def _router_gemm_without_te() -> None:
    """Megatron-Core 0.16's router reads ``moe_utils.te_general_gemm``, which that module
    defines only when Transformer Engine imports; None is its own 'no TE' value (torch's
    matmul), so give it that where TE is absent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_settings(llm: LLMConfig, parallel: ParallelConfig, te: bool) -> dict:
    """``TransformerConfig``'s MoE fields: every layer's MLP a router over
    ``llm.num_moe_experts`` experts, spread over ``parallel.expert_model_parallel_size`` ranks.
    The router is Qwen3-MoE's and Mixtral's (softmax, top k, renormalised) or, with
    ``moe_router_norm_topk=false``, the softmax over all experts read at the top k (Qwen2-MoE);
    its logits in fp32. Experts run as one grouped GEMM with Transformer Engine, one after the
    other (SequentialMLP) without it: the same checkpoint keys either way."""
    if not llm.is_moe:
        return {}
    _router_gemm_without_te()
    return dict(
        num_moe_experts=llm.num_moe_experts,
        moe_ffn_hidden_size=llm.expert_ffn_hidden_size,
        moe_router_topk=llm.moe_router_topk,
        moe_router_pre_softmax=not llm.moe_router_norm_topk,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=llm.moe_aux_loss_coeff,
        moe_token_dispatcher_type=llm.moe_token_dispatcher,
        moe_grouped_gemm=te,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


def transformer_config(
    llm: LLMConfig, parallel: ParallelConfig, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``llm`` split as ``parallel``."""
    te = uses_transformer_engine(llm)
    on_gpu = torch.cuda.is_available()
    interleaved = parallel.virtual_pipeline_model_parallel_size is not None
    fp8 = {}
    if llm.fp8:
        fp8 = dict(
            fp8=llm.fp8,
            fp8_recipe=llm.fp8_recipe,
            fp8_amax_history_len=llm.fp8_amax_history_len,
            fp8_amax_compute_algo=llm.fp8_amax_compute_algo,
        )
    recompute = recompute_settings(llm, te)
    # Uneven stages; with one stage every layer is there (Megatron would build only these).
    uneven = {name: getattr(parallel, name) for name in UNEVEN_STAGE_FIELDS}
    uneven = uneven if parallel.pipeline_model_parallel_size > 1 else {}
    return TransformerConfig(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.ffn_hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        kv_channels=llm.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=llm.qkv_bias,
        qk_layernorm=llm.qk_layernorm,
        attention_dropout=llm.attention_dropout,
        hidden_dropout=llm.hidden_dropout,
        init_method_std=llm.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        **kernel_settings(te, interleaved),
        # Loss is a sum over answer tokens; finalize_model_grads divides by the global token
        # count (micro-batches and DP ranks hold different numbers of answer tokens). DDP reads
        # this at construction to skip its 1/DP gradient scaling.
        calculate_per_token_loss=True,
        # Interleaving: unbatched p2p with overlap, as Megatron-LM does. Batched ops to the same
        # peer (PP=2, where prev == next) are matched in posting order, swapping activations
        # and gradients; the unbatched path keeps the two directions on different groups.
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        **moe_settings(llm, parallel, te),
        **fp8,
        **recompute,
        **uneven,
    )


def build_llm(
    llm: LLMConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    vp_stage: int | None = None,
    scatter_embedding_sequence_parallel: bool = True,
    parallel_output: bool = True,
) -> GPTModel:
    """One model chunk: the layers of this pipeline rank (and virtual stage ``vp_stage``).

    Needs :func:`salm_megatron.parallel.initialize` first. Speech models pass
    ``scatter_embedding_sequence_parallel=False`` and scatter after merging audio embeddings.
    """
    validate_layout(llm, parallel)
    config = transformer_config(llm, parallel, params_dtype)
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(llm, config, vp_stage),
        vocab_size=llm.padded_vocab_size,
        max_sequence_length=llm.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=llm.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(llm.rotary_base),
        rope_scaling=llm.rope_scaling_factor is not None,
        rope_scaling_factor=llm.rope_scaling_factor or 8.0,
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        vp_stage=vp_stage,
    )


def build_llm_chunks(llm: LLMConfig, parallel: ParallelConfig, **kwargs) -> list[GPTModel]:
    """All model chunks of this rank: one, or one per virtual pipeline stage (interleaving)."""
    if parallel.virtual_pipeline_model_parallel_size is None:
        return [build_llm(llm, parallel, **kwargs)]
    return [
        build_llm(llm, parallel, vp_stage=stage, **kwargs)
        for stage in range(parallel.num_model_chunks)
    ]


def vocab_parallel_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each label is the argmax of logits split over TP ranks by vocabulary.

    ``logits [..., v / tp]`` (this rank's slice), ``labels [...]`` (global ids): a hit is a label
    logit no smaller than the largest logit anywhere, found with two small all-reduces instead
    of gathering the vocabulary. Compared in the logits' own dtype (widening is exact), so no
    fp32 copy of the logits is made.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    rank, width = parallel_state.get_tensor_model_parallel_rank(), logits.shape[-1]
    largest = logits.max(dim=-1).values.float()
    local = labels - rank * width
    mine = (local >= 0) & (local < width)
    label_logit = logits.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1).float()
    label_logit = torch.where(mine, label_logit, torch.zeros_like(label_logit))
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(label_logit, group=group)
    return label_logit >= largest
