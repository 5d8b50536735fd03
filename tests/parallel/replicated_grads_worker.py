"""Worker for test_replicated_grads.py: a tiny BESTOW at TP=2 under Megatron's DDP, each rank's
gradient buffers filled with its own value (rank + 1, as drifted replicas would differ), then
reduce_replicated_grads; writes each part's gradient value to ``rank<r>.json``."""

import argparse
import json
from pathlib import Path

import torch

from salm_megatron import parallel
from salm_megatron.config import ParallelConfig
from salm_megatron.models import build_speech_llm
from salm_megatron.models.audio_split import reduce_replicated_grads
from salm_megatron.training.optimizer import wrap_ddp
from tests.speech_fixtures import tiny_config


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--split", action="store_true")
    args = ap.parse_args()
    layout = ParallelConfig(tensor_model_parallel_size=2, split_audio_over_tp=args.split)
    cfg = tiny_config("bestow", layout, ctc_weight=0.3)
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    rank = torch.distributed.get_rank()
    chunks = build_speech_llm(cfg)
    model = wrap_ddp(cfg, chunks)
    for param in model[0].module.parameters():
        param.main_grad.fill_(rank + 1.0)
    reduce_replicated_grads(model, split=args.split)
    parts = {}
    for name, param in model[0].module.named_parameters():
        values = param.main_grad.unique().tolist()
        parts.setdefault(name.split(".")[0], set()).update(values)
    result = {part: sorted(values) for part, values in parts.items()}
    (args.workdir / f"rank{rank}.json").write_text(json.dumps(result))
    parallel.teardown()


if __name__ == "__main__":
    main()
