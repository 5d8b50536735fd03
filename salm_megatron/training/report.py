"""What a run tells its user (rank 0 only): a console progress line with ETA, tensorboard scalars,
and ``metrics.jsonl`` (one JSON object per step or validation; after a resume the repeated steps
appear again, and the last record of a step is the one that counts)."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch

log = logging.getLogger("salm.train")


def peak_memory_gb() -> float:
    """Peak GPU memory allocated on GPU; peak resident memory of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Reporter:
    """Writes every step's scalars; prints a progress line every ``log_interval`` steps."""

    def __init__(self, output_dir: Path, total_steps: int, log_interval: int, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        self.jsonl = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.total, self.interval = total_steps, log_interval
        self.start, self.first_step = time.time(), first_step

    def _write(self, record: dict, prefix: str) -> None:
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        self.jsonl.write(json.dumps({"kind": prefix, **record}) + "\n")
        self.jsonl.flush()

    def step(self, record: dict) -> None:
        self._write(record, "train")
        step = record["step"]
        if step % self.interval and step not in (self.first_step, self.total):
            return
        done = step - self.first_step + 1
        elapsed = time.time() - self.start
        eta = elapsed / done * (self.total - step)
        extra = f" | CTC {record['ctc_loss']:.3f}" if "ctc_loss" in record else ""
        if "load_balancing_loss" in record:  # MoE routers' (llm/moe.py), without coefficient
            extra += f" | load balancing {record['load_balancing_loss']:.4f}"
        if record.get("skipped_samples"):
            reasons = ", ".join(f"{r} {n}" for r, n in record["skipped"].items())
            extra += f" | skipped samples {record['skipped_samples']} ({reasons})"
        if record["skipped_steps"]:
            extra += f" | skipped steps {record['skipped_steps']}"
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s (%.0f%% useful) | "
            "%.1f audio s/s | %.2f s/step | peak mem %.1f GiB%s | ETA %s",
            step, self.total, record["loss"], record["lr"], record["grad_norm"],
            record["tokens_per_s"], 100 * record["useful_token_fraction"],
            record["audio_s_per_s"], record["step_time"],
            record["peak_memory_gb"], extra, duration(eta),
        )  # fmt: skip

    def validation(self, record: dict) -> None:
        self._write(record, "valid")
        decoded = ""
        if "wer" in record:
            decoded += f" | WER {100 * record['wer']:.2f}%"
        if "answer_accuracy" in record:
            decoded += f" | answer accuracy {100 * record['answer_accuracy']:.1f}%"
        log.info(
            "validation at step %d | loss %.4f | token accuracy %.3f%s",
            record["step"], record["loss"], record["accuracy"], decoded,
        )  # fmt: skip

    def close(self) -> None:
        self.tensorboard.close()
        self.jsonl.close()
