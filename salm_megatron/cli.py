"""The ``salm`` command line. Each subcommand has ``--help`` with an example."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from .config import Config, ConfigError, apply_overrides, load_config


def _config_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="salm config",
        description="Print the resolved config: a YAML/JSON file (or the defaults) plus overrides.",
        epilog="example: salm config run.yaml llm.preset=llama3-8b "
        "parallel.tensor_model_parallel_size=4",
    )
    parser.add_argument("file", nargs="?", help="YAML or JSON config (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument(
        "--world-size", type=int, help="also check the layout fits this many processes"
    )
    args = parser.parse_args(argv)
    if args.file and "=" in args.file and not os.path.exists(args.file):  # only overrides
        args.overrides.insert(0, args.file)
        args.file = None
    try:
        config = load_config(args.file) if args.file else Config()
        config = apply_overrides(config, args.overrides)
        if args.world_size is not None:
            config.parallel.validate_world(args.world_size)
    except ConfigError as err:
        print(f"salm config: error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def _demo_command(argv: list[str]) -> int:
    from .demo.run import main as demo_main

    return demo_main(argv)


def _bench_data_command(argv: list[str]) -> int:
    from .bench import data_main

    return data_main(argv)


def _bench_decode_command(argv: list[str]) -> int:
    from .bench import decode_main

    return decode_main(argv)


def _bench_train_command(argv: list[str]) -> int:
    from .bench_train import main as bench_train_main

    return bench_train_main(argv)


def _bench_command(argv: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(argv)


def _train_command(argv: list[str]) -> int:
    from .train import main as train_main

    return train_main(argv)


def _eval_command(argv: list[str]) -> int:
    from .inference.commands import eval_main

    return eval_main(argv)


def _transcribe_command(argv: list[str]) -> int:
    from .inference.commands import transcribe_main

    return transcribe_main(argv)


def _convert_command(argv: list[str]) -> int:
    from .convert.commands import main as convert_main

    return convert_main(argv)


def _export_command(argv: list[str]) -> int:
    from .convert.speech_model import export_main

    return export_main(argv)


def _import_command(argv: list[str]) -> int:
    from .convert.speech_model import import_main

    return import_main(argv)


def _shards_command(argv: list[str]) -> int:
    from .data.shards import main as shards_main

    return shards_main(argv)


COMMANDS = {
    "train": (_train_command, "train SALM or BESTOW from a config (also under torchrun)"),
    "eval": (_eval_command, "decode shards with a checkpoint; WER/BLEU/accuracy per task"),
    "transcribe": (_transcribe_command, "transcribe (or answer about) audio files"),
    "config": (_config_command, "print and validate a resolved config"),
    "demo": (_demo_command, "train a small speech LLM on synthesized speech (TP=2, 2 CPUs)"),
    "bench": (_bench_command, "encoder throughput and SALM vs BESTOW step time on this machine"),
    "bench-data": (_bench_data_command, "loader throughput: decode + log-mel, per worker"),
    "bench-decode": (
        _bench_decode_command,
        "decoding speed: greedy vs beam, with and without the KV cache",
    ),
    "bench-train": (
        _bench_train_command,
        "training throughput: naive, bucketed, packed and a Hugging Face baseline",
    ),
    "shards": (_shards_command, "NeMo-style JSONL manifests -> webdataset shards + index.json"),
    "convert": (_convert_command, "checkpoints from/to Hugging Face and NeMo (see its --help)"),
    "export": (
        _export_command,
        "a speech model's checkpoint -> HF LLM + speech.safetensors, or a Qwen2-Audio folder",
    ),
    "import": (
        _import_command,
        "`salm export` output or a Qwen2-Audio folder -> checkpoint for eval/transcribe/train",
    ),
}


def setup_logging() -> None:
    """INFO on rank 0 and WARNING elsewhere; Megatron's INFO (it lists every parameter) muted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger().setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    width = max(map(len, COMMANDS))
    usage = "usage: salm COMMAND [--help] ...\n\ncommands:\n" + "".join(
        f"  {name:<{width}} {help_}\n" for name, (_, help_) in COMMANDS.items()
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage + "\nexample: salm demo", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"salm: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
        return 2
    return command[0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
