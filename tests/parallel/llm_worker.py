"""Worker for test_llm_parallel.py: one layout's logits, loss and gradients, compared to TP=PP=1.

Run under torchrun. ``--reference`` (one process) builds the tiny LLM, writes its weights and, after
one forward/backward, its gradients as Megatron dist checkpoints, plus logits and loss. Any other
layout loads those checkpoints (resharded by dist_checkpointing to its TP/PP split), runs the same
global batch through Megatron's forward_backward_func and writes its errors to a JSON file.
"""

import argparse
import json
import os
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from salm_megatron import parallel
from salm_megatron.config import Config, LLMConfig, ParallelConfig
from salm_megatron.llm import build_llm_chunks

GLOBAL_BATCH, SEQ, MICRO_BATCH = 8, 16, 2


def make_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """The same global batch on every rank and layout."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.3).float()
    loss_mask[:, 0] = 1.0  # every sample contributes, with different token counts
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask}


def data_parallel_share(batch):
    """This data-parallel rank's contiguous share of the global batch."""
    dp, rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    share = GLOBAL_BATCH // dp
    return {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}


def microbatches(batch):
    for i in range(0, len(batch["input_ids"]), MICRO_BATCH):
        yield {k: v[i : i + MICRO_BATCH] for k, v in batch.items()}


def forward_step(data_iterator, model, *, want_logits: bool):
    mb = next(data_iterator)
    positions = torch.arange(SEQ).expand_as(mb["input_ids"])
    labels = None if want_logits else mb["labels"]
    output = model(mb["input_ids"], positions, None, labels=labels)

    def loss_func(output, non_loss_data=False):
        if non_loss_data:  # logits [b, s, v/tp] -> [b, s, v]
            return gather_from_tensor_model_parallel_region(output).detach()
        token_loss = output.float() * mb["loss_mask"]
        num_tokens = mb["loss_mask"].sum().to(torch.int)
        return token_loss.sum(), num_tokens, {"loss_sum": token_loss.sum().detach()}

    return output, loss_func


def run(chunks, batch, *, forward_only: bool):
    fb = get_forward_backward_func()
    iterators = [microbatches(batch) for _ in chunks]
    return fb(
        forward_step_func=partial(forward_step, want_logits=forward_only),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batch["input_ids"]) // MICRO_BATCH,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )


def load(chunks, ckpt_dir):
    """Megatron dist-checkpoint load of every chunk, resharded to this layout."""
    sharded = {}
    for i, chunk in enumerate(chunks):
        sharded[f"model{i}"] = chunk.sharded_state_dict()
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    return [state[f"model{i}"] for i in range(len(chunks))]


def save(chunks, ckpt_dir):
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    dist_checkpointing.save(sharded, str(ckpt_dir))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--llm", default="{}", help="JSON of LLMConfig overrides")
    args = ap.parse_args()

    llm = LLMConfig(**json.loads(args.llm))
    layout = ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        sequence_parallel=args.sp,
    )
    cfg = Config(llm=llm, parallel=layout)
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    rank = torch.distributed.get_rank()

    chunks = build_llm_chunks(cfg.llm, cfg.parallel)
    if args.reference:
        save(chunks, args.workdir / "weights")
    else:
        reference_grads = [
            {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
            for sd in load(chunks, args.workdir / "grads")
        ]
        for chunk, sd in zip(chunks, load(chunks, args.workdir / "weights"), strict=True):
            chunk.load_state_dict(sd)

    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    model = [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(chunks)
    ]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads

    full_batch = make_batch(cfg.llm.vocab_size)
    batch = data_parallel_share(full_batch)
    logit_chunks = run(model, batch, forward_only=True)
    for m in model:
        m.zero_grad_buffer()
    losses = run(model, batch, forward_only=False)

    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    logits = loss = None
    if last:
        logits = torch.cat(logit_chunks)
        loss_sum = torch.stack([x["loss_sum"] for x in losses]).sum()
        torch.distributed.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group())
        loss = loss_sum / full_batch["loss_mask"].sum()

    if args.reference:
        # Gradients saved as a checkpoint of the model's own layout: parameters hold main_grad.
        for chunk in chunks:
            for p in chunk.parameters():
                p.data.copy_(p.main_grad)
        save(chunks, args.workdir / "grads")
        # Independent check of the loss: plain cross entropy on the reference logits.
        plain = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
        )
        plain = (plain * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
        torch.save(
            {"logits": logits, "loss": loss, "plain_loss": plain}, args.workdir / "reference.pt"
        )
        parallel.teardown()
        return

    reference = torch.load(args.workdir / "reference.pt")
    result = {"rank": rank, "grads": {}}
    if last:
        expected_logits = data_parallel_share({"logits": reference["logits"]})["logits"]
        result["logits"] = rel_err(logits, expected_logits)
        result["loss"] = rel_err(loss, reference["loss"])
    for i, (chunk, ref) in enumerate(zip(chunks, reference_grads, strict=True)):
        for name, p in chunk.named_parameters():
            result["grads"][f"chunk{i}.{name}"] = rel_err(p.main_grad, ref[name])
    out = args.workdir / f"result-{os.environ.get('SALM_LAYOUT', 'layout')}-rank{rank}.json"
    out.write_text(json.dumps(result, indent=1))
    parallel.teardown()


if __name__ == "__main__":
    main()
