"""Configuration: validated dataclasses, presets by name, YAML/JSON and ``key.sub=value`` overrides.

Every field is checked when a config is built or changed through :func:`apply_overrides`, and every
error names the field and the value. Parallel layouts that cannot work are rejected here, before any
process group exists (:meth:`Config.validate_world`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config field has a value that cannot work; the message names the field and value."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value: int) -> None:
    _require(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer")


# --------------------------------------------------------------------------------------------- LLM

FP8_FORMATS = (None, "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
RECOMPUTE = ("none", "selective", "full")
# Megatron-Core's selective-recompute modules (TransformerConfig.recompute_modules) and, for those
# this decoder has nothing for, why. The layer spec decides the rest (llm/model.py).
RECOMPUTE_MODULES = {
    "core_attn": None,  # softmax(QK^T)V: large with unfused attention, little with flash / TE
    "mlp": None,  # the whole MLP (dense layers)
    "layernorm": None,  # both norms, outputs dropped until backward (local spec only)
    "moe": None,  # the whole MoE layer: router, dispatch, experts (MoE layers)
    "moe_act": None,  # the experts' activation (MoE layers, grouped GEMM: TE spec only)
    "shared_experts": "needs shared experts",
    "mla_up_proj": "needs multi-latent attention",
}
MOE_ONLY_RECOMPUTE = ("moe", "moe_act")
MOE_DISPATCHERS = ("alltoall", "allgather")


@dataclass
class LLMConfig:
    """Shape and numerics of a Llama-family decoder (RMSNorm, SwiGLU, RoPE, GQA), optionally with
    Qwen3's per-head query/key norm and mixture-of-experts MLPs."""

    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2  # key/value heads (GQA); equal to num_attention_heads for MHA
    vocab_size: int = 256  # the tokenizer's size; the embedding is padded (see padded_vocab_size)
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # Llama-3.1 style scaling (8 for 3.1, 32 for 3.2)
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False  # Qwen2
    # Qwen3: RMSNorm over each head's query and key before RoPE (Megatron's qk_layernorm).
    qk_layernorm: bool = False
    # Width of one attention head; null: hidden_size / num_attention_heads (Qwen3 sets 128).
    kv_channels: Optional[int] = None
    tie_embeddings: bool = False
    # Mixture of experts (Megatron-Core's MoELayer in every layer): null for a dense MLP.
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2  # experts each token goes to
    moe_ffn_hidden_size: Optional[int] = None  # one expert's FFN width; null: ffn_hidden_size
    # Top-k weights renormalised to sum to 1 (Qwen3-MoE's norm_topk_prob, Mixtral); false: the
    # softmax over all experts, read at the top k (Qwen2-MoE).
    moe_router_norm_topk: bool = True
    # Load-balancing loss weight (Switch-style, per layer; each answer token carries its
    # micro-batch's, like its cross entropy: llm/moe.py)
    moe_aux_loss_coeff: float = 0.001
    moe_token_dispatcher: str = "alltoall"  # how tokens reach experts on other EP ranks
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = 0.02
    transformer_impl: str = "auto"  # auto: Transformer Engine when TE and CUDA are present
    fp8: Optional[str] = None  # None | "hybrid" | "e4m3" (Transformer Engine only)
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # Activation recompute: selective recomputes recompute_modules, full every layer's input.
    recompute: str = "none"
    # With recompute: selective, what to recompute (see RECOMPUTE_MODULES); Megatron's default.
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])

    def __post_init__(self):
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
            "make_vocab_size_divisible_by",
            "max_position_embeddings",
            "fp8_amax_history_len",
        ):
            _positive(f"llm.{name}", getattr(self, name))
        _optional_positive("llm.kv_channels", self.kv_channels)
        _require(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            f"llm.hidden_size={self.hidden_size} is not divisible by "
            f"llm.num_attention_heads={self.num_attention_heads} (set llm.kv_channels for a "
            "head width of its own)",
        )
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"llm.num_attention_heads={self.num_attention_heads} is not divisible by "
            f"llm.num_query_groups={self.num_query_groups}",
        )
        _require(self.rotary_base > 0, f"llm.rotary_base={self.rotary_base} must be positive")
        _require(
            self.rope_scaling_factor is None or self.rope_scaling_factor >= 1,
            f"llm.rope_scaling_factor={self.rope_scaling_factor} must be null or >= 1",
        )
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"llm.{name}={value} must be in [0, 1)")
        _choice("llm.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        _choice("llm.fp8", self.fp8, FP8_FORMATS)
        _choice("llm.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _choice("llm.fp8_amax_compute_algo", self.fp8_amax_compute_algo, ("max", "most_recent"))
        _choice("llm.recompute", self.recompute, RECOMPUTE)
        self._check_recompute_modules()
        self._check_moe()
        _require(
            self.fp8 is None or self.transformer_impl != "local",
            f"llm.fp8={self.fp8!r} needs Transformer Engine, but llm.transformer_impl='local'",
        )

    def _check_recompute_modules(self) -> None:
        modules = self.recompute_modules
        allowed = [module for module in RECOMPUTE_MODULES if self._cannot_recompute(module) is None]
        _require(
            isinstance(modules, (list, tuple))
            and len(modules) > 0
            and all(isinstance(m, str) for m in modules)
            and len(set(modules)) == len(modules),
            f"llm.recompute_modules={modules!r} must be a list of distinct names, some of "
            f"{', '.join(allowed)}",
        )
        for module in modules:
            _choice("llm.recompute_modules entry", module, tuple(RECOMPUTE_MODULES))
            why = self._cannot_recompute(module)
            _require(
                why is None,
                f"llm.recompute_modules: {module!r} {why}, which this decoder does not have; "
                f"use some of {', '.join(allowed)}",
            )
        self.recompute_modules = list(modules)

    def _cannot_recompute(self, module: str) -> Optional[str]:
        """Why this decoder has nothing for selective-recompute ``module`` (None: it has)."""
        if module in MOE_ONLY_RECOMPUTE and not self.is_moe:
            return "needs MoE layers"
        if module == "mlp" and self.is_moe:
            return "needs dense MLP layers (the MoE layer's is 'moe')"
        return RECOMPUTE_MODULES[module]

    def _check_moe(self) -> None:
        _optional_positive("llm.num_moe_experts", self.num_moe_experts)
        _optional_positive("llm.moe_ffn_hidden_size", self.moe_ffn_hidden_size)
        _positive("llm.moe_router_topk", self.moe_router_topk)
        _choice("llm.moe_token_dispatcher", self.moe_token_dispatcher, MOE_DISPATCHERS)
        _require(
            self.moe_aux_loss_coeff >= 0,
            f"llm.moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0",
        )
        experts = self.num_moe_experts
        _require(
            experts is None or self.moe_router_topk <= experts,
            f"llm.moe_router_topk={self.moe_router_topk} is more than "
            f"llm.num_moe_experts={experts}",
        )
        _require(
            experts is None or self.moe_router_topk > 1 or not self.moe_router_norm_topk,
            "llm.moe_router_topk=1 with llm.moe_router_norm_topk=true gives every token the "
            "weight 1 (and the router no gradient); set moe_router_norm_topk=false",
        )

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: the vocabulary rounded up to ``make_vocab_size_divisible_by``.

        Unlike Megatron-LM this does not depend on the TP size, so one checkpoint loads at any TP
        (the layout check requires TP to divide it).
        """
        step = self.make_vocab_size_divisible_by
        return math.ceil(self.vocab_size / step) * step

    def num_parameters(self, padded_vocab: bool = False) -> int:
        """Parameter count of the decoder (for memory arithmetic and checking presets)."""
        h, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attention += 2 * self.head_dim if self.qk_layernorm else 0
        if self.is_moe:
            mlp = self.num_moe_experts * (3 * h * self.expert_ffn_hidden_size + h)  # + router
        else:
            mlp = 3 * h * f
        norms = 2 * h
        vocab = self.padded_vocab_size if padded_vocab else self.vocab_size
        embeddings = vocab * h * (1 if self.tie_embeddings else 2)
        return layers * (attention + mlp + norms) + h + embeddings

    def num_active_parameters(self) -> int:
        """Parameters one token goes through: with MoE, ``moe_router_topk`` experts per layer."""
        if not self.is_moe:
            return self.num_parameters()
        idle = self.num_moe_experts - self.moe_router_topk
        return self.num_parameters() - self.num_layers * idle * 3 * self.hidden_size * (
            self.expert_ffn_hidden_size
        )


# What every Qwen3 shares: per-head query/key norms, heads of 128, its vocabulary and rope base.
_QWEN3 = dict(
    kv_channels=128,
    qk_layernorm=True,
    vocab_size=151936,
    max_position_embeddings=40960,
    rotary_base=1000000.0,
    norm_epsilon=1e-6,
)
LLM_PRESETS: dict[str, dict[str, Any]] = {
    # Test size: GQA, two query groups so TP=2 splits them.
    "tiny": dict(),
    "llama3.2-1b": dict(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rotary_base=500000.0,
        rope_scaling_factor=32.0,
        tie_embeddings=True,
    ),
    "llama3-8b": dict(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rotary_base=500000.0,
    ),
    "llama3-70b": dict(
        num_layers=80,
        hidden_size=8192,
        ffn_hidden_size=28672,
        num_attention_heads=64,
        num_query_groups=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rotary_base=500000.0,
    ),
    "qwen2.5-7b": dict(
        num_layers=28,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_attention_heads=28,
        num_query_groups=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rotary_base=1000000.0,
        norm_epsilon=1e-6,
        qkv_bias=True,
    ),
    "qwen3-1.7b": dict(
        num_layers=28,
        hidden_size=2048,
        ffn_hidden_size=6144,
        num_attention_heads=16,
        num_query_groups=8,
        **_QWEN3,
        tie_embeddings=True,
    ),
    "qwen3-8b": dict(
        num_layers=36,
        hidden_size=4096,
        ffn_hidden_size=12288,
        num_attention_heads=32,
        num_query_groups=8,
        **_QWEN3,
    ),
    # 128 experts of FFN 768 in every layer, 8 per token (3.3B of 30.5B parameters active).
    "qwen3-30b-a3b": dict(
        num_layers=48,
        hidden_size=2048,
        ffn_hidden_size=6144,
        num_attention_heads=32,
        num_query_groups=4,
        **_QWEN3,
        num_moe_experts=128,
        moe_router_topk=8,
        moe_ffn_hidden_size=768,
    ),
    # Test size of a Qwen3-MoE: query/key norms, heads wider than hidden/heads, 4 experts, top 2.
    "tiny-moe": dict(
        kv_channels=32,
        qk_layernorm=True,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=48,
    ),
}


def llm_preset(name: str, **overrides: Any) -> LLMConfig:
    """The LLM shape called ``name`` (see ``LLM_PRESETS``) with some fields replaced."""
    _choice("llm preset", name, tuple(LLM_PRESETS))
    return LLMConfig(**{**LLM_PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------- parallel


UNEVEN_STAGE_FIELDS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallelism is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per pipeline rank
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    # MoE: the experts spread over this many ranks, carved from the data-parallel (x context-
    # parallel) ranks as Megatron does: attention stays data-parallel, tokens travel to their
    # experts' ranks (all-to-all).
    expert_model_parallel_size: int = 1
    # Each expert's linears split over this many ranks; null: tensor_model_parallel_size.
    expert_tensor_parallel_size: Optional[int] = None
    # The first stage's TP ranks encode different audio segments and gather the embeddings,
    # instead of each encoding all of them (see models/audio_split.py).
    split_audio_over_tp: bool = True
    # Uneven pipeline (Megatron's): LLM layers on the first stage, which also runs the audio path,
    # and on the last, which also runs the output layer and loss; the other stages share the rest
    # evenly (see pipeline_stage_layers). None: an even split. With one stage they do not apply.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            _positive(f"parallel.{name}", getattr(self, name))
        _optional_positive("parallel.expert_tensor_parallel_size", self.expert_tensor_parallel_size)
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _positive("parallel.virtual_pipeline_model_parallel_size", vpp)
            _require(
                self.pipeline_model_parallel_size > 1,
                f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                f"parallel.pipeline_model_parallel_size > 1 (it is "
                f"{self.pipeline_model_parallel_size})",
            )
        self._check_uneven_stages()
        _require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1",
        )

    def _check_uneven_stages(self) -> None:
        vpp = self.virtual_pipeline_model_parallel_size
        uneven = {name: getattr(self, name) for name in UNEVEN_STAGE_FIELDS}
        uneven = {name: value for name, value in uneven.items() if value is not None}
        for name, value in uneven.items():
            _positive(f"parallel.{name}", value)
            _require(
                vpp is None or value % vpp == 0,
                f"parallel.{name}={value} is not divisible by "
                f"parallel.virtual_pipeline_model_parallel_size={vpp} (each model chunk of a "
                "stage holds as many layers)",
            )
        # Megatron-Core 0.16 computes the layer offsets of interleaved stages through the middle
        # stages, and divides by their number (ZeroDivisionError when there is none).
        _require(
            not (len(uneven) == 2 and vpp is not None and self.pipeline_model_parallel_size == 2),
            "parallel.num_layers_in_first_pipeline_stage and num_layers_in_last_pipeline_stage "
            f"cannot both be set with parallel.virtual_pipeline_model_parallel_size={vpp} at "
            "parallel.pipeline_model_parallel_size=2 (Megatron-Core needs a stage between them); "
            "set one, and the other stage holds the remaining layers",
        )

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    @property
    def num_model_chunks(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def validate_world(self, world_size: int) -> None:
        """Check that ``world_size`` processes can hold this layout (before any group exists)."""
        mp = self.model_parallel_size
        _require(
            world_size % mp == 0,
            f"world size {world_size} is not divisible by tensor x pipeline x context parallel = "
            f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
            f"{self.context_parallel_size} = {mp}",
        )
        ep, etp, pp = (
            self.expert_model_parallel_size,
            self.expert_tensor_size,
            self.pipeline_model_parallel_size,
        )
        stage_ranks = world_size // pp
        _require(
            stage_ranks % (ep * etp) == 0,
            f"parallel.expert_model_parallel_size={ep} x expert tensor parallel {etp} = "
            f"{ep * etp} does not divide the {stage_ranks} ranks of a pipeline stage (world size "
            f"{world_size} / parallel.pipeline_model_parallel_size={pp}): experts are spread "
            "over the data-parallel x context x tensor parallel ranks",
        )


def pipeline_stage_layers(llm: LLMConfig, parallel: ParallelConfig) -> list[int]:
    """LLM layers on each pipeline rank, split as Megatron-Core splits them: the first and last
    ranks hold ``parallel.num_layers_in_first/last_pipeline_stage`` where set, the other ranks
    share the remaining layers evenly. A ConfigError names the numbers where they cannot."""
    pp, layers = parallel.pipeline_model_parallel_size, llm.num_layers
    ends = {name: getattr(parallel, name) for name in UNEVEN_STAGE_FIELDS} if pp > 1 else {}
    ends = {name: n for name, n in ends.items() if n is not None}
    others, rest = pp - len(ends), layers - sum(ends.values())
    if not ends:
        _require(
            layers % pp == 0,
            f"llm.num_layers={layers} is not divisible by "
            f"parallel.pipeline_model_parallel_size={pp}",
        )
    _require(
        rest >= 0 and (rest > 0) == (others > 0) and (others == 0 or rest % others == 0),
        f"llm.num_layers={layers} less "
        + " and ".join(f"parallel.{name}={n}" for name, n in ends.items())
        + f" leaves {rest} layers for the {others} other stages of "
        f"parallel.pipeline_model_parallel_size={pp}: they must share them evenly, at least one "
        "each (or none when there is no other stage)",
    )
    first, last = (ends.get(name) for name in UNEVEN_STAGE_FIELDS)
    middle = [rest // others] * others if others else []
    return [first] * (first is not None) + middle + [last] * (last is not None)


def validate_layout(llm: LLMConfig, parallel: ParallelConfig) -> None:
    """Reject model/parallel combinations that cannot be split, naming the numbers."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    chunks = parallel.num_model_chunks
    _validate_experts(llm, parallel)
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "padded_vocab_size"):
        value = getattr(llm, name)
        _require(
            value % tp == 0,
            f"llm.{name}={value} is not divisible by parallel.tensor_model_parallel_size={tp}",
        )
    if pp == 1 or all(getattr(parallel, name) is None for name in UNEVEN_STAGE_FIELDS):
        _require(
            llm.num_layers % (pp * chunks) == 0,
            f"llm.num_layers={llm.num_layers} is not divisible by pipeline_model_parallel_size "
            f"x virtual_pipeline_model_parallel_size = {pp} x {chunks} = {pp * chunks}",
        )
    stages = pipeline_stage_layers(llm, parallel)
    for n in stages:
        _require(
            n % chunks == 0,
            f"llm.num_layers={llm.num_layers} split over the pipeline stages as "
            f"{' + '.join(map(str, stages))} puts {n} layers on a stage, not divisible by "
            f"parallel.virtual_pipeline_model_parallel_size={chunks} (each model chunk of a "
            "stage holds as many layers)",
        )


def _validate_experts(llm: LLMConfig, parallel: ParallelConfig) -> None:
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_size
    if not llm.is_moe:
        _require(
            ep == 1,
            f"parallel.expert_model_parallel_size={ep} needs MoE layers (llm.num_moe_experts "
            "is null)",
        )
        return
    _require(
        llm.num_moe_experts % ep == 0,
        f"llm.num_moe_experts={llm.num_moe_experts} is not divisible by "
        f"parallel.expert_model_parallel_size={ep} (each EP rank holds as many experts)",
    )
    _require(
        llm.expert_ffn_hidden_size % etp == 0,
        f"llm.moe_ffn_hidden_size={llm.expert_ffn_hidden_size} is not divisible by the expert "
        f"tensor parallel size {etp}",
    )


# ------------------------------------------------------------------------------------------- audio

NORMALIZE_TYPES = (None, "per_feature")
CONV_NORM_TYPES = ("batch_norm", "layer_norm")
ENCODER_TYPES = ("fastconformer", "whisper")
ADAPTER_TYPES = ("linear", "mlp", "conformer", "pool_linear")


def _fraction(name: str, value: float) -> None:
    _require(0 <= value < 1, f"{name}={value} must be in [0, 1)")


@dataclass
class FeatureConfig:
    """Log-mel features as NeMo computes them: pretrained encoders expect exactly these."""

    sample_rate: int = 16000  # Hz; audio is resampled to this (mono) before the features
    n_mels: int = 80
    window_size: float = 0.025  # seconds (400 samples at 16 kHz)
    window_stride: float = 0.01  # seconds (160 samples): 100 frames per second
    n_fft: int = 512
    preemph: Optional[float] = 0.97  # null: no pre-emphasis
    log_zero_guard: float = 2**-24  # added to the mel energies before the log
    normalize: Optional[str] = "per_feature"  # per utterance and mel bin, over valid frames
    dither: float = 0.0  # std of Gaussian noise added in training only (NeMo trains with 1e-5)
    # Whisper's front end only: features as Whisper's feature extractor gives them for audio
    # padded with silence to 30 s (Qwen2-Audio's processor): ceil(samples / hop) frames, the
    # dynamic range from every frame the audio reaches, and the encoder's convolutions seeing the
    # log-mel of silence past each utterance instead of zeros. false: the utterance alone.
    silence_padding: bool = False

    def __post_init__(self):
        for name in ("sample_rate", "n_mels", "n_fft"):
            _positive(f"encoder.features.{name}", getattr(self, name))
        for name in ("window_size", "window_stride", "log_zero_guard"):
            value = getattr(self, name)
            _require(value > 0, f"encoder.features.{name}={value} must be positive")
        _require(
            self.hop_length >= 1,
            f"encoder.features.window_stride={self.window_stride} is under one sample at "
            f"{self.sample_rate} Hz",
        )
        _require(
            1 <= self.win_length <= self.n_fft,
            f"encoder.features.window_size={self.window_size} is {self.win_length} samples at "
            f"{self.sample_rate} Hz; it must be 1 .. n_fft={self.n_fft}",
        )
        if self.preemph is not None:
            _fraction("encoder.features.preemph", self.preemph)
        _choice("encoder.features.normalize", self.normalize, NORMALIZE_TYPES)
        _require(self.dither >= 0, f"encoder.features.dither={self.dither} must be >= 0")
        _require(
            isinstance(self.silence_padding, bool),
            f"encoder.features.silence_padding={self.silence_padding!r} must be true or false",
        )

    @property
    def win_length(self) -> int:
        return round(self.window_size * self.sample_rate)

    @property
    def hop_length(self) -> int:
        return round(self.window_stride * self.sample_rate)


@dataclass
class SpecAugmentConfig:
    """SpecAugment (training only). NeMo's FastConformer recipe; 0 masks switch a kind off."""

    freq_masks: int = 2
    freq_width: int = 27  # widest frequency mask, in mel bins
    time_masks: int = 10
    time_width: float = 0.05  # widest time mask: below 1 a fraction of the utterance, else frames

    def __post_init__(self):
        for name in ("freq_masks", "freq_width", "time_masks"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 0,
                f"encoder.spec_augment.{name}={value!r} must be an integer >= 0",
            )
        _require(
            0 <= self.time_width < 1 or float(self.time_width).is_integer(),
            f"encoder.spec_augment.time_width={self.time_width} must be a fraction in [0, 1) "
            "or a whole number of frames",
        )


@dataclass
class EncoderConfig:
    """FastConformer: NeMo's ConformerEncoder with dw_striding subsampling and rel_pos attention.

    ``type: whisper`` is Whisper's encoder instead (two convolutions, the second of stride 2,
    sinusoidal positions, pre-LN transformer layers) behind Whisper's log-mel front end (see
    ``audio/whisper.py``). It reads d_model, num_layers, num_heads, ff_expansion_factor, dropout,
    dropout_att, max_source_positions, recompute_layers and features (sample_rate, n_mels, n_fft,
    window_size, window_stride, dither); the convolution-module and subsampling-channel fields do
    not apply.

    The defaults are the ``tiny`` test size; ``encoder_preset`` gives NVIDIA's sizes.
    """

    type: str = "fastconformer"  # fastconformer | whisper
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"
    subsampling_factor: int = 8  # a power of 2: one stride-2 conv stage per factor of 2
    subsampling_conv_channels: int = 32
    att_context_size: list[int] = field(default_factory=lambda: [-1, -1])  # [left, right]; -1: all
    xscaling: bool = True  # multiply the subsampled frames by sqrt(d_model)
    use_bias: bool = True  # biases in the conformer layers' linears and convolutions
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1
    # whisper: rows of the position table; inputs up to twice as many feature frames (30 s).
    max_source_positions: int = 1500
    # Activation recompute: the first N layers keep only their inputs in training and run again
    # in backward (audio/recompute.py). 0: off; num_layers: every layer.
    recompute_layers: int = 0
    # whisper: the final LayerNorm; false leaves it out (Qwen2-Audio pools before it, so its
    # ``pool_linear`` adapter holds that norm).
    final_norm: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)

    def __post_init__(self):
        for name in (
            "d_model",
            "num_layers",
            "num_heads",
            "ff_expansion_factor",
            "conv_kernel_size",
            "subsampling_factor",
            "subsampling_conv_channels",
        ):
            _positive(f"encoder.{name}", getattr(self, name))
        _require(
            self.d_model % self.num_heads == 0,
            f"encoder.d_model={self.d_model} is not divisible by "
            f"encoder.num_heads={self.num_heads}",
        )
        _require(
            self.conv_kernel_size % 2 == 1,
            f"encoder.conv_kernel_size={self.conv_kernel_size} must be odd",
        )
        factor = self.subsampling_factor
        _require(
            factor >= 2 and factor & (factor - 1) == 0,
            f"encoder.subsampling_factor={factor} must be a power of 2 (2, 4, 8, ...)",
        )
        _choice("encoder.conv_norm_type", self.conv_norm_type, CONV_NORM_TYPES)
        context = self.att_context_size
        _require(
            isinstance(context, (list, tuple))
            and len(context) == 2
            and all(isinstance(c, int) and c >= -1 for c in context),
            f"encoder.att_context_size={context!r} must be [left, right], each -1 or >= 0",
        )
        self.att_context_size = list(context)
        for name in ("dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att"):
            _fraction(f"encoder.{name}", getattr(self, name))
        _choice("encoder.type", self.type, ENCODER_TYPES)
        _positive("encoder.max_source_positions", self.max_source_positions)
        _require(
            isinstance(self.recompute_layers, int)
            and 0 <= self.recompute_layers <= self.num_layers,
            f"encoder.recompute_layers={self.recompute_layers!r} must be an integer from 0 (off) "
            f"to encoder.num_layers={self.num_layers} (every layer)",
        )
        _require(
            isinstance(self.final_norm, bool),
            f"encoder.final_norm={self.final_norm!r} must be true or false",
        )
        if self.type == "whisper":
            self._check_whisper()
        else:
            where = f"applies to encoder.type='whisper', not {self.type!r}"
            _require(self.final_norm, f"encoder.final_norm=false {where}")
            _require(
                not self.features.silence_padding, f"encoder.features.silence_padding=true {where}"
            )

    def _check_whisper(self) -> None:
        """Whisper's layout fixes what the FastConformer fields leave open."""
        where = "with encoder.type='whisper'"
        _require(
            self.subsampling_factor == 2,
            f"encoder.subsampling_factor={self.subsampling_factor} must be 2 {where} "
            "(its second convolution halves the frame rate: 50 frames per second)",
        )
        _require(
            self.att_context_size == [-1, -1],
            f"encoder.att_context_size={self.att_context_size} must be [-1, -1] {where}",
        )
        _require(self.use_bias, f"encoder.use_bias=false is not supported {where}")
        _require(
            self.d_model % 2 == 0 and self.d_model >= 4,
            f"encoder.d_model={self.d_model} must be even and >= 4 {where} (sines, cosines)",
        )
        for name in ("preemph", "normalize"):
            value = getattr(self.features, name)
            _require(
                value is None,
                f"encoder.features.{name}={value!r} must be null {where} (its front end has "
                "no pre-emphasis and its own fixed scaling)",
            )

    @property
    def subsampling_stages(self) -> int:
        return self.subsampling_factor.bit_length() - 1

    def num_parameters(self) -> int:
        """Trainable parameters (BatchNorm running statistics excluded), as NeMo counts them."""
        if self.type == "whisper":  # the position table is a buffer, not counted
            d, f = self.d_model, self.d_model * self.ff_expansion_factor
            convolutions = self.features.n_mels * d * 3 + d + d * d * 3 + d
            layer = 4 * d * d + 3 * d + (d * f + f + f * d + d) + 2 * 2 * d  # k_proj: no bias
            return convolutions + self.num_layers * layer + (2 * d if self.final_norm else 0)
        d, c, k = self.d_model, self.subsampling_conv_channels, self.conv_kernel_size
        f = d * self.ff_expansion_factor
        freq = self.features.n_mels
        for _ in range(self.subsampling_stages):
            freq = (freq - 1) // 2 + 1
        subsampling = (
            (9 * c + c)
            + (self.subsampling_stages - 1) * ((9 * c + c) + (c * c + c))
            + (c * freq * d + d)
        )
        bias = 1 if self.use_bias else 0
        feed_forward = d * f + f * d + bias * (f + d)
        attention = 5 * d * d + bias * 4 * d + 2 * d  # q, k, v, out, pos; pos_bias_u, pos_bias_v
        convolution = 2 * d * d + d * k + d * d + bias * (2 * d + d + d) + 2 * d  # + its norm
        norms = 5 * 2 * d
        layer = 2 * feed_forward + attention + convolution + norms
        return subsampling + self.num_layers * layer


# Whisper's front end: 25 ms periodic-Hann windows every 10 ms, no pre-emphasis, its own scaling.
_WHISPER_FEATURES = dict(
    n_fft=400, window_size=0.025, window_stride=0.01, preemph=None, normalize=None
)
_WHISPER = dict(type="whisper", subsampling_factor=2, dropout=0.0, dropout_att=0.0)
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # Test size.
    "tiny": dict(),
    # NVIDIA's FastConformer sizes (NeMo's fast-conformer configs; 256 subsampling channels).
    "fastconformer-large": dict(
        d_model=512, num_layers=17, num_heads=8, subsampling_conv_channels=256, xscaling=True
    ),
    # The 24-layer XL encoders behind Canary-1B and Parakeet-TDT-0.6B-v2 take 128 mel bins;
    # NeMo's recipe table turns xscaling off at this size.
    "fastconformer-xl": dict(
        d_model=1024,
        num_layers=24,
        num_heads=8,
        subsampling_conv_channels=256,
        xscaling=False,
        features=dict(n_mels=128),
    ),
    # Test size, Whisper layout.
    "tiny-whisper": dict(**_WHISPER, features=dict(_WHISPER_FEATURES)),
    # OpenAI's Whisper encoders (the audio half of openai/whisper-small and -large-v3).
    "whisper-small": dict(
        **_WHISPER, d_model=768, num_layers=12, num_heads=12, features=dict(_WHISPER_FEATURES)
    ),
    "whisper-large-v3": dict(
        **_WHISPER,
        d_model=1280,
        num_layers=32,
        num_heads=20,
        features=dict(_WHISPER_FEATURES, n_mels=128),
    ),
}


def encoder_preset(name: str, **overrides: Any) -> EncoderConfig:
    """The encoder shape called ``name`` (see ``ENCODER_PRESETS``) with some fields replaced."""
    _choice("encoder preset", name, tuple(ENCODER_PRESETS))
    return _build(EncoderConfig, {**ENCODER_PRESETS[name], **overrides}, "encoder.")


@dataclass
class AdapterConfig:
    """Modality adapter: encoder frames [b, t, d_in] to LLM embeddings [b, t', d_out]."""

    type: str = "mlp"  # linear | mlp | conformer | pool_linear
    # linear, mlp: k consecutive frames concatenated; pool_linear: k frames averaged (a last
    # incomplete group dropped, as Qwen2-Audio's pooling does). Divides the frame rate by k.
    stack: int = 1
    hidden_size: Optional[int] = None  # mlp: hidden width (null: d_out); conformer: width (d_in)
    num_layers: int = 2  # conformer layers
    num_heads: int = 8  # conformer attention heads
    conv_kernel_size: int = 9  # conformer convolution module
    extra_subsampling: bool = False  # conformer: stack 2 frames first, halving the frame rate
    dropout: float = 0.0

    def __post_init__(self):
        _choice("adapter.type", self.type, ADAPTER_TYPES)
        for name in ("stack", "num_layers", "num_heads", "conv_kernel_size"):
            _positive(f"adapter.{name}", getattr(self, name))
        if self.hidden_size is not None:
            _positive("adapter.hidden_size", self.hidden_size)
        _require(
            self.conv_kernel_size % 2 == 1,
            f"adapter.conv_kernel_size={self.conv_kernel_size} must be odd",
        )
        _fraction("adapter.dropout", self.dropout)
        if self.type == "conformer":
            _require(
                self.stack == 1,
                f"adapter.stack={self.stack} applies to linear and mlp adapters; "
                "the conformer adapter subsamples with adapter.extra_subsampling=true",
            )
        else:
            _require(
                not self.extra_subsampling,
                f"adapter.extra_subsampling=true applies to the conformer adapter, not "
                f"adapter.type={self.type!r}; use adapter.stack=k",
            )

    @property
    def subsampling_factor(self) -> int:
        """Encoder frames per adapter output frame."""
        if self.type == "conformer":
            return 2 if self.extra_subsampling else 1
        return self.stack


# ------------------------------------------------------------------------------------------ model

ARCHS = ("salm", "bestow")


@dataclass
class BestowConfig:
    """BESTOW's cross-attention block before the LLM (first pipeline stage, replicated over TP)."""

    num_layers: int = 2
    num_heads: int = 8
    ffn_hidden_size: Optional[int] = None  # null: 4 x the LLM's hidden size
    dropout: float = 0.0

    def __post_init__(self):
        _positive("bestow.num_layers", self.num_layers)
        _positive("bestow.num_heads", self.num_heads)
        if self.ffn_hidden_size is not None:
            _positive("bestow.ffn_hidden_size", self.ffn_hidden_size)
        _fraction("bestow.dropout", self.dropout)


@dataclass
class ModelConfig:
    """How the parts (``llm``, ``encoder``, ``adapter``, ``bestow``) join, and what trains."""

    arch: str = "salm"  # salm: audio spliced into the prompt; bestow: cross-attention first
    # SALM's audio placeholder token; null: the tokenizer's (its <|audio|> token, else its last
    # reserved token, else the first id after its vocabulary; see data/tokenizers.py). Training
    # fills it in, so checkpoints record it; a value given must be the tokenizer's.
    audio_token_id: Optional[int] = None
    freeze_llm: bool = False
    freeze_encoder: bool = False
    freeze_adapter: bool = False
    # Auxiliary CTC loss on the encoder's output (a linear head over llm.vocab_size + blank),
    # against each audio segment's transcript, added with this weight. Gives an encoder trained
    # from scratch a direct signal; 0 turns it off.
    ctc_weight: float = 0.0
    # The CTC head's own vocabulary: a tokenizer (SentencePiece model or HF folder, e.g. the
    # encoder's 1024 tokens) that transcripts are tokenized with for CTC. null: the LLM's, whose
    # 128k-token logits take about 1 GB in fp32 per 4 x 40 s of audio. Training sets
    # ctc_vocab_size from it (a value given must be the tokenizer's).
    ctc_tokenizer: Optional[str] = None
    ctc_vocab_size: Optional[int] = None

    def __post_init__(self):
        _choice("model.arch", self.arch, ARCHS)
        _require(self.ctc_weight >= 0, f"model.ctc_weight={self.ctc_weight} must be >= 0")
        if self.ctc_vocab_size is not None:
            _require(
                self.ctc_vocab_size >= 1,
                f"model.ctc_vocab_size={self.ctc_vocab_size} must be >= 1 (or null)",
            )
        if self.audio_token_id is not None:
            _require(
                self.audio_token_id >= 0,
                f"model.audio_token_id={self.audio_token_id} must be >= 0",
            )


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the LLM's linears (``models/lora.py``): each target computes
    ``W x + alpha / rank * B A dropout(x)``, split over TP like ``W``. With
    ``model.freeze_llm`` only the adapters of the LLM train."""

    rank: int = 0  # 0: no adapters
    alpha: float = 32.0
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self):
        _require(
            isinstance(self.rank, int) and self.rank >= 0,
            f"lora.rank={self.rank!r} must be an integer >= 0 (0: off)",
        )
        _require(self.alpha > 0, f"lora.alpha={self.alpha} must be > 0")
        _fraction("lora.dropout", self.dropout)
        _require(
            isinstance(self.targets, list) and len(self.targets) > 0,
            f"lora.targets={self.targets!r} must be a non-empty list of "
            f"{', '.join(map(repr, LORA_TARGETS))}",
        )
        for target in self.targets:
            _choice("lora.targets", target, LORA_TARGETS)
        _require(
            len(set(self.targets)) == len(self.targets),
            f"lora.targets={self.targets!r} names a linear twice",
        )


# ------------------------------------------------------------------------------------ training

# data/prompts.py builds each; "chat" renders the tokenizer's own chat template (data/chat.py)
PROMPT_FORMATS = ("plain", "llama2", "llama3", "chat")
LOSS_ON = ("all", "last")  # which assistant turns of a conversation are learned
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


def _optional_positive(name: str, value: Optional[int]) -> None:
    if value is not None:
        _positive(name, value)


@dataclass
class DataConfig:
    """Where samples come from (webdataset shards, see ``data/loader.py``) and how they become
    micro-batches."""

    # One dataset: a brace pattern or glob (train/shard-{000000..000099}.tar). Or a weighted mix:
    # [{shards: "a/{0..3}.tar", weight: 3}, {shards: "b/*.tar", weight: 1}] (each next sample
    # comes from a dataset drawn with probability weight / sum of weights; data/batching.py).
    train_shards: Any = None
    valid_shards: Optional[str] = None  # one pass per validation (each sample once)
    tokenizer: Optional[str] = None  # sentencepiece .model, tokenizer.json, or a folder with one
    # plain | llama2 | llama3 (hand-written, one user turn), or chat: the tokenizer's own chat
    # template (chat_template.jinja or tokenizer_config.json's chat_template beside it)
    prompt_format: str = "plain"
    # Conversations: the loss on every assistant turn (all) or on the last one only (last).
    loss_on: str = "all"
    # More variables for the chat template, e.g. {enable_thinking: false} (Qwen3: its generation
    # prompt then holds the empty think block its trained turns show).
    chat_template_kwargs: dict = field(default_factory=dict)
    micro_batch_size: int = 4  # samples per micro-batch
    max_tokens: Optional[int] = None  # instead: micro-batches of up to this many padded tokens
    bucket_window: int = 1000  # samples sorted by length together (see data/batching.py)
    shuffle_buffer: int = 1000  # raw records shuffled per loader worker
    num_workers: int = 2  # loader processes per data-reading rank
    min_duration: Optional[float] = None  # seconds; shorter audio is skipped and counted
    max_duration: Optional[float] = 40.0
    # The task of a sample whose JSON has neither task nor context: a bare transcript is ASR
    # (NeMo's manifest convention). null: such samples need default_context, else are skipped.
    default_task: Optional[str] = "asr"
    # The instruction of a sample without a context (null: its task's default instruction).
    default_context: Optional[str] = None
    # Each step's sequence length is rounded up to a multiple of this (and of what the layout
    # needs): few distinct shapes, so attention kernels and fused ops are not rebuilt every step.
    # null: 128 on a GPU, none on the CPU.
    length_multiple: Optional[int] = None
    # Sequence packing: each micro-batch is one row of pack_tokens LLM positions (SALM: after the
    # audio splice; BESTOW: the text) holding whole samples, filled best-fit from the
    # bucket_window samples read together (data/packing.py); each sample is its own sequence
    # (positions restart, attention stays inside it). A sample longer than pack_tokens is
    # skipped and counted. Replaces micro_batch_size and max_tokens.
    packing: bool = False
    pack_tokens: Optional[int] = None

    def __post_init__(self):
        self.train_shards = _weighted_shards("data.train_shards", self.train_shards)
        _optional_positive("data.length_multiple", self.length_multiple)
        _choice("data.prompt_format", self.prompt_format, PROMPT_FORMATS)
        _choice("data.loss_on", self.loss_on, LOSS_ON)
        _require(
            isinstance(self.chat_template_kwargs, dict)
            and all(isinstance(k, str) for k in self.chat_template_kwargs),
            f"data.chat_template_kwargs={self.chat_template_kwargs!r} must be a mapping of names "
            "to values",
        )
        for name in ("default_task", "default_context"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, str) and value.strip()),
                f"data.{name}={value!r} must be a non-empty string or null",
            )
        for name in ("micro_batch_size", "bucket_window"):
            _positive(f"data.{name}", getattr(self, name))
        _optional_positive("data.max_tokens", self.max_tokens)
        _require(
            isinstance(self.packing, bool), f"data.packing={self.packing!r} must be true or false"
        )
        _optional_positive("data.pack_tokens", self.pack_tokens)
        _require(
            not self.packing or self.pack_tokens is not None,
            "data.packing=true needs data.pack_tokens (the positions of one packed row)",
        )
        _require(
            not self.packing or self.max_tokens is None,
            f"data.packing=true fills rows of data.pack_tokens={self.pack_tokens} positions; "
            f"data.max_tokens={self.max_tokens} does not apply: set it to null",
        )
        for name in ("shuffle_buffer", "num_workers"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, f"data.{name}={value!r} must be >= 0")
        low, high = self.min_duration, self.max_duration
        _require(
            low is None or high is None or low <= high,
            f"data.min_duration={low} is above data.max_duration={high}",
        )

    def step_length_multiple(self, cuda: bool) -> int:
        """``length_multiple``, or its default where null (128 on a GPU, 1 on the CPU)."""
        if self.length_multiple is not None:
            return self.length_multiple
        return 128 if cuda else 1

    @property
    def train_datasets(self) -> list[tuple[str, float]]:
        """(shard pattern, weight) of each training dataset; a plain pattern is one of weight 1."""
        if self.train_shards is None:
            return []
        if isinstance(self.train_shards, str):
            return [(self.train_shards, 1.0)]
        return [(entry["shards"], entry["weight"]) for entry in self.train_shards]


def _weighted_shards(name: str, value: Any) -> Any:
    """A shard pattern as it is, or a mix's entries checked (weights as floats)."""
    if value is None or isinstance(value, str):
        return value
    _require(
        isinstance(value, list) and len(value) > 0,
        f"{name}={value!r} must be a shard pattern or a non-empty list of "
        "{shards: PATTERN, weight: W}",
    )
    entries = []
    for i, entry in enumerate(value):
        where = f"{name}[{i}]"
        _require(
            isinstance(entry, dict) and set(entry) == {"shards", "weight"},
            f"{where}={entry!r} must be a mapping with exactly: shards, weight",
        )
        shards, weight = entry["shards"], entry["weight"]
        _require(
            isinstance(shards, str) and bool(shards.strip()),
            f"{where}.shards={shards!r} must be a shard pattern (a non-empty string)",
        )
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        _require(
            number and math.isfinite(weight) and weight > 0,
            f"{where}.weight={weight!r} must be a positive number",
        )
        entries.append({"shards": shards, "weight": float(weight)})
    return entries


@dataclass
class OptimConfig:
    """Adam with decoupled weight decay (Megatron's distributed optimizer) and the LR schedule.

    Norms and biases get no weight decay. The encoder and the adapter (with BESTOW's
    cross-attention) may have their own peak LR; every group follows the same schedule shape,
    its minimum scaled like its peak.
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    encoder_lr: Optional[float] = None  # null: lr
    adapter_lr: Optional[float] = None  # adapter and BESTOW cross-attention; null: lr
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 turns clipping off
    schedule: str = "cosine"  # cosine | linear | constant, after the warmup
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # null: train.steps - warmup_steps
    distributed: bool = True  # shard optimizer states over data-parallel ranks
    # Data-parallel gradient reduction during the backward pass, bucket by bucket as the
    # buckets' gradients are complete (last micro-batch), instead of all at once after it.
    overlap_grad_reduce: bool = True
    # The distributed optimizer's parameter all-gather during the next forward pass, bucket by
    # bucket as layers need them. Only with optim.distributed and optim.overlap_grad_reduce.
    overlap_param_gather: bool = True
    # Parameters per gradient bucket when overlapping; null: Megatron's max(4e7, 1e6 x DP).
    bucket_size: Optional[int] = None

    def __post_init__(self):
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad"):
            value = getattr(self, name)
            _require(value >= 0, f"optim.{name}={value} must be >= 0")
        for name in ("encoder_lr", "adapter_lr"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"optim.{name}={value} must be >= 0")
        _require(self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            _fraction(f"optim.{name}", getattr(self, name))
        _choice("optim.schedule", self.schedule, LR_SCHEDULES)
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"optim.warmup_steps={self.warmup_steps!r} must be an integer >= 0",
        )
        _optional_positive("optim.decay_steps", self.decay_steps)
        _optional_positive("optim.bucket_size", self.bucket_size)
        for name in ("distributed", "overlap_grad_reduce", "overlap_param_gather"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"optim.{name}={value!r} must be true or false")


@dataclass
class TrainConfig:
    """The loop: how long, how much per step, numerics, validation and logging."""

    steps: int = 1000  # optimizer steps
    # Micro-batches per data-parallel rank per step (gradient accumulation). A step reads
    # num_microbatches x DP micro-batches (Megatron's global batch size, in micro-batches).
    num_microbatches: int = 1
    # Samples per step over all DP ranks; when set it decides num_microbatches
    # (= global_batch_size / (data.micro_batch_size x DP)). Not with data.max_tokens.
    global_batch_size: Optional[int] = None
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    output_dir: str = "runs/salm"  # checkpoints/, tensorboard/, metrics.jsonl, config.yaml
    log_interval: int = 10  # steps between console progress lines (every step goes to files)
    eval_interval: Optional[int] = None  # steps between validations (needs data.valid_shards)
    eval_iters: int = 10  # at most this many global batches of one pass over data.valid_shards
    # Validation also decodes this many validation samples (decode.*) and reports WER and answer
    # accuracy, as `salm eval` scores them. Needs PP=1 and no SP (decoding runs on one stage).
    eval_wer_samples: int = 0
    max_bad_steps: int = 5  # consecutive NaN/inf steps (skipped) before stopping
    log_sample_keys: bool = False  # write every consumed sample key to sample_keys/dp<r>.jsonl

    def __post_init__(self):
        for name in ("steps", "num_microbatches", "log_interval", "eval_iters", "max_bad_steps"):
            _positive(f"train.{name}", getattr(self, name))
        _optional_positive("train.eval_interval", self.eval_interval)
        _optional_positive("train.global_batch_size", self.global_batch_size)
        _require(
            isinstance(self.eval_wer_samples, int) and self.eval_wer_samples >= 0,
            f"train.eval_wer_samples={self.eval_wer_samples!r} must be an integer >= 0",
        )
        _choice("train.precision", self.precision, PRECISIONS)

    def microbatches(self, data: DataConfig, dp_size: int) -> int:
        """Micro-batches per DP rank per step, from ``global_batch_size`` when it is set."""
        if self.global_batch_size is None:
            return self.num_microbatches
        per_microbatch = data.micro_batch_size * dp_size
        _require(
            self.global_batch_size % per_microbatch == 0,
            f"train.global_batch_size={self.global_batch_size} is not divisible by "
            f"data.micro_batch_size x data-parallel size = {data.micro_batch_size} x {dp_size}",
        )
        return self.global_batch_size // per_microbatch


# How training checkpoints lay out the distributed optimizer's state (training/optimizer_state.py).
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


@dataclass
class CheckpointConfig:
    """Training checkpoints (``<train.output_dir>/checkpoints``) and pretrained weights."""

    interval: Optional[int] = 500  # steps between saves; null: only at the end
    keep: Optional[int] = 3  # the newest checkpoints kept (by write order); null: all
    resume: bool = True  # continue from the newest complete checkpoint when there is one
    # Start a new run in a train.output_dir that holds an earlier one: move the earlier run's
    # checkpoints/, config.yaml, metrics.jsonl, tensorboard/ and sample_keys/ into
    # <train.output_dir>/old-run-N/ (nothing is deleted). Without it, resume=false over
    # checkpoints is refused. Give it once, on the command line: every run that has it set starts
    # over, a requeued one too.
    start_over: bool = False
    # Write checkpoints in a background process while training goes on; one in flight at a time.
    async_save: bool = False
    # The optimizer state's layout in the checkpoints this run writes (any loads):
    # dp_reshardable: each rank writes its own shard, nothing is gathered; it loads only at the
    # same TP/PP/VPP. fully_reshardable: loads at any layout, but every save all-gathers the
    # whole optimizer state to every data-parallel rank first (host memory, time).
    optimizer_format: str = "dp_reshardable"
    # Megatron dist checkpoints to start from (ignored when resuming): an LLM with GPTModel's keys,
    # an encoder with FastConformerEncoder's (NeMo's) keys. Any TP/PP layout loads.
    pretrained_llm: Optional[str] = None
    pretrained_encoder: Optional[str] = None
    # A whole speech model's weights to start from (ignored when resuming): a `salm import`
    # folder or a training checkpoint's step folder; pretrained_llm/_encoder, when also set,
    # replace their parts. Any TP/PP layout loads.
    pretrained_model: Optional[str] = None

    def __post_init__(self):
        _optional_positive("checkpoint.interval", self.interval)
        _optional_positive("checkpoint.keep", self.keep)
        _choice("checkpoint.optimizer_format", self.optimizer_format, OPTIMIZER_FORMATS)


# ---------------------------------------------------------------------------------- generation

DECODING_STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class DecodeConfig:
    """How ``salm eval`` / ``salm transcribe`` generate (see ``inference/generation.py``)."""

    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 128
    temperature: float = 1.0  # sample: logits / temperature
    top_k: int = 0  # sample: only the k likeliest tokens (0: all)
    top_p: float = 1.0  # sample: the smallest set of tokens holding this probability
    seed: int = 0  # sample: the same seed draws the same text
    beam_size: int = 4
    length_penalty: float = 1.0  # beam: hypotheses ranked by log-prob / length ** this
    batch_size: int = 8  # utterances decoded together
    # A system turn opening every prompt (without one of its own): data.prompt_format=chat only.
    system_prompt: Optional[str] = None

    def __post_init__(self):
        _choice("decode.strategy", self.strategy, DECODING_STRATEGIES)
        _require(
            self.system_prompt is None
            or (isinstance(self.system_prompt, str) and bool(self.system_prompt.strip())),
            f"decode.system_prompt={self.system_prompt!r} must be a non-empty string or null",
        )
        for name in ("max_new_tokens", "beam_size", "batch_size"):
            _positive(f"decode.{name}", getattr(self, name))
        _require(self.temperature > 0, f"decode.temperature={self.temperature} must be > 0")
        _require(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"decode.top_k={self.top_k!r} must be an integer >= 0",
        )
        _require(0 < self.top_p <= 1, f"decode.top_p={self.top_p} must be in (0, 1]")
        _require(
            self.length_penalty >= 0, f"decode.length_penalty={self.length_penalty} must be >= 0"
        )


# ------------------------------------------------------------------------------------------ whole


@dataclass
class Config:
    """Everything a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    bestow: BestowConfig = field(default_factory=BestowConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    seed: int = 1234

    def __post_init__(self):
        self.validate_layout()
        audio_token, rows = self.model.audio_token_id, self.llm.padded_vocab_size
        _require(
            audio_token is None or audio_token < rows,
            f"model.audio_token_id={audio_token} is outside the embedding's rows 0..{rows - 1} "
            f"(llm.vocab_size={self.llm.vocab_size} padded to {rows})",
        )
        _require(
            self.data.max_tokens is None or self.train.global_batch_size is None,
            f"train.global_batch_size={self.train.global_batch_size} counts samples, but "
            f"data.max_tokens={self.data.max_tokens} makes micro-batches of varying size; "
            "set train.num_microbatches instead",
        )
        _require(
            not self.data.packing or self.train.global_batch_size is None,
            f"train.global_batch_size={self.train.global_batch_size} counts samples, but "
            "data.packing=true makes micro-batches of varying sample counts; set "
            "train.num_microbatches instead",
        )
        _require(
            self.data.max_tokens is None or self.parallel.pipeline_model_parallel_size == 1,
            f"data.max_tokens={self.data.max_tokens} makes micro-batches of varying size, but "
            "pipeline stages exchange one activation shape; with "
            f"parallel.pipeline_model_parallel_size={self.parallel.pipeline_model_parallel_size} "
            "use data.micro_batch_size",
        )
        cp = self.parallel.context_parallel_size
        _require(
            not (self.data.packing and cp > 1),
            f"data.packing=true with parallel.context_parallel_size={cp}: packed rows cannot be "
            "cut into context-parallel chunks here (each sample would need its own 2 x CP "
            "chunks); use one of the two",
        )
        data, stages = self.data, self.parallel.pipeline_model_parallel_size
        _require(
            stages == 1 or data.bucket_window % data.micro_batch_size == 0,
            f"data.bucket_window={data.bucket_window} is not a multiple of data.micro_batch_size="
            f"{data.micro_batch_size}: each window would end in a smaller micro-batch, but "
            f"pipeline stages (parallel.pipeline_model_parallel_size={stages}) exchange one shape",
        )
        encoder, high = self.encoder, self.data.max_duration
        if encoder.type == "whisper":
            longest = 2 * encoder.max_source_positions * encoder.features.window_stride
            _require(
                high is not None and high <= longest + 1e-9,
                f"data.max_duration={high} is longer than encoder.type='whisper' takes: "
                f"{longest:g} s (encoder.max_source_positions={encoder.max_source_positions})",
            )
        dense_only = [t for t in self.lora.targets if t in ("linear_fc1", "linear_fc2")]
        _require(
            self.lora.rank == 0 or not self.llm.is_moe or not dense_only,
            f"lora.targets={self.lora.targets} adapts {', '.join(dense_only)}, the dense MLP's "
            f"linears, but with llm.num_moe_experts={self.llm.num_moe_experts} every MLP is a "
            "set of experts, which get no adapters here (models/lora.py); set "
            "lora.targets=[linear_qkv, linear_proj] (the attention's linears)",
        )
        if self.model.arch == "bestow":
            _require(
                self.llm.hidden_size % self.bestow.num_heads == 0,
                f"llm.hidden_size={self.llm.hidden_size} is not divisible by "
                f"bestow.num_heads={self.bestow.num_heads}",
            )

    def validate_layout(self) -> None:
        validate_layout(self.llm, self.parallel)

    @property
    def placeholder_id(self) -> int:
        """The audio placeholder token SALM prompts carry: ``model.audio_token_id``, which the
        tokenizer fills in (``check_tokenizer``); without one (synthetic batches) the last id of
        ``llm.vocab_size``."""
        audio_token = self.model.audio_token_id
        return self.llm.vocab_size - 1 if audio_token is None else audio_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields naming files or folders. Training makes them absolute (``absolute_paths``), so that the
# config a run saves names the same files from any folder (`salm eval`, `salm export`, resume).
PATH_FIELDS = (
    "data.train_shards", "data.valid_shards", "data.tokenizer", "train.output_dir",
    "checkpoint.pretrained_llm", "checkpoint.pretrained_encoder", "checkpoint.pretrained_model",
    "model.ctc_tokenizer",
)  # fmt: skip
SHARD_FIELDS = ("data.train_shards", "data.valid_shards")  # brace patterns and globs


def absolute_paths(config: Config, base: str | Path | None = None) -> Config:
    """``config`` with the relative paths of :data:`PATH_FIELDS` joined to ``base`` (default: the
    current folder). A shard pattern is joined when all its brace alternatives are relative."""
    from braceexpand import braceexpand

    base = os.path.abspath(base if base is not None else os.getcwd())
    data = config.to_dict()

    def joined(name: str, value: str, pattern: bool) -> str:
        if not value:  # unset (an empty name is left for the checks to refuse)
            return value
        try:  # shard patterns: every alternative; a bad pattern is left to the shard check
            items = braceexpand(value) if pattern else [value]
            absolute = {os.path.isabs(item) for item in items}
        except ValueError:
            return value
        _require(
            len(absolute) == 1,
            f"{name}={value!r} mixes absolute and relative paths; make them all absolute",
        )
        return os.path.join(base, value) if absolute == {False} else value

    for name in PATH_FIELDS:
        section, leaf = name.split(".")
        value = data[section][leaf]
        if isinstance(value, list):  # a weighted mix (data.train_shards): each entry's shards
            for i, entry in enumerate(value):
                entry["shards"] = joined(f"{name}[{i}].shards", entry["shards"], True)
        else:
            data[section][leaf] = joined(name, value, name in SHARD_FIELDS)
    return config_from_dict(data)


# ---------------------------------------------------------------------------- building from text


def _convert(name: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` to the field's annotated type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(name, value, inner)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r} must be a string")
    return value


def _build(cls, data: Any, prefix: str):
    """Make dataclass ``cls`` from a mapping, recursing into nested sections."""
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown field {prefix}{unknown[0]}; "
            f"{prefix or 'config'} has: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _convert(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def _presets() -> dict[str, dict[str, dict[str, Any]]]:
    """Sections that can start from a named preset (``llm.preset: llama3-8b``)."""
    return {"llm": LLM_PRESETS, "encoder": ENCODER_PRESETS}


def _preset_section(section: str, name: Any) -> dict[str, Any]:
    presets = _presets()[section]
    _choice(f"{section}.preset", name, tuple(presets))
    return copy.deepcopy(presets[name])


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config`; ``SECTION.preset: NAME`` starts a section from a preset."""
    data = dict(data)
    for section in _presets():
        fields = data.get(section)
        if isinstance(fields, dict) and "preset" in fields:
            fields = dict(fields)
            data[section] = _merge(_preset_section(section, fields.pop("preset")), fields)
    return _build(Config, data, "")


def encoder_from_dict(data: dict[str, Any]) -> EncoderConfig:
    """An ``encoder:`` section on its own (``preset: NAME`` starts it from a preset)."""
    data = dict(data)
    if "preset" in data:
        data = _merge(_preset_section("encoder", data.pop("preset")), data)
    return _build(EncoderConfig, data, "encoder.")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursing into nested sections."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path) -> Config:
    """Read a YAML or JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {err}"
        ) from err
    try:
        return config_from_dict(data or {})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def _override_value(text: str) -> Any:
    """An override's value as YAML (numbers, booleans, null, a mix's list of mappings), except
    text that YAML cannot read or reads as a mapping without values: a shard pattern with braces
    (``{a,b}.tar``, ``{train,dev}``) stays the string it is."""
    if not text:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, dict) and ":" not in text:
        return text
    return value


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """A new config with ``key.sub=value`` strings applied (values parsed as YAML scalars)."""
    data = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        _require(bool(sep) and bool(key), f"override {item!r} is not of the form key.sub=value")
        value = _override_value(text)
        node = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section"
                )
            node = node[part]
        if leaf == "preset" and len(parents) == 1 and parents[0] in _presets():
            section = parents[0]
            defaults = dataclasses.asdict(_build(type(getattr(config, section)), {}, ""))
            node.clear()
            node.update(_merge(defaults, _preset_section(section, value)))
            continue
        if leaf not in node:
            where = ".".join(parents) or "config"
            raise ConfigError(
                f"override {item!r}: unknown field {key}; {where} has: {', '.join(sorted(node))}"
            )
        node[leaf] = value
    return config_from_dict(data)
