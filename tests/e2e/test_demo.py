"""Proves `salm demo` runs its whole path on a tiny scale: espeak-ng speech -> `salm shards` ->
`salm train` (TP=2, 2 processes) -> `salm eval` -> curves PNG and the closing summary; that a
second run reuses what the first left, and that a longer run resumes training from the
checkpoint. (Its quality targets are measured by `make demo` itself and recorded in the README.)"""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (make espeak)"),
]


def _demo(out, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "demo", "--out", str(out), "--scale", "0.02",
         "--steps", "3", *args],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
    out = _demo(tmp_path)
    assert "dataset: speaking" in out and "shards: train" in out
    for path in ("salm/curves.png", "salm/eval/predictions.jsonl", "salm/eval/metrics.json",
                 "salm/run/checkpoints/latest", "shards/test/index.json",
                 "tokenizer/tokenizer.model"):  # fmt: skip
        assert (tmp_path / path).is_file(), path
    for line in ("transcription   WER", "questions       accuracy", "continue training:",
                 "BESTOW instead:", "transcribe a file:"):  # fmt: skip
        assert line in out, line

    again = _demo(tmp_path)
    assert "dataset: reusing" in again and "shards: train" not in again

    longer = _demo(tmp_path, "--steps", "5")  # as after an interruption at step 3
    assert "resumed from" in longer and "at step 3" in longer
