"""Worker for test_llm_parallel.py: one layout's logits, loss and gradients, compared to TP=PP=1.

Run under torchrun. ``--reference`` (one process) builds the tiny LLM and saves weights,
gradients, logits and loss; other layouts load them (see ``equivalence.py``), run the same global
batch through Megatron's forward_backward_func and write their errors to JSON files.
``--save-weights NAME`` saves the weights as this layout holds them, which ``--weights NAME``
loads in place of the reference's (a checkpoint written at one layout, read at another).
"""

import dataclasses
import json
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from salm_megatron import parallel
from salm_megatron.config import Config, LLMConfig
from salm_megatron.llm import build_llm_chunks
from tests.parallel import equivalence as eq

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


def run(model, batch, *, forward_only: bool):
    iterators = [microbatches(batch) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, want_logits=forward_only),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batch["input_ids"]) // MICRO_BATCH,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )


def main():
    ap = eq.layout_parser(__doc__)
    ap.add_argument("--llm", default="{}", help="JSON of LLMConfig overrides")
    ap.add_argument("--first-stage-layers", type=int, default=None)
    ap.add_argument("--last-stage-layers", type=int, default=None)
    ap.add_argument("--weights", default=None, help="load these weights (a workdir folder)")
    ap.add_argument("--save-weights", default=None, help="save the loaded weights here")
    args = ap.parse_args()
    layout = dataclasses.replace(
        eq.parallel_config(args),
        num_layers_in_first_pipeline_stage=args.first_stage_layers,
        num_layers_in_last_pipeline_stage=args.last_stage_layers,
    )
    cfg = Config(llm=LLMConfig(**json.loads(args.llm)), parallel=layout)
    parallel.initialize(cfg.parallel, seed=cfg.seed)

    chunks = build_llm_chunks(cfg.llm, cfg.parallel)
    if args.reference:
        eq.save(chunks, args.workdir / "weights")
    else:
        reference_grads = eq.load_reference(chunks, args.workdir)
        if args.weights:
            for chunk, sd in zip(chunks, eq.load(chunks, args.workdir / args.weights), strict=True):
                chunk.load_state_dict(sd)
        if args.save_weights:
            eq.save(chunks, args.workdir / args.save_weights)
    model = eq.wrap_ddp(chunks)
    chunks[0].config.finalize_model_grads_func = finalize_model_grads

    full_batch = make_batch(cfg.llm.vocab_size)
    batch = data_parallel_share(full_batch)
    logit_chunks = run(model, batch, forward_only=True)
    for m in model:
        m.zero_grad_buffer()
    losses = run(model, batch, forward_only=False)

    logits = loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        logits = torch.cat(logit_chunks)
        loss_sum = torch.stack([x["loss_sum"] for x in losses]).sum()
        torch.distributed.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group())
        loss = loss_sum / full_batch["loss_mask"].sum()

    if args.reference:
        eq.save_grads(chunks, args.workdir)
        # Independent check of the loss: plain cross entropy on the reference logits.
        plain = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), full_batch["labels"].flatten(), reduction="none"
        )
        plain = (plain * full_batch["loss_mask"].flatten()).sum() / full_batch["loss_mask"].sum()
        reference = {"logits": logits, "loss": loss, "plain_loss": plain}
        torch.save(reference, args.workdir / "reference.pt")
    else:
        reference = torch.load(args.workdir / "reference.pt")
        result = {
            "rank": torch.distributed.get_rank(),
            "grads": eq.grad_errors(chunks, reference_grads),
            "layers": [len(chunk.decoder.layers) for chunk in chunks],
        }
        if logits is not None:
            expected_logits = data_parallel_share({"logits": reference["logits"]})["logits"]
            result["logits"] = eq.rel_err(logits, expected_logits)
            result["loss"] = eq.rel_err(loss, reference["loss"])
        eq.write_result(args.workdir, args.name, result["rank"], result)
    parallel.teardown()


if __name__ == "__main__":
    main()
