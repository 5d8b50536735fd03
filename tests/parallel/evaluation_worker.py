"""Worker for test_evaluation_parallel.py: the data-parallel ranks decode their shares of one
shard (no duration limits, so a clip the Whisper encoder refuses reaches it), gather, and write
what they hold: every rank ``rank<r>.json``; rank 0 also the results folder ``out``."""

import argparse
import json
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state

from salm_megatron import parallel
from salm_megatron.config import config_from_dict
from salm_megatron.data import load_tokenizer
from salm_megatron.data.loader import SampleStream
from salm_megatron.inference.commands import write_results
from salm_megatron.inference.evaluation import decode_samples, gather
from salm_megatron.inference.generation import Generator
from salm_megatron.models import build_speech_llm


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--shard", required=True)
    args = ap.parse_args()
    cfg = config_from_dict(yaml.safe_load((args.workdir / "config.yaml").read_text()))
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    torch.manual_seed(0)
    (model,) = build_speech_llm(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    generator = Generator.for_tokenizer(model, cfg.decode, tokenizer, cfg.data.prompt_format)
    stream = SampleStream(
        args.shard, dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(), shuffle=False, shuffle_buffer=0,
        drop_empty_answer=False,
    )  # fmt: skip
    decoded = decode_samples(stream, generator, tokenizer, cfg)
    local = {"keys": [r["key"] for r in decoded.rows], "failures": decoded.failures}
    decoded, skipped = gather(decoded, stream.stats)
    rank = torch.distributed.get_rank()
    if rank == 0:
        write_results(args.workdir / "out", decoded, skipped, cfg, "ckpt", [args.shard], 1.0)
    result = {"local": local, "keys": [r["key"] for r in decoded.rows],
              "failures": decoded.failures}  # fmt: skip
    (args.workdir / f"rank{rank}.json").write_text(json.dumps(result))
    parallel.teardown()


if __name__ == "__main__":
    main()
