"""``salm demo``: train the tiny LLM with TP=2 on two CPU processes and show the loss fall.

A stand-in for the speech demo until the data and training stack land: a synthetic copy task
(the second half of each sequence repeats the first), trained through the same Megatron-Core
pieces training will use (TP, DDP, the distributed Adam optimizer, forward_backward_func).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

import torch

from .config import Config, ParallelConfig

log = logging.getLogger("salm.demo")

SEQ, BATCH = 32, 16
# Tokens drawn from the first 64 ids: a small alphabet makes the copy reliably learnable in 300
# steps (with the full vocabulary, when induction forms depends on the CPU's rounding).
COPY_VOCAB = 64


def _copy_task_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    half = torch.randint(1, COPY_VOCAB, (BATCH, SEQ // 2), generator=g)
    tokens = torch.cat([half, half], dim=1)
    loss_mask = torch.zeros(BATCH, SEQ - 1)
    loss_mask[:, SEQ // 2 - 1 :] = 1.0  # predict the copied half
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    token_loss = model(batch["input_ids"], positions, None, labels=batch["labels"])

    def loss_func(output):
        loss_sum = (output.float() * batch["loss_mask"]).sum()
        tokens = batch["loss_mask"].sum().to(torch.int)
        return loss_sum, tokens, {"loss_sum": loss_sum.detach(), "tokens": tokens}

    return token_loss, loss_func


def train(steps: int, lr: float) -> float:
    """Run in every process of the job; returns the final loss."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from . import parallel
    from .llm import build_llm

    cfg = Config(parallel=ParallelConfig(tensor_model_parallel_size=2))
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    rank0 = torch.distributed.get_rank() == 0
    model = build_llm(cfg.llm, cfg.parallel)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=True
        ),
        [ddp],
    )
    forward_backward = get_forward_backward_func()
    start, loss = time.time(), float("nan")
    for step in range(1, steps + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batch = _copy_task_batch(step)
        out = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter([batch]),
            model=ddp,
            num_microbatches=1,
            seq_length=SEQ - 1,
            micro_batch_size=BATCH,
        )
        optimizer.step()
        loss = (out[0]["loss_sum"] / out[0]["tokens"]).item()
        if rank0 and (step == 1 or step % 10 == 0 or step == steps):
            print(
                f"step {step:4d}/{steps}  loss {loss:.3f}  ({time.time() - start:.1f}s)", flush=True
            )
    parallel.teardown()
    return loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="salm demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: salm demo --steps 300",
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be at least 1")

    if "LOCAL_RANK" in os.environ:  # inside the job
        final = train(args.steps, args.lr)
        return 0 if final < 1.0 else 1

    print(
        "salm demo: tiny Llama-style LLM, TP=2 on 2 CPU processes, synthetic copy task", flush=True
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "salm_megatron.demo",
        f"--steps={args.steps}",
        f"--lr={args.lr}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    code = subprocess.call(cmd, env=env)
    print("salm demo: " + ("done, loss fell below 1.0" if code == 0 else f"failed (exit {code})"))
    return code


if __name__ == "__main__":
    sys.exit(main())
