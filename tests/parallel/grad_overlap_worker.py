"""Worker for test_grad_overlap.py: the training loop's own Trainer runs a few steps and a
validation with DDP's overlapped gradient reduction and parameter all-gather off, then on (in
small buckets); writes per mode each step's loss and grad norm, the validation loss, the bucket
counts, how many bucket reductions started before ``finalize_model_grads``, and whether the
parameters were equal over DP ranks before and inside ``whole_parameters``, to
``<mode>-rank<r>.json``."""

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

from salm_megatron import parallel
from salm_megatron.config import absolute_paths, apply_overrides, load_config
from salm_megatron.training.loop import Trainer
from salm_megatron.training.optimizer import SpeechDDP, whole_parameters

STEPS = 3


class ReductionsInBackward:
    """Counts the bucket reductions that start while the backward pass still runs (before
    ``finalize_model_grads`` reaches ``finish_grad_sync``): the overlap at work. The real
    methods run unchanged."""

    def __init__(self):
        self.count, self.in_backward = 0, True
        start, finish = _ParamAndGradBucketGroup.start_grad_sync, SpeechDDP.finish_grad_sync

        def counted_start(group, *args, **kwargs):
            self.count += self.in_backward
            return start(group, *args, **kwargs)

        def counted_finish(ddp, *args, **kwargs):
            self.in_backward = False
            return finish(ddp, *args, **kwargs)

        _ParamAndGradBucketGroup.start_grad_sync = counted_start
        SpeechDDP.finish_grad_sync = counted_finish

    def step(self, trainer: Trainer) -> tuple[dict, int]:
        self.count, self.in_backward = 0, True
        record = trainer.train_step()
        return record, self.count


def equal_over_dp(trainer: Trainer) -> bool:
    """Whether every parameter of this rank equals its data-parallel peers' bit for bit."""
    flat = torch.cat([p.detach().flatten() for c in trainer.chunks for p in c.parameters()])
    group = parallel_state.get_data_parallel_group()
    peers = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(peers, flat, group=group)
    same = torch.tensor(float(all(torch.equal(flat, p) for p in peers)))
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    return bool(same)


def run(cfg, overlap: bool, output_dir: Path, counter: ReductionsInBackward) -> dict:
    flag = str(overlap).lower()
    cfg = apply_overrides(cfg, [
        f"optim.overlap_grad_reduce={flag}", f"optim.overlap_param_gather={flag}",
        f"train.output_dir={output_dir}",
    ])  # fmt: skip
    parallel.set_seed(cfg.seed)  # the same initial weights in both modes
    trainer = Trainer(cfg)
    steps = [counter.step(trainer) for _ in range(STEPS)]
    equal_before = equal_over_dp(trainer)
    with whole_parameters(trainer.model):
        equal_inside = equal_over_dp(trainer)
    valid = trainer.evaluate()
    trainer.save()
    return {
        "loss": [record["loss"] for record, _ in steps],
        "grad_norm": [record["grad_norm"] for record, _ in steps],
        "applied": [record["applied"] for record, _ in steps],
        "reductions_in_backward": [count for _, count in steps],
        "valid_loss": valid["loss"],
        "buckets": [sum(len(b.buckets) for b in chunk.buffers) for chunk in trainer.model],
        "equal_over_dp_before_gather": equal_before,
        "equal_over_dp_inside_whole_parameters": equal_inside,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("config", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = absolute_paths(apply_overrides(load_config(args.config), args.overrides))
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    microbatches = cfg.train.microbatches(cfg.data, parallel_state.get_data_parallel_world_size())
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, num_microbatches=microbatches)
    )
    counter = ReductionsInBackward()
    rank = torch.distributed.get_rank()
    for overlap in (False, True):
        mode = "on" if overlap else "off"
        result = run(cfg, overlap, args.workdir / mode, counter)
        (args.workdir / f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    parallel.teardown()


if __name__ == "__main__":
    main()
