"""``salm demo``: train a small speech LLM on synthesized speech and show that it works.

Every step goes through the same commands a user runs at scale: espeak-ng speech ->
``salm shards`` -> ``salm train`` (TP=2 on two CPU processes, checkpoints, tensorboard) ->
``salm eval`` on voices never heard in training -> a PNG of the curves. Each step reuses what an
earlier run left (dataset, shards, tokenizer, checkpoints), so a re-run is quick and an
interrupted run resumes training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .plot import plot_run
from .speech_data import all_words, espeak_available, synthesize

# The model and its training: sized to learn the task on 2 CPU cores in about 9 minutes (1.6 M
# parameters; the README has the measured figures).
MODEL = {
    "encoder": {
        "d_model": 96, "num_layers": 3, "num_heads": 4, "subsampling_conv_channels": 32,
        "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_att": 0.0,
        "features": {"n_mels": 64},
        "spec_augment": {"freq_masks": 2, "freq_width": 10, "time_masks": 2, "time_width": 0.05},
    },
    "adapter": {"type": "mlp", "stack": 1},
    "llm": {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 384,
            "num_attention_heads": 4, "num_query_groups": 4},
    "bestow": {"num_layers": 2, "num_heads": 4},
}  # fmt: skip
TRAINING = {
    "data": {"prompt_format": "plain", "micro_batch_size": 32, "bucket_window": 256,
             "shuffle_buffer": 512, "num_workers": 0},
    "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 150, "weight_decay": 0.01,
              "clip_grad": 1.0},
    "train": {"num_microbatches": 1, "log_interval": 50, "eval_interval": 200,
              "eval_iters": 4, "eval_wer_samples": 64},
    "checkpoint": {"interval": 200, "keep": 2},
    "decode": {"batch_size": 32, "max_new_tokens": 24},
}  # fmt: skip
CTC_WEIGHT = 0.5
# BESTOW's steps are cheaper (the LLM's sequence stays text-length) and it needs more of them:
# it has to learn to align text with audio, which SALM's joint attention gets from RoPE.
STEPS = {"salm": 1200, "bestow": 1600}


def log(message: str) -> None:
    print(f"salm demo: {message}", flush=True)


def build_tokenizer(folder: Path) -> Path:
    """A word-level sentencepiece model of the demo's words (reused when present)."""
    model = folder / "tokenizer.model"
    if model.is_file():
        return model
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "words.txt"
    text.write_text("\n".join(all_words()) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), model_type="word",
        vocab_size=len(" ".join(all_words()).split()) + 4, hard_vocab_limit=False,
        bos_id=1, eos_id=2, pad_id=3, unk_id=0, minloglevel=2,
    )  # fmt: skip
    return model


def make_shards(speech: Path, shards: Path) -> None:
    from ..data.shards import main as shards_main

    for split in ("train", "valid", "test"):
        out = shards / split
        if (out / "index.json").is_file():
            continue
        log(f"shards: {split}")
        code = shards_main([str(speech / f"{split}.jsonl"), "--out", str(out), "--workers", "2",
                            "--max-shard-samples", "2000", "--overwrite"])  # fmt: skip
        if code != 0:
            raise RuntimeError(f"salm shards failed for {split} (exit {code})")


def _pattern(folder: Path) -> str:
    count = len(list(folder.glob("shard-*.tar")))
    return str(folder / f"shard-{{000000..{count - 1:06d}}}.tar")


def run_config(root: Path, arch: str, tokenizer: Path) -> dict:
    from ..data import load_tokenizer

    tok = load_tokenizer(tokenizer)
    config = {"model": {"arch": arch, "audio_token_id": tok.audio_token_id,
                        "ctc_weight": CTC_WEIGHT}, **MODEL}  # fmt: skip
    config["llm"] = {**MODEL["llm"], "vocab_size": tok.vocab_size}
    config["parallel"] = {"tensor_model_parallel_size": 2}
    config.update({section: dict(values) for section, values in TRAINING.items()})
    config["data"].update(train_shards=_pattern(root / "shards" / "train"),
                          valid_shards=_pattern(root / "shards" / "valid"),
                          tokenizer=str(tokenizer))  # fmt: skip
    config["train"].update(steps=STEPS[arch], output_dir=str(root / arch / "run"))
    return config


def torchrun(module: str, *args: str) -> int:
    """``module`` on 2 processes (one thread each), as the demo's TP=2 layout wants."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", module, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.call(cmd, env=env)


def summary(root: Path, arch: str, metrics: dict, seconds: float) -> str:
    """Where everything is, and what to run next."""
    run, rel = root / arch, os.path.relpath(root)
    asr, qa = metrics["asr"], metrics["qa"]
    other_arch = (
        "SALM instead:       make demo              (or: salm demo --arch salm)"
        if arch == "bestow"
        else "BESTOW instead:     make demo BESTOW=1     (or: salm demo --arch bestow)"
    )
    outputs = "\n".join(f"    {name:<19}{what}" for name, what in (
        ("speech/", "espeak-ng WAVs and manifests (train/valid/test.jsonl)"),
        ("shards/", "webdataset shards written by `salm shards`"),
        ("tokenizer/", "the word-level sentencepiece model"),
        (f"{arch}/run.yaml", "the training config"),
        (f"{arch}/run/", "checkpoints/, tensorboard/, metrics.jsonl"),
        (f"{arch}/eval/", "predictions.jsonl, metrics.json"),
        (f"{arch}/curves.png", "losses, validation WER and answer accuracy over steps"),
    ))  # fmt: skip
    return f"""
salm demo: done in {seconds / 60:.1f} min
  test split (voices never heard in training):
    transcription   WER {100 * asr["wer"]:.2f}%  ({asr["count"]} utterances)
    questions       accuracy {100 * qa["accuracy"]:.1f}%  ({qa["count"]} utterances)
  in {rel}/:
{outputs}
  (the commands below run in the project's environment: source .venv/bin/activate)
  continue training:  torchrun --nproc-per-node 2 -m salm_megatron.train {rel}/{arch}/run.yaml \\
                          train.steps={2 * STEPS[arch]}
  {other_arch}
  transcribe a file:  salm transcribe --checkpoint {rel}/{arch}/run FILE.wav
  ask about numbers:  salm transcribe --checkpoint {rel}/{arch}/run FILE.wav \\
                          --prompt "How many numbers are there?"
  tensorboard:        tensorboard --logdir {os.path.relpath(run / "run" / "tensorboard")}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="salm demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  salm demo\n  salm demo --arch bestow --out demo",
    )
    parser.add_argument("--out", default="demo", help="folder for everything (default: demo)")
    parser.add_argument("--arch", choices=("salm", "bestow"), default="salm")
    default_steps = f"{STEPS['salm']} SALM, {STEPS['bestow']} BESTOW"
    parser.add_argument("--steps", type=int, help=f"training steps (default: {default_steps})")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="dataset size factor (tests use a tiny one)"
    )
    args = parser.parse_args(argv)
    root = Path(args.out).resolve()
    start = time.time()
    if not espeak_available():
        log(
            "espeak-ng is not installed; install it (Debian/Ubuntu: sudo apt-get install "
            "espeak-ng, macOS: brew install espeak-ng) or run `make demo`, which tries"
        )
        return 2
    synthesize(root / "speech", scale=args.scale, log=log)
    tokenizer = build_tokenizer(root / "tokenizer")
    make_shards(root / "speech", root / "shards")
    config = run_config(root, args.arch, tokenizer)
    if args.steps:
        config["train"]["steps"] = args.steps
    run_dir = root / args.arch
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log(f"training {args.arch.upper()}, TP=2 on 2 processes ({time.time() - start:.0f} s so far)")
    if torchrun("salm_megatron.train", str(run_dir / "run.yaml")) != 0:
        log("training failed (see above); run again to resume from the last checkpoint")
        return 1
    log(f"evaluating on the test split ({time.time() - start:.0f} s so far)")
    eval_dir = run_dir / "eval"
    code = torchrun("salm_megatron.inference.commands", "eval", "--checkpoint",
                    str(run_dir / "run"), "--data", _pattern(root / "shards" / "test"),
                    "--out", str(eval_dir))  # fmt: skip
    if code != 0:
        log("evaluation failed (see above)")
        return 1
    title = f"salm demo: {args.arch.upper()} on espeak-ng speech, TP=2 on 2 CPU processes"
    plot_run(run_dir / "run" / "metrics.jsonl", run_dir / "curves.png", title)
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    print(summary(root, args.arch, metrics, time.time() - start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
