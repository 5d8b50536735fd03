"""The demo's picture: training and validation loss, and validation WER and answer accuracy, over
steps, read from a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train, valid) records by step; after a resume the last record of a step counts."""
    train, valid = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        (train if record["kind"] == "train" else valid)[record["step"]] = record
    return train, valid


def plot_run(metrics: Path, png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = read_metrics(metrics)
    steps = sorted(train)
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot(steps, [train[s]["loss"] for s in steps], lw=0.8, label="train loss (LLM)")
    if any("ctc_loss" in r for r in train.values()):
        ctc = [s for s in steps if "ctc_loss" in train[s]]
        losses.plot(ctc, [train[s]["ctc_loss"] / 10 for s in ctc], lw=0.8,
                    label="train CTC loss / 10 (per utterance)")  # fmt: skip
    checked = sorted(valid)
    losses.plot(checked, [valid[s]["loss"] for s in checked], "o-", label="validation loss")
    losses.set(xlabel="step", ylabel="loss per answer token", yscale="log", title="loss")
    losses.legend()
    if any("wer" in valid[s] for s in checked):
        scored = [s for s in checked if "wer" in valid[s]]
        scores.plot(scored, [100 * valid[s]["wer"] for s in scored], "o-", label="WER (%)")
        scores.plot(scored, [100 * valid[s]["answer_accuracy"] for s in scored], "s-",
                    label="answers exactly right (%)")  # fmt: skip
        scores.set(xlabel="step", ylim=(0, 105), title="validation, decoded (unseen voices)")
        scores.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png
