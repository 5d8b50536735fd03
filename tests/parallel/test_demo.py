"""Proves `salm demo` trains the tiny LLM at TP=2 with Megatron's distributed optimizer on CPU."""

import subprocess
import sys

from tests.conftest import REPO


def test_demo_loss_falls():
    proc = subprocess.run(
        [sys.executable, "-m", "salm_megatron.cli", "demo", "--steps", "300"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    losses = [
        float(line.split("loss")[1].split()[0])
        for line in proc.stdout.splitlines()
        if line.startswith("step")
    ]
    assert losses[0] > 5.0 and losses[-1] < 1.0, losses
