"""``salm eval`` and ``salm transcribe``: decode with a trained checkpoint.

Both run in one process or under torchrun: the ranks form TP groups of ``--tensor-parallel``
(default: all of them) that decode together; with several groups, ``salm eval`` splits the shards'
samples over them (data parallel) and rank 0 gathers the predictions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from megatron.core import parallel_state

from .. import parallel
from ..cli import setup_logging
from ..config import ConfigError
from ..data.audio_io import AudioError, decode
from ..data.collate import SpeechSample
from ..data.loader import expand_shards
from ..data.prompts import DEFAULT_INSTRUCTIONS, generation_prompt
from ..training.report import duration
from .evaluation import (
    Decoded,
    decode_samples,
    describe,
    duration_problem,
    evaluation_stream,
    failure_message,
    gather,
)
from .loading import load_generator, prepare
from .metrics import format_table, metrics_json, task_metrics

log = logging.getLogger("salm.inference")

# Command-line flags of config fields, by help group: flag -> (field, type, help).
CONFIG_FLAGS = {
    "decoding (config fields decode.*)": {
        "--strategy": ("decode.strategy", str, "greedy | sample | beam"),
        "--max-new-tokens": ("decode.max_new_tokens", int, "stop after this many tokens"),
        "--beam-size": ("decode.beam_size", int, "beam search width"),
        "--length-penalty": ("decode.length_penalty", float,
                             "beam: rank by log-prob / length ** this"),
        "--temperature": ("decode.temperature", float, "sample: logits / temperature"),
        "--top-k": ("decode.top_k", int, "sample: only the k likeliest tokens (0: all)"),
        "--top-p": ("decode.top_p", float, "sample: nucleus probability mass"),
        "--seed": ("decode.seed", int, "sample: random seed (with each sample's key)"),
        "--batch-size": ("decode.batch_size", int, "utterances decoded together"),
        "--system": ("decode.system_prompt", str,
                     "system turn opening each prompt (data.prompt_format=chat)"),
    },
    "audio durations (config fields data.*; default: the checkpoint's)": {
        "--min-duration": ("data.min_duration", float, "skip (and count) shorter audio, seconds"),
        "--max-duration": ("data.max_duration", float, "skip (and count) longer audio, seconds"),
    },
}  # fmt: skip


def _parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder, its checkpoints/, or one step_N folder"
    )
    parser.add_argument("--tokenizer", help="instead of the checkpoint's data.tokenizer")
    parser.add_argument(
        "--tensor-parallel", type=int, help="ranks decoding together (default: all ranks)"
    )
    for title, flags in CONFIG_FLAGS.items():
        group = parser.add_argument_group(title)
        for flag, (name, kind, text) in flags.items():
            group.add_argument(flag, dest=name, type=kind, help=text)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides"
    )
    return parser


def config_overrides(args) -> list[str]:
    """The ``key=value`` overrides of the flags given (then ``--set``'s)."""
    return [
        # text is quoted: an override reads YAML ("Answer: briefly" would be a mapping)
        f"{name}={json.dumps(value) if kind is str else value}"
        for flags in CONFIG_FLAGS.values()
        for name, kind, _ in flags.values()
        if (value := getattr(args, name)) is not None
    ] + list(args.set)


def _start(args) -> tuple:
    """Parallel state, then the checkpoint as a generator: (cfg, generator, tokenizer, path)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    tp = args.tensor_parallel or world
    cfg, path = prepare(args.checkpoint, tp, config_overrides(args))
    if cfg.decode.system_prompt is not None and cfg.data.prompt_format != "chat":
        raise ConfigError(
            f"decode.system_prompt (--system) needs data.prompt_format=chat (the tokenizer's chat "
            f"template); the checkpoint's data.prompt_format={cfg.data.prompt_format!r} has no "
            "system turn"
        )
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    generator, tokenizer = load_generator(cfg, path, args.tokenizer)
    return cfg, generator, tokenizer, path


def _run(main, prog: str) -> int:
    """Run ``main()`` with logging set up; bad input -> exit code 2 with one line."""
    setup_logging()
    try:
        return main()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if parallel.is_initialized():
            parallel.teardown()


# ------------------------------------------------------------------------------------- eval


EVAL_EXAMPLE = """example:
  salm eval --checkpoint runs/salm --data "data/test/shard-{000000..000003}.tar" --out eval/test
  torchrun --nproc-per-node 2 -m salm_megatron.inference.commands eval --checkpoint runs/salm \\
      --data data/test/*.tar --out eval/test --strategy beam --beam-size 4

writes OUT/predictions.jsonl (key, task, lang, context, reference, prediction, duration) and
OUT/metrics.json; prints a table of WER/CER (asr tasks), BLEU (translation) and accuracy.
Text is normalised before WER/CER/accuracy: NFKC, lowercase, punctuation removed, spaces folded.
Audio outside data.min_duration..data.max_duration (the checkpoint's, or --min-duration and
--max-duration) is skipped and counted; empty references are scored. A batch that fails is named
in metrics.json and the log, the others are still decoded and written, and the exit code is 1.
"""


def _count_samples(shards: list[str]) -> int | None:
    """Samples in the shards, from ``index.json`` beside them (``salm shards``), else None."""
    total = 0
    for folder in {str(Path(s).parent) for s in shards}:
        index = Path(folder) / "index.json"
        if not index.is_file():
            return None
        entries = json.loads(index.read_text())["shards"]
        listed = {Path(e["path"]).name: e["samples"] for e in entries}
        total += sum(listed.get(Path(s).name, 0) for s in shards if str(Path(s).parent) == folder)
    return total


def eval_main(argv: list[str] | None = None) -> int:
    parser = _parser("salm eval", "Decode webdataset shards, score the predictions.", EVAL_EXAMPLE)
    parser.add_argument("--data", nargs="+", required=True, help="shards: paths, globs, braces")
    parser.add_argument("--out", required=True, help="folder for predictions.jsonl, metrics.json")
    parser.add_argument("--limit", type=int, help="decode only the first N samples (per DP rank)")
    args = parser.parse_args(argv)
    return _run(lambda: _evaluate(args), "salm eval")


def _evaluate(args) -> int:
    shards = expand_shards(args.data)
    cfg, generator, tokenizer, path = _start(args)
    dp_size = parallel_state.get_data_parallel_world_size()
    stream = evaluation_stream(cfg, shards, parallel_state.get_data_parallel_rank(), dp_size)
    total = _count_samples(shards)
    rank0 = torch.distributed.get_rank() == 0
    start = time.time()

    def progress(decoded: Decoded) -> None:
        done = (len(decoded.rows) + decoded.failed_samples) * dp_size
        if not (rank0 and done):
            return
        elapsed = time.time() - start
        of = f"/{total}" if total else ""
        eta = f" | ETA {duration(elapsed / done * max(total - done, 0))}" if total else ""
        failed = f" | {decoded.failed_samples} failed" if decoded.failures else ""
        log.info("decoded %d%s utterances | %.1f utt/s%s%s", done, of, done / elapsed, eta, failed)

    decoded = decode_samples(stream, generator, tokenizer, cfg, limit=args.limit,
                             progress=progress)  # fmt: skip
    for failure in decoded.failures:
        log.error("decoding %s failed: %s", ", ".join(failure["keys"]) or "-", failure["error"])
    elapsed = time.time() - start
    decoded, skipped = gather(decoded, stream.stats)  # every rank, even after failures
    if not decoded.rows and not decoded.failures:
        counts = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
        raise ValueError(
            f"no sample could be decoded from {len(shards)} shard(s) (skipped: {counts or 'none'})"
        )
    if rank0:
        write_results(Path(args.out), decoded, skipped, cfg, path, args.data, elapsed)
    if decoded.failures:
        print(f"salm eval: error: {failure_message(decoded)}", file=sys.stderr)
        return 1
    return 0


def write_results(out: Path, decoded: Decoded, skipped: dict, cfg, path, data, elapsed) -> None:
    """predictions.jsonl and metrics.json (strict JSON), then the table."""
    rows = decoded.rows
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics = task_metrics(rows)
    audio = sum(r["duration"] for r in rows)
    summary = {
        "checkpoint": str(path),
        "data": data,
        "metrics": metrics_json(metrics),
        "decode": cfg.to_dict()["decode"],
        "duration_limits": {"min": cfg.data.min_duration, "max": cfg.data.max_duration},
        "utterances": len(rows),
        "skipped_samples": skipped,
        "failed_samples": decoded.failed_samples,
        "failures": decoded.failures,
        "audio_seconds": round(audio, 3),
        "decode_seconds": round(elapsed, 3),
        "real_time_factor": round(elapsed / max(audio, 1e-9), 5),
    }
    text = json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False)
    (out / "metrics.json").write_text(text + "\n")
    if skipped:
        log.warning("skipped samples: %s", ", ".join(f"{r} {n}" for r, n in skipped.items()))
    print(format_table(metrics))
    print(f"predictions: {out / 'predictions.jsonl'}\nmetrics: {out / 'metrics.json'}")


# ------------------------------------------------------------------------------- transcribe


TRANSCRIBE_EXAMPLE = """example:
  salm transcribe --checkpoint runs/salm call.wav note.flac
  salm transcribe --checkpoint runs/salm question.wav --prompt "What is the sum of the numbers?"
  salm transcribe --checkpoint runs/qwen3-salm call.wav --system "You are a careful transcriber."

prints one line per file: PATH<TAB>TEXT. Any sample rate, mono or stereo, WAV/FLAC/OGG.
"""


def transcribe_main(argv: list[str] | None = None) -> int:
    parser = _parser("salm transcribe", "Transcribe (or answer about) audio files.",
                     TRANSCRIBE_EXAMPLE)  # fmt: skip
    parser.add_argument("audio", nargs="+", help="audio files")
    parser.add_argument(
        "--prompt", default=DEFAULT_INSTRUCTIONS["asr"], help="instruction (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    return _run(lambda: _transcribe(args), "salm transcribe")


def _transcribe(args) -> int:
    missing = [a for a in args.audio if not Path(a).is_file()]
    if missing:
        raise FileNotFoundError(f"audio file(s) not found: {', '.join(missing)}")
    cfg, generator, tokenizer, _ = _start(args)
    segments = 1 if cfg.model.arch == "salm" else 0
    ids, _ = generation_prompt(
        tokenizer, cfg.data.prompt_format, args.prompt, segments, system=cfg.decode.system_prompt,
        variables=cfg.data.chat_template_kwargs,
    )  # fmt: skip
    rate = cfg.encoder.features.sample_rate
    failed = 0
    paths = list(args.audio)
    for start in range(0, len(paths), cfg.decode.batch_size):
        chunk, samples = [], []
        for audio_path in paths[start : start + cfg.decode.batch_size]:
            try:
                wave = decode(audio_path, rate)
            except AudioError as err:
                print(f"salm transcribe: {err}", file=sys.stderr)
                failed += 1
                continue
            problem = duration_problem(len(wave) / rate, cfg.data)
            if problem:  # outside what the model was trained on (and Whisper takes)
                print(f"salm transcribe: {audio_path}: skipped, {problem}", file=sys.stderr)
                failed += 1
                continue
            chunk.append(audio_path)
            samples.append(SpeechSample(ids, [0] * len(ids), [wave], key=audio_path))
        try:
            outputs = generator.generate(samples)
        except Exception as err:  # noqa: BLE001 - named, counted, and the next files still run
            print(f"salm transcribe: {', '.join(chunk)}: {describe(err)}", file=sys.stderr)
            failed += len(chunk)
            continue
        for audio_path, tokens in zip(chunk, outputs, strict=True):
            if torch.distributed.get_rank() == 0:
                print(f"{audio_path}\t{generator.text(tokenizer, tokens)}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m salm_megatron.inference.commands eval|transcribe ...`` (torchrun entry)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"eval": eval_main, "transcribe": transcribe_main}
    if not argv or argv[0] not in commands:
        print(f"usage: ... {' | '.join(commands)} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
