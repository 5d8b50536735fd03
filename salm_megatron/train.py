"""``salm train`` / ``torchrun -m salm_megatron.train``: train SALM or BESTOW as a config says.

One process trains on its own (world size 1); under torchrun (or srun setting RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) every process runs this same code. The run resumes from the newest
complete checkpoint in ``<train.output_dir>/checkpoints``; ``checkpoint.start_over=true`` moves an
earlier run's outputs into ``<train.output_dir>/old-run-N`` and starts afresh (``resume=false``
over checkpoints is refused), and a resume that would read the data otherwise is refused.
SIGUSR1 or SIGTERM saves a checkpoint at the next step and exits with ``EXIT_REQUEUE`` (75), which
the sbatch scripts in ``slurm/`` answer with a requeue.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .cli import setup_logging
from .config import Config, ConfigError, apply_overrides, load_config

# sysexits' EX_TEMPFAIL: a stop signal ended training after a checkpoint; run it again to resume.
EXIT_REQUEUE = 75

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
    try:
        config = load_config(args.file) if args.file else Config()
        config = apply_overrides(config, args.overrides)
    except ConfigError as err:
        print(f"salm train: error: {err}", file=sys.stderr)
        return 2
    return _train(config)


def _train(config: Config) -> int:
    """Train, and turn the errors a user can fix into one line and an exit status. Every rank
    finds a config error alike, so rank 0 alone reports it; other stops may be one rank's own."""
    from .data.loader import NoSamplesError
    from .training import Preempted, TrainingError, train

    try:
        train(config)
    except ConfigError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"salm train: error: {err}", file=sys.stderr)
        return 2
    except NoSamplesError as err:
        print(f"salm train: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"salm train: stopped: {err}", file=sys.stderr)
        return 1
    except Preempted as err:
        print(f"salm train: preempted: {err}", file=sys.stderr)
        return EXIT_REQUEUE
    return 0


def slurm_task_environment(environ=os.environ) -> None:
    """Under ``srun`` with one task per GPU and no torchrun (NeMo-Run's SLURM executor): rank,
    world size and local rank from SLURM's task variables; the rendezvous on the node srun was
    started from, at a port derived from the job id. Nothing changes where ``RANK`` is set."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ.setdefault("MASTER_ADDR", environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000))


def run(config: Config) -> None:
    """Train ``config`` in this process: the target of the NeMo-Run recipes (``recipes/``),
    which build the config in Python. Exits with ``main``'s status when it is not 0."""
    slurm_task_environment()
    root = logging.getLogger()
    for handler in list(root.handlers):  # a warning while NeMo-Run loaded the recipe set them up
        root.removeHandler(handler)
    setup_logging()
    status = _train(config)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    sys.exit(main())
