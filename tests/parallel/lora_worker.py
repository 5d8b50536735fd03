"""Worker for test_lora_parallel.py: a LoRA LLM's logits, loss and adapter gradients at TP=2 (with
and without SP) against TP=1, and merged against unmerged logits.

Run under torchrun. ``--reference`` (one process) builds the tiny LLM (frozen base, adapters on all
four linears, ``B`` drawn nonzero so the adapters matter) and saves weights, gradients, logits and
loss; the TP=2 run loads them resharded (see ``equivalence.py``) into one model without and one with
sequence parallelism and writes their errors; then it merges the adapters and compares logits.
"""

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from salm_megatron import parallel
from salm_megatron.config import Config, LLMConfig, LoRAConfig
from salm_megatron.llm import build_llm
from salm_megatron.models.lora import apply_lora, lora_modules, merge_lora
from tests.parallel import equivalence as eq
from tests.parallel.llm_worker import make_batch, run

LORA = LoRAConfig(rank=4, alpha=8.0)


def build(cfg: Config, sequence_parallel: bool):
    """The tiny LLM with adapters, its base frozen."""
    layout = dataclasses.replace(cfg.parallel, sequence_parallel=sequence_parallel)
    llm = build_llm(cfg.llm, layout)
    for p in llm.parameters():
        p.requires_grad_(False)
    apply_lora(llm, LORA, seed=cfg.seed)
    return llm


def logits_and_loss(model, batch):
    """Forward-only logits [b, s, v] and the summed-token loss over the whole batch."""
    for m in model:
        m.zero_grad_buffer()
    logits = torch.cat(run(model, batch, forward_only=True))
    losses = run(model, batch, forward_only=False)
    loss = torch.stack([x["loss_sum"] for x in losses]).sum() / batch["loss_mask"].sum()
    return logits, loss


def main(argv: list[str] | None = None):
    ap = eq.layout_parser(__doc__)
    args = ap.parse_args(argv)
    cfg = Config(llm=LLMConfig(num_layers=2, qkv_bias=True), parallel=eq.parallel_config(args))
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    batch = make_batch(cfg.llm.vocab_size)
    rank = torch.distributed.get_rank()

    if args.reference:
        llm = build(cfg, sequence_parallel=False)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for lora in lora_modules(llm):
                lora.lora_b.weight.copy_(0.05 * torch.randn(lora.lora_b.weight.shape, generator=g))
        eq.save([llm], args.workdir / "weights")
        model = eq.wrap_ddp([llm])
        llm.config.finalize_model_grads_func = finalize_model_grads
        logits, loss = logits_and_loss(model, batch)
        eq.save_grads([llm], args.workdir)  # (overwrites the adapters: the model ends here)
        torch.save({"logits": logits, "loss": loss}, args.workdir / "reference.pt")
        parallel.teardown()
        return

    reference = torch.load(args.workdir / "reference.pt")
    for name, sp in ((args.name, False), (f"{args.name}-sp", True)):
        llm = build(cfg, sequence_parallel=sp)
        reference_grads = eq.load_reference([llm], args.workdir)
        model = eq.wrap_ddp([llm])
        llm.config.finalize_model_grads_func = finalize_model_grads
        logits, loss = logits_and_loss(model, batch)
        result = {
            "rank": rank,
            "grads": eq.grad_errors([llm], reference_grads),
            "logits": eq.rel_err(logits, reference["logits"]),
            "loss": eq.rel_err(loss, reference["loss"]),
        }
        # Merged (each TP shard on its own): the same logits from plain linears.
        merge_lora(llm)
        assert not lora_modules(llm)
        merged = torch.cat(run(model, batch, forward_only=True))
        result["merged"] = eq.rel_err(merged, logits)
        eq.write_result(args.workdir, name, rank, result)
    assert parallel_state.get_tensor_model_parallel_world_size() == args.tp
    parallel.teardown()


if __name__ == "__main__":
    main()
