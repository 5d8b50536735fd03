"""Worker for test_optimizer_formats.py. ``save``: a tiny SALM trained 2 steps under the
distributed optimizer (at this job's DP size), then saved twice, once per optimizer format.
``load``: each checkpoint loaded into a fresh model and optimizer at this job's DP size; writes
whether every optimizer tensor matches between the two, and the next step's loss from each."""

import argparse
import json
from pathlib import Path

import torch

from salm_megatron import parallel
from salm_megatron.models import build_speech_llm
from salm_megatron.training import checkpoint
from salm_megatron.training.optimizer import build_optimizer, wrap_ddp
from tests.speech_fixtures import ddp_step, tiny_config

FORMATS = ("dp_reshardable", "fully_reshardable")


def setup(cfg, seed: int):
    torch.manual_seed(seed)
    chunks = build_speech_llm(cfg)
    model = wrap_ddp(cfg, chunks)
    optimizer, _ = build_optimizer(cfg, model, torch.float32)
    return chunks, model, optimizer


def whole_state(optimizer) -> dict[str, torch.Tensor]:
    """This rank's share of each model parameter's optimizer state (main parameter, Adam's
    moments and step), by parameter name: at DP=1 all of it."""
    found = {}
    for part in optimizer.chained_optimizers:
        names = {id(p): n for chunk in part.model_chunks for n, p in chunk.named_parameters()}
        for param, (group, order) in part.model_param_group_index_map.items():
            main = part.optimizer.param_groups[group]["params"][order]
            state = {"param": main, **part.optimizer.state[main]}
            for key, value in state.items():
                found[f"{names[id(param)]}.{key}"] = value.detach().clone()
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args()
    cfg = tiny_config("salm")
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    rank = torch.distributed.get_rank()
    if args.mode == "save":
        chunks, model, optimizer = setup(cfg, seed=0)
        losses = [ddp_step(model, optimizer) for _ in range(2)]
        for fmt in FORMATS:
            checkpoint.save(args.workdir / fmt, 2, chunks, optimizer, {}, {}, None,
                            optimizer_format=fmt)  # fmt: skip
        result = {"losses": losses, "next": ddp_step(model, optimizer)}
    else:
        loaded, result = {}, {}
        for fmt in FORMATS:
            chunks, model, optimizer = setup(cfg, seed=1)
            checkpoint.load(args.workdir / fmt / checkpoint.step_name(2), chunks, optimizer)
            loaded[fmt] = whole_state(optimizer)
            result[f"next {fmt}"] = ddp_step(model, optimizer)
        a, b = (loaded[fmt] for fmt in FORMATS)
        result["same keys"] = sorted(a) == sorted(b)
        result["differing"] = sorted(k for k in a if k in b and not torch.equal(a[k], b[k]))
        result["tensors"] = len(a)
    (args.workdir / f"{args.mode}-rank{rank}.json").write_text(json.dumps(result))
    parallel.teardown()


if __name__ == "__main__":
    main()
