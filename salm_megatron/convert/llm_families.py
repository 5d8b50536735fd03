"""The Hugging Face LLM families we convert, as a table, and their ``config.json`` <-> LLMConfig.

A family is what its ``config.json`` names (``architectures`` and ``model_type``) and what its
layers carry beyond a Llama layer: biases on q/k/v (Qwen2), an RMSNorm over each head's query and
key (Qwen3), a mixture-of-experts MLP (Qwen3-MoE). Settings a family may have that our decoder
does not (sliding windows, other activations, dense layers between sparse ones) are errors that
name the field, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..config import ConfigError, LLMConfig
from .hf_io import ConversionError

HF_CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # the Hugging Face class
    model_type: str
    name: str  # for messages
    qkv_bias: bool = False
    qk_norm: bool = False
    moe: bool = False
    # config.json fields that must hold these values (what our decoder computes).
    fixed: tuple[tuple[str, Any], ...] = ()


_NO_LINEAR_BIAS = (("attention_bias", False), ("mlp_bias", False))
_FULL_ATTENTION = (("use_sliding_window", False),)
FAMILIES = (
    Family("LlamaForCausalLM", "llama", "Llama", fixed=_NO_LINEAR_BIAS),
    # Mistral 7B v0.2 and later have sliding_window=null.
    Family("MistralForCausalLM", "mistral", "Mistral", fixed=(("sliding_window", None),)),
    Family("Qwen2ForCausalLM", "qwen2", "Qwen2", qkv_bias=True, fixed=_FULL_ATTENTION),
    Family(
        "Qwen3ForCausalLM",
        "qwen3",
        "Qwen3",
        qk_norm=True,
        fixed=_FULL_ATTENTION + (("attention_bias", False),),
    ),
    Family(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        "Qwen3-MoE",
        qk_norm=True,
        moe=True,
        # Every layer sparse: no dense MLP layers in between.
        fixed=_FULL_ATTENTION
        + (("attention_bias", False), ("decoder_sparse_step", 1), ("mlp_only_layers", [])),
    ),
)
ARCHITECTURES = {family.architecture: family for family in FAMILIES}
# Megatron-Core's Llama-3 rope scaling has these fixed; only the factor is configurable.
LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Defaults of fields some config.json files leave out (transformers' own defaults).
_DEFAULTS = {"attention_bias": False, "mlp_bias": False, "use_sliding_window": False}


def family_of(llm: LLMConfig) -> Family:
    """The family whose layers are ``llm``'s (for configs written without a source one)."""
    layers = (llm.qkv_bias, llm.qk_layernorm, llm.is_moe)
    for family in FAMILIES:  # Llama before Mistral, whose layers are Llama's
        if (family.qkv_bias, family.qk_norm, family.moe) == layers:
            return family
    raise ConversionError(
        f"no Hugging Face family has layers with llm.qkv_bias={llm.qkv_bias}, "
        f"llm.qk_layernorm={llm.qk_layernorm} and MoE={llm.is_moe}; supported: "
        + ", ".join(family.name for family in FAMILIES)
    )


def llm_config_from_hf(hf: dict, source: str = HF_CONFIG_FILE) -> LLMConfig:
    """Our LLMConfig for a Hugging Face ``config.json``; unsupported settings are errors."""

    def fail(message: str):
        raise ConversionError(f"{source}: {message}")

    def need(key: str):
        if hf.get(key) is None:
            fail(f"has no {key}")
        return hf[key]

    architectures = hf.get("architectures") or []
    family = ARCHITECTURES.get(architectures[0]) if len(architectures) == 1 else None
    if family is None or hf.get("model_type") != family.model_type:
        fail(
            f"architectures={architectures} model_type={hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(f'{f.architecture} ({f.model_type})' for f in FAMILIES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    for key, value in family.fixed:
        found = hf.get(key, _DEFAULTS.get(key))
        if found != value:
            fail(
                f"{key}={found!r} is not supported for {family.name} (only {value!r}: attention "
                "here is full causal, linears have no bias, every MoE layer is sparse)"
            )
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim")
    theta, factor = _rope(hf, fail)
    try:
        return LLMConfig(
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=head_dim if head_dim is not None and head_dim * heads != hidden else None,
            vocab_size=need("vocab_size"),
            max_position_embeddings=need("max_position_embeddings"),
            rotary_base=theta,
            rope_scaling_factor=factor,
            norm_epsilon=float(need("rms_norm_eps")),
            qkv_bias=family.qkv_bias,
            qk_layernorm=family.qk_norm,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **(_moe_fields(hf, need) if family.moe else {}),
        )
    except ConfigError as err:
        fail(f"gives an invalid LLM config: {err}")


def _moe_fields(hf: dict, need: Callable[[str], Any]) -> dict:
    """Qwen3-MoE's router and experts (transformers 5 names the count num_local_experts)."""
    experts = hf.get("num_experts") or need("num_local_experts")
    return dict(
        num_moe_experts=experts,
        moe_router_topk=need("num_experts_per_tok"),
        moe_ffn_hidden_size=need("moe_intermediate_size"),
        moe_router_norm_topk=bool(hf.get("norm_topk_prob", False)),
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def _rope(hf: dict, fail: Callable[[str], None]) -> tuple[float, float | None]:
    """(rotary base, Llama-3 scaling factor or None) from transformers 5's ``rope_parameters``
    or the older ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if theta != int(theta):
        fail(f"rope_theta={theta} is not an integer (Megatron-Core takes an integer base)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        fail(f"rope scaling type {kind!r} is not supported (default, llama3)")
    for key, value in LLAMA3_ROPE_FIXED.items():
        if params.get(key) != value:
            fail(
                f"rope scaling {key}={params.get(key)!r} is not supported: Megatron-Core's "
                f"llama3 scaling fixes it at {value}"
            )
    return theta, float(params["factor"])


def hf_config_from_llm(llm: LLMConfig, dtype: torch.dtype) -> dict:
    """A ``config.json`` of the family with ``llm``'s layers, for checkpoints that carry none."""
    family = family_of(llm)
    rope_scaling = None
    if llm.rope_scaling_factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": llm.rope_scaling_factor}
        rope_scaling.update(LLAMA3_ROPE_FIXED)
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_query_groups,
        "head_dim": llm.head_dim,
        "vocab_size": llm.vocab_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "rms_norm_eps": llm.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": llm.tie_embeddings,
        "rope_theta": llm.rotary_base,
        "rope_scaling": rope_scaling,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    config.update(dict(family.fixed))
    if llm.is_moe:
        config.update(
            num_experts=llm.num_moe_experts,
            num_experts_per_tok=llm.moe_router_topk,
            moe_intermediate_size=llm.expert_ffn_hidden_size,
            norm_topk_prob=llm.moe_router_norm_topk,
            router_aux_loss_coef=llm.moe_aux_loss_coeff,
        )
    return config


# The llm.* fields a conversion writes into llm.yaml and compares with a config.json.
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "qkv_bias", "qk_layernorm", "tie_embeddings", "num_moe_experts",
    "moe_router_topk", "moe_ffn_hidden_size",
)  # fmt: skip
NUMERIC_FIELDS = (
    "make_vocab_size_divisible_by", "max_position_embeddings", "rotary_base",
    "rope_scaling_factor", "norm_epsilon", "moe_router_norm_topk", "moe_aux_loss_coeff",
)  # fmt: skip
