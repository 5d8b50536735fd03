"""Proves the path from training to answers: a tiny SALM trained at PP=2 on eight utterances
(`salm train`) is loaded at PP=1 and transcribes them back exactly, through `salm eval` at TP=2
(predictions.jsonl, metrics.json, WER 0) and `salm transcribe` (WAV at 44.1 kHz stereo, FLAC);
`salm eval` at DP=2 scores an empty reference and skips (and counts) audio over --max-duration,
as `salm transcribe` names it; bad checkpoints and shards are named, and so is a system prompt
for a checkpoint without a chat template."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from scipy.signal import resample_poly

from tests.conftest import REPO, launch
from tests.speech_fixtures import training_config, waveform

pytestmark = pytest.mark.multiprocess

ANSWERS = ["one two", "three four", "five six", "seven eight", "nine ten", "the quick brown fox",
           "jumps over", "the lazy dog"]  # fmt: skip


def _clip(i: int):
    return waveform(0.3 + 0.02 * i, seed=i, f0=100.0 + 50.0 * i)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder whose checkpoint (trained at PP=2) knows the eight utterances by heart."""
    import webdataset as wds

    from salm_megatron.data.audio_io import encode_flac

    root = tmp_path_factory.mktemp("overfit")
    (root / "shards").mkdir()
    with wds.ShardWriter(str(root / "shards" / "shard-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i, answer in enumerate(ANSWERS):
            sink.write({"__key__": f"utt{i}", "flac": encode_flac(_clip(i)),
                        "json": {"answer": answer, "task": "asr"}})  # fmt: skip
    config = training_config(root, "salm")
    config["data"].update(train_shards=str(root / "shards" / "shard-000000.tar"),
                          micro_batch_size=8, bucket_window=8, shuffle_buffer=0)  # fmt: skip
    config["optim"].update(lr=3e-3, warmup_steps=25, weight_decay=0.0)
    config["train"].update(steps=250, num_microbatches=1, log_interval=50)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    out = root / "run"
    launch("salm_megatron.train", 2, str(root / "run.yaml"), f"train.output_dir={out}",
           "parallel.pipeline_model_parallel_size=2", timeout=400)  # fmt: skip
    return root


def test_eval_at_tp2_scores_a_perfect_transcription(trained, tmp_path):
    out = tmp_path / "eval"
    log = launch("salm_megatron.inference.commands", 2, "eval", "--checkpoint",
                 str(trained / "run"), "--data", str(trained / "shards" / "shard-000000.tar"),
                 "--out", str(out))  # fmt: skip
    assert "TP=2" in log and "overall" in log
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == [f"utt{i}" for i in range(8)]
    assert [r["prediction"] for r in rows] == ANSWERS
    assert set(rows[0]) == {"key", "task", "lang", "context", "reference", "prediction",
                            "duration"}  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["asr"]["wer"] == 0.0 and metrics["metrics"]["asr"]["count"] == 8
    assert metrics["utterances"] == 8 and metrics["real_time_factor"] > 0


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_eval_at_dp2_scores_empty_references_and_skips_long_audio(trained, tmp_path):
    import webdataset as wds

    from salm_megatron.data.audio_io import encode_flac

    extra = tmp_path / "extra-000000.tar"
    with wds.TarWriter(str(extra)) as sink:
        sink.write({"__key__": "quiet", "flac": encode_flac(0.01 * _clip(1)),
                    "json": {"answer": "", "task": "asr"}})  # fmt: skip
        sink.write({"__key__": "long", "flac": encode_flac(waveform(1.5, seed=9)),
                    "json": {"answer": "one two", "task": "asr"}})  # fmt: skip
    out = tmp_path / "eval"
    log = launch("salm_megatron.inference.commands", 2, "eval", "--checkpoint",
                 str(trained / "run"), "--data", str(trained / "shards" / "shard-000000.tar"),
                 str(extra), "--out", str(out), "--tensor-parallel", "1",
                 "--max-duration", "1.0")  # fmt: skip
    assert "skipped samples: too_long 1" in log
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == sorted([f"utt{i}" for i in range(8)] + ["quiet"])
    assert next(r for r in rows if r["key"] == "quiet")["reference"] == ""
    metrics = _strict_json((out / "metrics.json").read_text())
    assert metrics["skipped_samples"] == {"too_long": 1} and metrics["failed_samples"] == 0
    assert metrics["duration_limits"]["max"] == 1.0
    assert metrics["metrics"]["asr"]["count"] == 9 and metrics["utterances"] == 9

    long_wav = tmp_path / "long.wav"
    soundfile.write(long_wav, waveform(1.5, seed=9).numpy(), 16000)
    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "transcribe", "--checkpoint",
         str(trained / "run"), str(long_wav), "--max-duration", "1.0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr[-3000:]
    assert f"{long_wav}: skipped, 1.500 s is longer than data.max_duration=1.0" in proc.stderr


def test_transcribe_reads_any_rate_and_channels(trained, tmp_path):
    wav = tmp_path / "clip3-44k-stereo.wav"
    mono = resample_poly(_clip(3).numpy(), 441, 160)
    soundfile.write(wav, np.stack([mono, mono], axis=1), 44100)
    flac = tmp_path / "clip6.flac"
    soundfile.write(flac, _clip(6).numpy(), 16000)
    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "transcribe", "--checkpoint",
         str(trained / "run"), str(wav), str(flac), "--beam-size", "2", "--strategy", "beam"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"{wav}\t{ANSWERS[3]}", f"{flac}\t{ANSWERS[6]}"]


def test_a_system_prompt_needs_the_chat_format(trained, tmp_path):
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, _clip(1).numpy(), 16000)
    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "transcribe", "--checkpoint",
         str(trained / "run"), str(wav), "--system", "Be brief."],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "decode.system_prompt (--system) needs data.prompt_format=chat" in proc.stderr
    assert "data.prompt_format='plain'" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--checkpoint", "/nowhere", "--data", "x.tar", "--out", "o"], "x.tar"),
        (["transcribe", "--checkpoint", "/nowhere", "a.wav"], "a.wav"),
        (["transcribe", "--checkpoint", "/nowhere", __file__], "/nowhere does not exist"),
    ],
)
def test_bad_input_is_named(args, message):
    proc = subprocess.run([sys.executable, "-m", "salm_megatron.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
