"""A training checkpoint as a ready-to-decode model: its config, tokenizer and weights at PP=1.

A checkpoint saved at any TP/PP layout loads at TP=N (the ranks that decode together) and PP=1
through dist-checkpoint resharding. Decoding needs the whole model on every rank of a TP group
and no sequence parallelism, and it uses the local layer spec (SDPA attention, whose masks the
left-padded prompts need); its keys are Transformer Engine's, so any training spec loads.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from ..config import Config, ConfigError, apply_overrides, config_from_dict
from ..data.tokenizers import Tokenizer, load_tokenizer
from ..models import build_speech_llm
from ..training import checkpoint
from ..training.data import check_tokenizer
from .generation import Generator

log = logging.getLogger("salm.inference")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run's output folder, its ``checkpoints/`` or the step itself."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = checkpoint.latest_checkpoint(root)
        if found is not None:
            return found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(
        f"{path} holds no complete checkpoint (a step_NNNNNNN folder with metadata.json, or a "
        "run folder with checkpoints/)"
    )


def saved_config(path: Path) -> Config:
    """The resolved config a training checkpoint was saved with."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    if common.get("common", {}).get("format") != checkpoint.FORMAT:
        raise ValueError(f"{path} is not a salm-megatron training checkpoint")
    return config_from_dict(common["common"]["config"])


EXPERT_FIELDS = ("expert_model_parallel_size", "expert_tensor_parallel_size")


def generation_config(cfg: Config, tensor_parallel: int, overrides: list[str]) -> Config:
    """``cfg`` laid out for decoding: TP=``tensor_parallel``, PP=1, no SP or CP, local spec.
    MoE experts at EP=1 (each rank all of them, split over TP; the checkpoint reshards): ranks
    of different DP ranks decode on their own, which EP across them would not allow
    (``generation.py``), unless ``overrides`` place them (EP inside the TP group)."""
    placed = any(
        item.startswith(tuple(f"parallel.{f}=" for f in EXPERT_FIELDS)) for item in overrides
    )
    cfg = apply_overrides(cfg, overrides)
    parallel = dataclasses.replace(
        cfg.parallel,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False,
        context_parallel_size=1,
        **({} if placed else dict(zip(EXPERT_FIELDS, (1, None), strict=True))),
    )
    data = dataclasses.replace(cfg.data, packing=False)  # one prompt per row
    llm = dataclasses.replace(cfg.llm, transformer_impl="local", fp8=None, recompute="none")
    return dataclasses.replace(cfg, parallel=parallel, llm=llm, data=data)


# The dtype a model decodes in, by (train.precision, CUDA available): what it trained in on a GPU
# ("auto" trains in bf16 there). On the CPU always fp32: bf16 is slower there, and bf16 weights
# widen to fp32 exactly.
DECODE_DTYPES = {
    ("auto", True): torch.bfloat16, ("bf16", True): torch.bfloat16, ("fp32", True): torch.float32,
    ("auto", False): torch.float32, ("bf16", False): torch.float32, ("fp32", False): torch.float32,
}  # fmt: skip


def decode_dtype(precision: str, cuda: bool) -> torch.dtype:
    """The dtype to decode in for ``train.precision`` = ``precision`` (see DECODE_DTYPES)."""
    return DECODE_DTYPES[precision, cuda]


def load_model(cfg: Config, path: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """This rank's whole model (after ``parallel.initialize``) with the checkpoint's weights, in
    ``dtype`` (None: bf16 if ``train.precision`` is bf16, else fp32, as conversions read it)."""
    if dtype is None:
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    (model,) = build_speech_llm(cfg, params_dtype=dtype)
    if torch.cuda.is_available():
        model.cuda()
    checkpoint.load_weights(cfg, path, [model])  # with the frozen parts it left out
    return model.eval()


def open_tokenizer(cfg: Config, override: str | None) -> Tokenizer:
    path = override or cfg.data.tokenizer
    if path is None:
        raise ConfigError("the checkpoint's config names no data.tokenizer; pass --tokenizer")
    try:
        return load_tokenizer(path)
    except ValueError as err:
        raise ConfigError(f"{err} (the checkpoint's data.tokenizer; pass --tokenizer)") from err


def prepare(path: str | Path, tensor_parallel: int, overrides: list[str]) -> tuple[Config, Path]:
    """The checkpoint folder and its config laid out for decoding (before
    ``parallel.initialize(cfg.parallel)``)."""
    found = find_checkpoint(path)
    return generation_config(saved_config(found), tensor_parallel, overrides), found


def load_generator(
    cfg: Config, path: Path, tokenizer: str | None = None
) -> tuple[Generator, Tokenizer]:
    """The model of checkpoint ``path`` as a generator, and its tokenizer (collective)."""
    tok = open_tokenizer(cfg, tokenizer)
    cfg = check_tokenizer(cfg, tok)  # the placeholder its prompts carry, as in training
    dtype = decode_dtype(cfg.train.precision, torch.cuda.is_available())
    model = load_model(cfg, path, dtype)
    log.info(
        "loaded %s (%s, TP=%d, %s)",
        path, cfg.model.arch, cfg.parallel.tensor_model_parallel_size, str(dtype).split(".")[-1],
    )  # fmt: skip
    return Generator.for_tokenizer(model, cfg.decode, tok, cfg.data.prompt_format), tok
