"""Proves evaluation scores what it should and keeps what it decoded: audio outside the duration
limits is skipped and counted, empty references are kept, a batch the encoder refuses (Whisper,
over its length) is named while the others are decoded and written as strict JSON, and decoding
runs in the training precision (bf16 on CUDA for auto and bf16; fp32 on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from salm_megatron.data import load_tokenizer
from salm_megatron.data.loader import SampleStream
from salm_megatron.inference.commands import write_results
from salm_megatron.inference.evaluation import (
    decode_samples,
    duration_problem,
    evaluation_stream,
    failure_message,
    gather,
)
from salm_megatron.inference.generation import Generator
from salm_megatron.inference.loading import decode_dtype
from salm_megatron.models import build_speech_llm
from tests.eval_fixtures import CLIPS, whisper_eval_config, write_eval_shard


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    return whisper_eval_config(folder), write_eval_shard(folder / "shards")


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_stream_skips_by_duration_and_keeps_empty_references(setup):
    cfg, shard = setup
    stream = evaluation_stream(cfg, shard, dp_rank=0, dp_size=1)
    samples = list(stream)
    assert [s["key"] for s in samples] == ["utt0-short", "utt1-silent", "utt3-short"]
    assert samples[1]["answer"] == ""
    assert {k: n for k, n in stream.stats.items() if n} == {"too_long": 1, "too_short": 1}


def test_duration_problem_names_the_limit(setup):
    cfg, _ = setup
    assert duration_problem(0.5, cfg.data) is None
    assert duration_problem(2.0, cfg.data) == "2.000 s is longer than data.max_duration=1.0"
    assert duration_problem(0.05, cfg.data) == "0.050 s is shorter than data.min_duration=0.1"


def test_a_failing_batch_is_named_and_the_others_are_written(single_rank, setup, tmp_path):
    cfg, shard = setup
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    (model,) = build_speech_llm(cfg)
    generator = Generator.for_tokenizer(model, cfg.decode, tokenizer, cfg.data.prompt_format)
    # Every clip, none filtered: the long one reaches the encoder, which refuses it.
    stream = SampleStream(shard, shuffle=False, shuffle_buffer=0, drop_empty_answer=False)
    seen = []
    decoded = decode_samples(stream, generator, tokenizer, cfg, progress=lambda d: seen.append(
        (len(d.rows), d.failed_samples)))  # fmt: skip
    assert seen == [(1, 0), (2, 0), (2, 1), (3, 1), (4, 1)]  # after each batch of one
    assert [r["key"] for r in decoded.rows] == [k for k in CLIPS if k != "utt2-long"]
    assert set(decoded.rows[0]) == {"key", "task", "lang", "context", "reference", "prediction",
                                    "duration"}  # fmt: skip
    (failure,) = decoded.failures
    assert failure["keys"] == ["utt2-long"]
    error = failure["error"]
    assert error.startswith("ValueError: ") and "max_source_positions=50" in error
    assert failure_message(decoded).startswith("1 batch(es) failed (1 samples); first (utt2-long)")

    decoded, skipped = gather(decoded, stream.stats)
    write_results(tmp_path, decoded, skipped, cfg, "ckpt", [shard], elapsed=1.0)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [r["key"] for r in decoded.rows]
    summary = _strict_json((tmp_path / "metrics.json").read_text())
    assert summary["failed_samples"] == 1 and summary["failures"] == [failure]
    assert summary["utterances"] == 4 and summary["metrics"]["asr"]["count"] == 4
    assert summary["duration_limits"] == {"min": 0.1, "max": 1.0}


def test_limit_counts_failed_samples_too(single_rank, setup):
    cfg, shard = setup
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    (model,) = build_speech_llm(cfg)
    generator = Generator.for_tokenizer(model, cfg.decode, tokenizer, cfg.data.prompt_format)
    stream = SampleStream(shard, shuffle=False, shuffle_buffer=0, drop_empty_answer=False)
    decoded = decode_samples(stream, generator, tokenizer, cfg, limit=3)
    assert len(decoded.rows) + decoded.failed_samples == 3


@pytest.mark.parametrize(
    ("precision", "cuda", "dtype"),
    [("auto", True, torch.bfloat16), ("bf16", True, torch.bfloat16),
     ("fp32", True, torch.float32), ("auto", False, torch.float32),
     ("bf16", False, torch.float32), ("fp32", False, torch.float32)],
)  # fmt: skip
def test_decode_dtype_follows_the_training_precision(precision, cuda, dtype):
    assert decode_dtype(precision, cuda) is dtype
