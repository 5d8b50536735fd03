"""Worker for test_speech_parallel.py: SALM/BESTOW loss and gradients at one layout vs TP=PP=1
(with the auxiliary CTC loss on the encoder).

The global batch has audio of different lengths, a sample with two segments and a text-only
sample, in two micro-batches. Everything else works as in ``llm_worker.py``.
"""

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from salm_megatron import parallel
from salm_megatron.config import apply_overrides
from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from salm_megatron.training.optimizer import wrap_ddp
from tests.parallel import equivalence as eq
from tests.speech_fixtures import speech_samples, tiny_config, wake_zero_outputs

MICRO_BATCH = 2


def forward_step(data_iterator, model, *, sequence_length):
    mb = next(data_iterator)
    output = model(mb, sequence_length=sequence_length)

    def loss_func(output):
        loss_sum = output.float().sum()
        tokens = mb["answer_mask"].sum().to(torch.int)
        return loss_sum, tokens, {"loss_sum": loss_sum.detach()}

    return output, loss_func


def main():
    ap = eq.layout_parser(__doc__)
    ap.add_argument("--arch", choices=("salm", "bestow"), required=True)
    args = ap.parse_args()
    cfg = tiny_config(args.arch, eq.parallel_config(args), ctc_weight=0.5)
    # TP ranks encode different segments: BatchNorm's batch statistics would differ from TP=1's
    # (as across DP ranks), so the layouts are compared with LayerNorm in the conv modules.
    # The training loop's DDP (gradients overlapped with backward), every gradient kept whole.
    cfg = apply_overrides(cfg, ["encoder.conv_norm_type=layer_norm", "optim.distributed=false"])
    parallel.initialize(cfg.parallel, seed=cfg.seed)

    chunks = build_speech_llm(cfg)
    if args.reference:
        wake_zero_outputs(chunks[0])
        eq.save(chunks, args.workdir / "weights")
    else:
        reference_grads = eq.load_reference(chunks, args.workdir)
    model = wrap_ddp(cfg, chunks)

    samples = speech_samples(args.arch)
    microbatches = [
        collate(samples[i : i + MICRO_BATCH]) for i in range(0, len(samples), MICRO_BATCH)
    ]
    # Pipelines pass one shape: the longest micro-batch (layouts are already padded for SP).
    length = max(chunks[0].layout(mb, None).length for mb in microbatches)

    losses = get_forward_backward_func()(
        forward_step_func=lambda it, m: forward_step(it, m, sequence_length=length),
        data_iterator=[iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches),
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=length,
        micro_batch_size=MICRO_BATCH,
    )
    tokens = sum(int(mb["answer_mask"].sum()) for mb in microbatches)
    loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss = torch.stack([x["loss_sum"] for x in losses]).sum() / tokens

    if args.reference:
        eq.save_grads(chunks, args.workdir)
        torch.save({"loss": loss}, args.workdir / "reference.pt")
    else:
        reference = torch.load(args.workdir / "reference.pt")
        result = {
            "rank": torch.distributed.get_rank(),
            "grads": eq.grad_errors(chunks, reference_grads),
        }
        if loss is not None:
            result["loss"] = eq.rel_err(loss, reference["loss"])
        eq.write_result(args.workdir, args.name, result["rank"], result)
    parallel.teardown()


if __name__ == "__main__":
    main()
