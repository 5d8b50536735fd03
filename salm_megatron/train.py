"""``salm train`` / ``torchrun -m salm_megatron.train``: train SALM or BESTOW as a config says.

One process trains on its own (world size 1); under torchrun (or srun setting RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) every process runs this same code. The run resumes from the newest
complete checkpoint in ``<train.output_dir>/checkpoints`` unless ``checkpoint.resume=false``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import setup_logging
from .config import Config, ConfigError, apply_overrides, load_config

EXAMPLE = """examples:
  salm train run.yaml train.steps=2000 optim.lr=3e-4
  torchrun --nproc-per-node 8 -m salm_megatron.train run.yaml \\
      parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2

a minimal run.yaml:
  model: {arch: salm}
  llm: {preset: llama3.2-1b}
  encoder: {preset: fastconformer-large}
  data: {train_shards: "data/train/shard-{000000..000099}.tar", tokenizer: llama3/tokenizer.json,
         prompt_format: llama3}
  train: {steps: 2000, output_dir: runs/salm-1b}
  checkpoint: {pretrained_llm: ckpt/llama3.2-1b, pretrained_encoder: ckpt/fastconformer}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="salm train",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", nargs="?", help="YAML or JSON config (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    if args.file and "=" in args.file and not os.path.exists(args.file):
        args.overrides.insert(0, args.file)
        args.file = None
    setup_logging()
    from .training import TrainingError, train

    try:
        config = load_config(args.file) if args.file else Config()
        config = apply_overrides(config, args.overrides)
        train(config)
    except ConfigError as err:
        print(f"salm train: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"salm train: stopped: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
