"""A converted encoder on disk: what ``checkpoint.pretrained_encoder=DIR`` loads, and its config.

``DIR/`` is a Megatron dist checkpoint of the encoder alone (``training.checkpoint.save_module``;
loads at any TP/PP) with ``DIR/encoder.yaml`` beside it: the ``encoder:`` section of a run config
that builds the very module the weights belong to (for Whisper also ``data.max_duration``, which
must not exceed what it takes). Written under a temporary name in the same folder and renamed
when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from salm_megatron import parallel
from salm_megatron.audio import build_encoder
from salm_megatron.config import ConfigError, EncoderConfig
from salm_megatron.training import checkpoint

log = logging.getLogger("salm.convert")

CONFIG_NAME = "encoder.yaml"


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor the module needs, of its shape, and nothing else; else name the differences."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            problems.append(f"{what}: {', '.join(keys[:8])}{more}")
    if problems:
        raise ValueError(
            f"{source}: the encoder weights do not fit the encoder its config describes; "
            + "; ".join(problems)
        )


def write_encoder(
    cfg: EncoderConfig, state: dict[str, torch.Tensor], out: str | Path, source: str
) -> torch.nn.Module:
    """Load ``state`` into the encoder ``cfg`` describes (strictly) and write it to ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; choose another")
    encoder = build_encoder(cfg)
    check_state_dict(encoder, state, source)
    encoder.load_state_dict(state, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():  # left by a killed conversion
        shutil.rmtree(tmp)
    with parallel.single_process():
        checkpoint.save_module(encoder, tmp)
    sections: dict = {"encoder": dataclasses.asdict(cfg)}
    if cfg.type == "whisper":  # the longest input its position table holds (30 s)
        longest = 2 * cfg.max_source_positions * cfg.features.window_stride
        sections["data"] = {"max_duration": round(longest, 6)}
    text = yaml.safe_dump(sections, sort_keys=False)
    (tmp / CONFIG_NAME).write_text(f"# converted from {source}\n{text}")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    count = sum(p.numel() for p in encoder.parameters())
    log.info("wrote the %s encoder (%d parameters) to %s", cfg.type, count, out)
    return encoder


def run_cli(
    argv, prog: str, description: str, source: tuple[str, str], convert: Callable, epilog: str
) -> int:
    """The command line of an encoder conversion: ``source`` (flag, help) and ``--out`` into
    ``convert(source, out)``; bad input is one ``prog: error:`` line and exit status 2."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(source[0], required=True, dest="source", help=source[1])
    parser.add_argument("--out", required=True, help="a new folder for the converted encoder")
    args = parser.parse_args(argv)
    try:
        convert(args.source, args.out)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
