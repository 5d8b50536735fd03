"""Configuration: validated dataclasses, presets by name, YAML/JSON and ``key.sub=value`` overrides.

Every field is checked when a config is built or changed through :func:`apply_overrides`, and every
error names the field and the value. Parallel layouts that cannot work are rejected here, before any
process group exists (:meth:`Config.validate_world`).
"""

from __future__ import annotations

import dataclasses
import json
import math
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


@dataclass
class LLMConfig:
    """Shape and numerics of a Llama-family decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

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
    tie_embeddings: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = 0.02
    transformer_impl: str = "auto"  # auto: Transformer Engine when TE and CUDA are present
    fp8: Optional[str] = None  # None | "hybrid" | "e4m3" (Transformer Engine only)
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"

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
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"llm.hidden_size={self.hidden_size} is not divisible by "
            f"llm.num_attention_heads={self.num_attention_heads}",
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
        _require(
            self.fp8 is None or self.transformer_impl != "local",
            f"llm.fp8={self.fp8!r} needs Transformer Engine, but llm.transformer_impl='local'",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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
        kv = self.num_query_groups * self.head_dim
        attention = h * (h + 2 * kv) + h * h + (h + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * f
        norms = 2 * h
        vocab = self.padded_vocab_size if padded_vocab else self.vocab_size
        embeddings = vocab * h * (1 if self.tie_embeddings else 2)
        return layers * (attention + mlp + norms) + h + embeddings


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
}


def llm_preset(name: str, **overrides: Any) -> LLMConfig:
    """The LLM shape called ``name`` (see ``LLM_PRESETS``) with some fields replaced."""
    _choice("llm preset", name, tuple(LLM_PRESETS))
    return LLMConfig(**{**LLM_PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------- parallel


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallelism is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per pipeline rank
    sequence_parallel: bool = False
    context_parallel_size: int = 1

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
        ):
            _positive(f"parallel.{name}", getattr(self, name))
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _positive("parallel.virtual_pipeline_model_parallel_size", vpp)
            _require(
                self.pipeline_model_parallel_size > 1,
                f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                f"parallel.pipeline_model_parallel_size > 1 (it is "
                f"{self.pipeline_model_parallel_size})",
            )
        _require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1",
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


def validate_layout(llm: LLMConfig, parallel: ParallelConfig) -> None:
    """Reject model/parallel combinations that cannot be split, naming the numbers."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    chunks = parallel.num_model_chunks
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "padded_vocab_size"):
        value = getattr(llm, name)
        _require(
            value % tp == 0,
            f"llm.{name}={value} is not divisible by parallel.tensor_model_parallel_size={tp}",
        )
    _require(
        llm.num_layers % (pp * chunks) == 0,
        f"llm.num_layers={llm.num_layers} is not divisible by pipeline_model_parallel_size "
        f"x virtual_pipeline_model_parallel_size = {pp} x {chunks} = {pp * chunks}",
    )
    _require(
        parallel.context_parallel_size == 1 or llm.transformer_impl != "local",
        f"parallel.context_parallel_size={parallel.context_parallel_size} needs Transformer "
        "Engine attention, but llm.transformer_impl='local'",
    )


# ------------------------------------------------------------------------------------------ whole


@dataclass
class Config:
    """Everything a run needs. Sections grow with the stack (encoder, data, training ...)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234

    def __post_init__(self):
        self.validate_layout()

    def validate_layout(self) -> None:
        validate_layout(self.llm, self.parallel)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config`; ``llm.preset: NAME`` starts the LLM section from a preset."""
    data = dict(data)
    llm = data.get("llm")
    if isinstance(llm, dict) and "preset" in llm:
        llm = dict(llm)
        name = llm.pop("preset")
        _choice("llm.preset", name, tuple(LLM_PRESETS))
        data["llm"] = {**LLM_PRESETS[name], **llm}
    return _build(Config, data, "")


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


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """A new config with ``key.sub=value`` strings applied (values parsed as YAML scalars)."""
    data = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        _require(bool(sep) and bool(key), f"override {item!r} is not of the form key.sub=value")
        value = yaml.safe_load(text) if text else None
        node = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section"
                )
            node = node[part]
        if key == "llm.preset":
            _choice("llm.preset", value, tuple(LLM_PRESETS))
            node.clear()
            node.update(dataclasses.asdict(llm_preset(value)))
            continue
        if leaf not in node:
            where = ".".join(parents) or "config"
            raise ConfigError(
                f"override {item!r}: unknown field {key}; {where} has: {', '.join(sorted(node))}"
            )
        node[leaf] = value
    return config_from_dict(data)
