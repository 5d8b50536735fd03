"""The MoE router's load-balancing loss under a per-token loss: its weight, and its report.

Megatron-Core's router attaches each layer's Switch-style auxiliary loss to the routing
probabilities (``MoEAuxLossAutoScaler``), and the backward pass gives it the gradient
``main_loss_backward_scale`` (what the schedule last set). With ``calculate_per_token_loss``
Megatron-Core 0.16 multiplies the aux loss by the micro-batch's token count on this rank
(``routing_map.shape[0]``) and leaves the scale at 1; ``finalize_model_grads`` then divides every
gradient by the global count of loss tokens. That matches its pretraining, where every position
is a loss token and ranks hold whole sequences. Here neither holds: only answer tokens count (an
ASR sample has several positions per answer token), and under sequence or context parallelism
a rank holds ``1 / (TP x CP)`` of the positions, so the aux loss would weigh several times its
coefficient, and differently at each layout.

What this stack trains instead: every answer token carries its micro-batch's aux loss, as it
carries its own cross entropy::

    loss = sum over micro-batches m (DP ranks too) of
           [CE summed over m's answer tokens + t_m x moe_aux_loss_coeff x sum over layers aux_m]
           / T

with ``t_m`` the answer tokens of micro-batch ``m`` and ``T`` those of the global batch; ``aux_m``
is Megatron's aux loss over every position of micro-batch ``m`` (reduced over its TP x CP ranks,
each of which computes its share). When micro-batches hold as many answer tokens each, the aux
term is ``moe_aux_loss_coeff`` times the mean aux loss, the coefficient's meaning in Hugging Face
and Megatron-LM. It depends on the micro-batches, not on TP/PP/CP/EP/DP, so layouts give the same
gradients (``tests/parallel/test_speech_parallel.py``).

:func:`weigh_aux_loss` sets it: a hook on the chunk's output, which runs in the backward pass
before any router's of that micro-batch, sets the scale to ``t_m / n`` (``n``: the positions this
rank routes, by which the router multiplied). The schedule resets the scale at each forward step;
a backward pass always sets its own first.

:func:`aux_loss_report` is Megatron-LM's report: each layer's aux loss (without coefficient)
summed over pipeline stages and the TP x CP shares, averaged over DP ranks and micro-batches,
then over the layers (``track_moe_metrics``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, track_moe_metrics

AUX_LOSS = "load_balancing_loss"  # the name Megatron's router tracks it under


def has_aux_loss(config) -> bool:
    """Whether the model's routers attach a load-balancing loss (MoE with a coefficient)."""
    return bool(getattr(config, "num_moe_experts", None)) and config.moe_aux_loss_coeff > 0


def weigh_aux_loss(output: torch.Tensor, answer_tokens: int, config) -> torch.Tensor:
    """``output [s, b, ...]`` of a model chunk (hidden states, split as its routers saw them:
    ``s`` the positions this rank holds), hooked so that the backward pass weighs every router's
    aux loss of this micro-batch by ``answer_tokens`` (the micro-batch's, on every rank). The
    hook runs when the gradient reaches ``output``, before any layer below it; the tensor stays
    the same one (the schedule frees a stage's output after sending it, which a view would
    forbid). Unchanged where nothing attaches an aux loss (dense, coefficient 0, no gradient)."""
    if not (has_aux_loss(config) and torch.is_grad_enabled() and output.requires_grad):
        return output
    routed = output.shape[0] * output.shape[1]  # what the router multiplied its aux loss by
    scale = torch.full((1,), answer_tokens / routed, dtype=torch.float32)
    scale = scale.to(output.device, non_blocking=True)

    def set_scale(grad: torch.Tensor) -> None:
        MoEAuxLossAutoScaler.set_loss_scale(scale)

    output.register_hook(set_scale)
    return output


def aux_loss_report(config, num_microbatches: int) -> float | None:
    """The step's load-balancing loss per layer and micro-batch (without its coefficient), the
    same on every rank; None without one. Collective over every rank, once per training step
    (it clears Megatron's tracker for the next)."""
    if not has_aux_loss(config) or num_microbatches == 0:
        return None
    totals: dict[str, torch.Tensor] = {}
    track_moe_metrics(
        loss_scale=1.0 / num_microbatches,
        iteration=0,  # no writer: the caller reports it
        total_loss_dict=totals,
        force_initialize=True,
        track_names=[AUX_LOSS],
        num_layers=config.num_layers,
    )
    return float(totals[AUX_LOSS])
