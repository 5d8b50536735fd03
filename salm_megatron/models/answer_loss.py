"""The output layer and the loss at the positions that predict an answer token, and nowhere else.

A speech LLM's sequence is mostly audio frames and prompt: an ASR sample of 10 s holds 125 frames,
a dozen prompt tokens and some 30 answer tokens, so about four positions in five have no loss. The
output layer (a vocabulary of 128k rows for Llama 3) and the cross entropy's fp32 logits would
spend most of their work and memory there. GPTModel computes them at every position; the speech
model instead takes its final hidden states, picks the positions the loss needs (planned on the
host) and runs Megatron's own output layer and vocab-parallel cross entropy on those. The result is
the same per-position loss, zero elsewhere.

Under sequence parallelism the hidden states are first all-gathered along the sequence, as the
output layer itself would, and the output layer then runs without its sequence-parallel gather (as
Megatron-Core does for inference's last-token logits); its input gradient is all-reduced over TP,
so the gather's backward pass only keeps each rank's own part.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from ..llm import vocab_parallel_hits
from .host import sent_like


@contextlib.contextmanager
def hidden_states_only(llm):
    """Within the block, ``GPTModel.forward`` returns its last layer's normed hidden states
    ``[S, r, h]`` (split along the sequence under SP) instead of logits or loss."""
    post_process = llm.post_process
    llm.post_process = False
    try:
        yield
    finally:
        llm.post_process = post_process


@contextlib.contextmanager
def _whole_sequence_input(layer):
    """The output layer takes its input whole (already gathered), not split along the sequence."""
    sequence_parallel = layer.sequence_parallel
    layer.sequence_parallel = False
    try:
        yield
    finally:
        layer.sequence_parallel = sequence_parallel


def answer_loss(
    llm,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    host_mask: torch.Tensor,
    with_accuracy: bool = False,
) -> torch.Tensor:
    """Per-position loss ``[r, S]`` from ``hidden [S, r, h]`` (``labels``, ``loss_mask``
    ``[r, S]``; ``host_mask``: the loss mask's host copy, which picks the positions); with
    ``with_accuracy`` stacked with the 0/1 next-token hits: ``[2, r, S]``."""
    rows, length = labels.shape
    positions = host_mask.flatten().nonzero()[:, 0]
    if not len(positions):  # no answer here: one position keeps the output layer in the graph
        positions = torch.zeros(1, dtype=torch.long)
    index = sent_like(positions, labels)
    if llm.config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    picked = hidden.transpose(0, 1).reshape(rows * length, -1)[index][:, None]  # [k, 1, h]
    weight = (
        llm.shared_embedding_or_output_weight() if llm.share_embeddings_and_output_weights else None
    )
    with _whole_sequence_input(llm.output_layer):
        logits, _ = llm.output_layer(picked, weight=weight)  # [k, 1, v / tp]
    targets = labels.flatten()[index]
    values = [llm.compute_language_model_loss(targets[None], logits)[0]]  # labels [1, k]
    if with_accuracy:
        values.append(vocab_parallel_hits(logits[:, 0], targets).float())
    placed = [
        value.new_zeros(rows * length).index_put((index,), value).view(rows, length) * loss_mask
        for value in values
    ]
    return torch.stack(placed) if with_accuracy else placed[0]
