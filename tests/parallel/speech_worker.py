"""Worker for test_speech_parallel.py: SALM/BESTOW loss, logits and gradients at one layout vs
TP=PP=1 (with the auxiliary CTC loss on the encoder), padded and packed; on the tiny Llama-style
LLM, a Qwen3-style one (query/key norms, heads wider than hidden/heads) or tiny-moe (Qwen3-MoE:
4 experts, top 2, with a load-balancing loss of coefficient 0.5).

The global batch has audio of very different lengths (one long), samples with two segments and
a text-only sample: two padded micro-batches of three samples, or two packed rows of three
samples each. Each layout runs the padded pass, then (without context parallelism) the packed
pass, and compares both with the reference's padded pass. The reference also runs the packed pass
at TP=PP=1 and reports it as layout ``tp1``. Everything else works as in ``llm_worker.py``.

Every layout pads the micro-batches to one length (a multiple of 4, whatever the layout needs), so
the routers see the same positions, padding included, as the reference's. Data-parallel ranks
(expert-parallel layouts: EP is carved from DP) share the global batch: DP rank ``d`` runs
micro-batches ``d, d + DP, ...``, and the loss, token count and gradients are summed over them as
training sums them. The MoE load-balancing loss is per micro-batch, weighed by its answer tokens
(``llm/moe.py``), so it is the same at every layout; packed rows hold other micro-batches than the
padded ones (another load-balancing loss by definition), so MoE runs the padded pass only.
"""

import dataclasses
import math

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from salm_megatron import parallel
from salm_megatron.config import apply_overrides
from salm_megatron.data import SpeechSample, collate
from salm_megatron.llm import local_chunks
from salm_megatron.llm.moe import has_aux_loss
from salm_megatron.models import build_speech_llm
from salm_megatron.models.speech_llm import loss_tokens
from salm_megatron.training.data import StepBatches
from salm_megatron.training.optimizer import wrap_ddp
from tests.parallel import equivalence as eq
from tests.speech_fixtures import prompt, speech_samples, tiny_config, wake_zero_outputs, waveform

MICRO_BATCH = 3
LLMS = {  # overrides of the tiny LLM
    "tiny": [],
    "qwen3": ["llm.qk_layernorm=true", "llm.kv_channels=32"],
    "moe": ["llm.preset=tiny-moe", "llm.moe_aux_loss_coeff=0.5"],
}
ROWS = [[0, 1, 5], [2, 3, 4]]  # packed rows: the long audio, a text-only and a short sample


def samples(arch: str) -> list[SpeechSample]:
    """speech_samples, a long-audio sample (its frames span several context-parallel chunks) and
    a short one."""
    extra = []
    for i, (seconds, answer) in enumerate([(2.4, [30, 31, 32, 2]), (0.3, [33, 2])]):
        ids = prompt([5, 9], arch, 1)
        extra.append(SpeechSample(
            ids + answer, [0] * len(ids) + [1] * len(answer), [waveform(seconds, seed=90 + i)],
            transcripts=[[46, 47, 48]],
        ))  # fmt: skip
    return speech_samples(arch) + extra


def forward_step(data_iterator, model, *, sequence_length, packed):
    mb = next(data_iterator)
    output = model(mb, sequence_length=sequence_length, packed=packed)

    def loss_func(output):
        loss_sum = output.float().sum()
        tokens = loss_tokens(mb)
        return loss_sum, tokens, {"loss_sum": loss_sum.detach()}

    return output, loss_func


class Logits:
    """The output layer's logits on this rank, ``[k, v / tp]`` per micro-batch: the model runs it
    at the k positions of its sequence chunk that predict an answer token."""

    def __init__(self, chunks):
        self.captured = []
        for chunk in chunks:
            if chunk.post_process:
                chunk.llm.output_layer.register_forward_hook(
                    lambda module, args, out: self.captured.append(out[0][:, 0].detach().clone())
                )

    def by_position(self, chunk, microbatches, length, indices=None) -> dict[tuple, torch.Tensor]:
        """The captured logits by (micro-batch, row, position in the whole sequence);
        ``indices``: the micro-batches' places in the global batch (default: 0, 1, ...)."""
        keys = []
        for i, mb in zip(indices or range(len(microbatches)), microbatches, strict=True):
            mask = chunk.layout(mb, length).host_loss_mask
            positions = local_chunks(torch.arange(mask.shape[1]), dim=0)  # this CP rank's
            for row, j in local_chunks(mask, dim=1).nonzero().tolist():
                keys.append((i, row, int(positions[j])))
        logits = torch.cat(self.captured[-len(microbatches) :])
        assert len(keys) == len(logits), (len(keys), len(logits))
        return dict(zip(keys, logits, strict=True))

    def error(self, chunk, microbatches, length, reference: dict, indices) -> float | None:
        """Relative error against the reference's logits at this rank's positions and
        vocabulary slice."""
        if not self.captured:
            return None
        mine = self.by_position(chunk, microbatches, length, indices)
        rank = parallel_state.get_tensor_model_parallel_rank()
        width = next(iter(mine.values())).shape[-1]
        expected = [reference[key][rank * width : (rank + 1) * width] for key in mine]
        return eq.rel_err(torch.stack(list(mine.values())), torch.stack(expected))


def run_pass(model, chunks, microbatches, length, packed) -> torch.Tensor | None:
    """One forward/backward of the global batch; the loss on the last stage (else None)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    reads = first or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    count = len(microbatches)
    if not reads:
        # As in training, stages between read no samples: packed, only each row's bounds.
        microbatches = [
            {"packed_lengths": mb["packed_lengths"]} if packed else None for mb in microbatches
        ]
    middle_stages = parallel_state.get_pipeline_model_parallel_world_size() > 2
    if middle_stages and has_aux_loss(chunks[0].config):
        # and, for the routers' load-balancing loss, each micro-batch's answer tokens, shared
        # as the training data path shares them
        group = parallel_state.get_pipeline_model_parallel_group()
        shared = microbatches if reads else (None if not packed else microbatches)
        microbatches = StepBatches._answer_tokens(shared, count, group)
    losses = get_forward_backward_func()(
        forward_step_func=lambda it, m: forward_step(it, m, sequence_length=length, packed=packed),
        data_iterator=[iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches),
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=length,
        micro_batch_size=1 if packed else MICRO_BATCH,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    loss_sum = torch.stack([x["loss_sum"] for x in losses]).sum()
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(loss_sum, group=dp_cp)
    tokens = torch.tensor(float(sum(int(mb["answer_mask"].sum()) for mb in microbatches)))
    torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
    return loss_sum / tokens


def packed_rows(chunk, batch_samples):
    """The packed micro-batches (one row each, with each sample's positions) and their length."""
    rows = []
    for row in ROWS:
        mb = collate([batch_samples[i] for i in row])
        mb["packed_lengths"] = chunk.layout(mb, None).lengths
        rows.append(mb)
    longest = max(int(mb["packed_lengths"].sum()) for mb in rows)
    multiple = chunk.pad_multiple
    return rows, math.ceil((longest + 3) / multiple) * multiple  # every row ends in padding


def main():
    ap = eq.layout_parser(__doc__)
    ap.add_argument("--arch", choices=("salm", "bestow"), required=True)
    ap.add_argument("--llm", choices=tuple(LLMS), default="tiny")
    args = ap.parse_args()
    cfg = tiny_config(args.arch, ctc_weight=0.5)
    # TP ranks encode different segments: BatchNorm's batch statistics would differ from TP=1's
    # (as across DP ranks), so the layouts are compared with LayerNorm in the conv modules.
    # The training loop's DDP (gradients overlapped with backward), every gradient kept whole.
    cfg = apply_overrides(
        cfg, [*LLMS[args.llm], "encoder.conv_norm_type=layer_norm", "optim.distributed=false"]
    )
    cfg = dataclasses.replace(cfg, parallel=eq.parallel_config(args))  # EP once the LLM has MoE
    packed_pass = not cfg.llm.is_moe
    parallel.initialize(cfg.parallel, seed=cfg.seed)

    chunks = build_speech_llm(cfg)
    if args.reference:
        wake_zero_outputs(chunks[0])
        eq.save(chunks, args.workdir / "weights")
    else:
        reference_grads = eq.load_reference(chunks, args.workdir)
    model = wrap_ddp(cfg, chunks)
    logits = Logits(chunks)

    batch_samples = samples(args.arch)
    microbatches = [
        collate(batch_samples[i : i + MICRO_BATCH])
        for i in range(0, len(batch_samples), MICRO_BATCH)
    ]
    # Pipelines pass one shape: the longest micro-batch, padded alike at every layout.
    multiple = math.lcm(4, chunks[0].pad_multiple)
    length = -(-max(chunks[0].layout(mb, None).length for mb in microbatches) // multiple)
    length *= multiple
    rows, row_length = packed_rows(chunks[0], batch_samples)
    rank = torch.distributed.get_rank()

    if args.reference:
        result = {"rank": rank}
        if packed_pass:
            packed_loss = run_pass(model, chunks, rows, row_length, packed=True)
            packed_grads = {n: p.main_grad.clone() for n, p in model[0].module.named_parameters()
                            if p.requires_grad}  # fmt: skip
        loss = run_pass(model, chunks, microbatches, length, packed=False)
        grads = {n: p.main_grad.clone() for n, p in model[0].module.named_parameters()
                 if p.requires_grad}  # fmt: skip
        if packed_pass:
            result["packed_loss"] = eq.rel_err(packed_loss, loss)
            result["packed_grads"] = eq.compare_grads([packed_grads], [grads])
        eq.write_result(args.workdir, "tp1", rank, result)
        logits = logits.by_position(chunks[0], microbatches, length)
        torch.save({"loss": loss, "logits": logits}, args.workdir / "reference.pt")
        eq.save_grads(chunks, args.workdir)
        parallel.teardown()
        return

    reference = torch.load(args.workdir / "reference.pt")
    dp = parallel_state.get_data_parallel_world_size()
    mine = list(range(parallel_state.get_data_parallel_rank(), len(microbatches), dp))
    shared = [microbatches[i] for i in mine]  # this DP rank's share of the global batch
    loss = run_pass(model, chunks, shared, length, packed=False)
    result = {"rank": rank, "grads": eq.grad_errors(chunks, reference_grads)}
    if loss is not None:
        result["loss"] = eq.rel_err(loss, reference["loss"])
    error = logits.error(chunks[-1], shared, length, reference["logits"], mine)
    if error is not None:
        result["logits"] = error
    if args.cp == 1 and dp == 1 and packed_pass:
        packed_loss = run_pass(model, chunks, rows, row_length, packed=True)
        result["packed_grads"] = eq.grad_errors(chunks, reference_grads)
        if packed_loss is not None:
            result["packed_loss"] = eq.rel_err(packed_loss, reference["loss"])
    eq.write_result(args.workdir, args.name, rank, result)
    parallel.teardown()


if __name__ == "__main__":
    main()
