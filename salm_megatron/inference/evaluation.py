"""Decoding for evaluation that keeps what it has: which samples count, failed batches, the gather.

``salm eval`` and validation during training (``train.eval_wer_samples``) both read their samples
through :func:`evaluation_stream` and decode them with :func:`decode_samples`, so they score the
same samples the same way. A batch that raises (a clip the encoder refuses, an out-of-memory) is
recorded with its keys and the error, and decoding goes on: one bad clip costs its batch, not
hours of decoding, and every data-parallel rank still reaches :func:`gather`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core import parallel_state

from ..config import Config, DataConfig
from ..data.loader import SampleStream
from ..data.samples import prompt_sample
from ..data.tokenizers import Tokenizer
from .generation import Generator


def evaluation_stream(
    cfg: Config, shards: str | list[str], dp_rank: int, dp_size: int, seed: int = 0
) -> SampleStream:
    """This DP rank's share of ``shards`` in order, as evaluation scores them.

    Audio outside ``data.min_duration`` .. ``data.max_duration`` is skipped and counted
    (``too_short``/``too_long`` in the stream's stats): those are the clips the model was trained
    within, and a Whisper encoder refuses longer ones. Samples with an empty answer are kept: a
    model that hallucinates over silence must pay for it in the scores.
    """
    data = cfg.data
    return SampleStream(
        shards, sample_rate=cfg.encoder.features.sample_rate, dp_rank=dp_rank, dp_size=dp_size,
        seed=seed, shuffle=False, shuffle_buffer=0, min_duration=data.min_duration,
        max_duration=data.max_duration, drop_empty_answer=False, default_task=data.default_task,
        default_context=data.default_context,
    )  # fmt: skip


def duration_problem(seconds: float, data: DataConfig) -> Optional[str]:
    """Why audio of ``seconds`` is outside the config's duration limits, or None."""
    if data.min_duration is not None and seconds < data.min_duration:
        return f"{seconds:.3f} s is shorter than data.min_duration={data.min_duration}"
    if data.max_duration is not None and seconds > data.max_duration:
        return f"{seconds:.3f} s is longer than data.max_duration={data.max_duration}"
    return None


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


@dataclass
class Decoded:
    """Rows decoded so far, and the batches that failed (``{"keys": [...], "error": "..."}``)."""

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    @property
    def failed_samples(self) -> int:
        return sum(len(f["keys"]) for f in self.failures)


def _row(raw: dict, prediction: str) -> dict:
    return {
        "key": raw["key"], "task": raw.get("task") or "", "lang": raw.get("lang"),
        "context": raw.get("context"), "reference": raw["answer"], "prediction": prediction,
        "duration": round(raw["duration"], 3),
    }  # fmt: skip


def decode_samples(
    samples: Iterable[dict],
    generator: Generator,
    tokenizer: Tokenizer,
    cfg: Config,
    *,
    limit: Optional[int] = None,
    progress: Optional[Callable[[Decoded], None]] = None,
) -> Decoded:
    """Decode raw samples (a :class:`SampleStream`'s) ``decode.batch_size`` at a time, up to
    ``limit`` of them; ``progress`` is called after each batch. A batch that raises is recorded
    and skipped; an error while reading the samples ends the reading, recorded the same way."""
    decoded = Decoded()
    batch: list[dict] = []

    def flush() -> None:
        try:
            data, decoding = cfg.data, cfg.decode
            prompts = [
                prompt_sample(raw, tokenizer, data.prompt_format, cfg.model.arch,
                              system=decoding.system_prompt,
                              chat_template_kwargs=data.chat_template_kwargs)
                for raw in batch
            ]  # fmt: skip
            outputs = generator.generate(prompts)
        except Exception as err:  # noqa: BLE001 - recorded, reported, and the exit code says so
            decoded.failures.append({"keys": [raw["key"] for raw in batch], "error": describe(err)})
        else:
            for raw, tokens in zip(batch, outputs, strict=True):
                decoded.rows.append(_row(raw, generator.text(tokenizer, tokens)))
        batch.clear()
        if progress is not None:
            progress(decoded)

    try:
        for raw in itertools.islice(samples, limit):
            batch.append(raw)
            if len(batch) == cfg.decode.batch_size:
                flush()
    except Exception as err:  # noqa: BLE001 - a shard that cannot be read: keep what was decoded
        decoded.failures.append({"keys": [], "error": f"reading the samples: {describe(err)}"})
    if batch:
        flush()
    return decoded


def gather(decoded: Decoded, skipped: dict[str, int]) -> tuple[Decoded, dict[str, int]]:
    """Every DP rank's rows and failures (from its TP group's first rank), sorted by key, and the
    skip counts summed, on every rank. Collective: every rank must call it, failed or not."""
    world = torch.distributed.get_world_size()
    first_of_tp_group = parallel_state.get_tensor_model_parallel_rank() == 0
    mine = (decoded.rows, decoded.failures, skipped) if first_of_tp_group else ([], [], {})
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    rows = sorted((row for part in parts for row in part[0]), key=lambda row: row["key"])
    failures = [failure for part in parts for failure in part[1]]
    total: dict[str, int] = {}
    for part in parts:
        for reason, count in part[2].items():
            if count:
                total[reason] = total.get(reason, 0) + count
    return Decoded(rows, failures), total


def failure_message(decoded: Decoded) -> str:
    """One line naming the failed batches: how many, their samples, the first error."""
    first = decoded.failures[0]
    keys = ", ".join(first["keys"][:5]) + (" ..." if len(first["keys"]) > 5 else "")
    return (
        f"{len(decoded.failures)} batch(es) failed ({decoded.failed_samples} samples); first"
        f"{f' ({keys})' if keys else ''}: {first['error']}"
    )
