"""Transformer layer specs: Transformer Engine's on GPUs that have it, a local one elsewhere.

The local spec uses Megatron-Core's own tensor-parallel linears with :class:`SDPAttention` and our
sequence-parallel-aware :class:`Norm`. Its checkpoint keys are mapped onto the TE spec's (whose
norms are fused into the following linear), so a checkpoint written by either loads into the other.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ..config import LLMConfig
from .attention import SDPAttention
from .norms import Norm


@functools.cache
def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a CUDA device is present."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install behaves as no TE
        return False
    return True


def uses_transformer_engine(llm: LLMConfig) -> bool:
    """Resolve ``llm.transformer_impl`` ('auto' picks TE when available)."""
    if llm.transformer_impl == "local":
        return False
    available = transformer_engine_available()
    if llm.transformer_impl == "transformer_engine" and not available:
        raise RuntimeError(
            "llm.transformer_impl='transformer_engine' but Transformer Engine with CUDA is not "
            "available here; install the 'gpu' extra on a CUDA machine or use 'local'"
        )
    if llm.fp8 and not available:
        raise RuntimeError(f"llm.fp8={llm.fp8!r} needs Transformer Engine with CUDA")
    return available


def local_mlp_spec(llm: LLMConfig) -> ModuleSpec:
    """SwiGLU MLP, or an MoE layer whose experts are such MLPs run one after the other."""
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if not llm.is_moe:
        return ModuleSpec(module=MLP, submodules=linears)
    experts = ModuleSpec(module=SequentialMLP, submodules=linears)
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts))


def local_layer_spec(llm: LLMConfig) -> ModuleSpec:
    """Llama-style pre-norm layer from Megatron-Core modules, SDPA attention and our norm
    (Qwen3: also over each head's query and key; MoE: experts in place of the MLP)."""
    qk_norm = Norm if llm.qk_layernorm else IdentityOp
    # Checkpoint names of the TE spec, where a dense MLP's norm lives inside its first linear.
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if not llm.is_moe:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=local_mlp_spec(llm),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def transformer_engine_layer_spec(llm: LLMConfig) -> ModuleSpec:
    """Megatron-Core's TE layer spec (fused norm+linear, TE attention, FP8 capable; MoE experts
    as one grouped GEMM)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=llm.num_moe_experts,
        moe_grouped_gemm=llm.is_moe,
        qk_layernorm=llm.qk_layernorm,
    )


def decoder_spec(
    llm: LLMConfig, config: TransformerConfig, vp_stage: int | None = None
) -> ModuleSpec:
    """Spec of this pipeline chunk's decoder: its layers and, last, the final norm."""
    if uses_transformer_engine(llm):
        return transformer_engine_layer_spec(llm)  # Megatron adds TE's final norm itself
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[local_layer_spec(llm)] * layers, layer_norm=Norm
        ),
    )
