"""Proves the MoE router's load-balancing loss in training on one process (tiny-moe SALM, two
micro-batches through Megatron's schedule and finalize_model_grads): the gradient it adds is
that of ``sum over micro-batches m of t_m x coeff x sum over layers aux_m / T``, computed by hand
from the routers' logits (t_m: m's answer tokens, T: all of them; llm/moe.py), and the value the
training loop reports is the hand-computed aux loss per layer and micro-batch."""

import functools

import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter

from salm_megatron.config import apply_overrides
from salm_megatron.data import collate
from salm_megatron.llm.moe import aux_loss_report
from salm_megatron.models import build_speech_llm
from salm_megatron.training.loop import _forward_step
from salm_megatron.training.optimizer import wrap_ddp
from tests.speech_fixtures import speech_samples, tiny_config

COEFF = 0.5  # large, so that the aux loss's share of the gradients is far above rounding


def _model(coeff: float):
    cfg = apply_overrides(
        tiny_config("salm"), ["llm.preset=tiny-moe", f"llm.moe_aux_loss_coeff={coeff}"]
    )
    torch.manual_seed(0)
    chunks = build_speech_llm(cfg)
    return cfg, chunks, wrap_ddp(cfg, chunks)


def _microbatches() -> list[dict]:
    samples = speech_samples("salm")
    return [collate(samples[:1]), collate(samples[1:])]  # 4 and 10 answer tokens


def _schedule_grads(model, microbatches) -> dict[str, torch.Tensor]:
    """One training step's gradients, as the loop makes them (divided by all answer tokens)."""
    model[0].zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=functools.partial(
            _forward_step, sequence_length=None, packed=False, with_accuracy=False
        ),
        data_iterator=iter(microbatches),
        model=model[0],
        num_microbatches=len(microbatches),
        seq_length=1,  # one stage: nothing is sent
        micro_batch_size=1,
        forward_only=False,
    )
    return {n: p.main_grad.clone() for n, p in model[0].module.named_parameters()}


def _routers_logits(chunk) -> list[torch.Tensor]:
    """The logits every router computes from now on, in order (kept in the graph)."""
    captured = []
    for router in (m for m in chunk.modules() if isinstance(m, TopKRouter)):

        def gating(x, original=router.gating):
            logits = original(x)
            captured.append(logits.reshape(-1, logits.shape[-1]))
            return logits

        router.gating = gating
    return captured


def _switch_loss(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss of one layer over its ``n`` tokens:
    ``E / (k n^2) x sum_i (tokens routed to expert i) x (sum of its router probabilities)``."""
    n, experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    routed = torch.zeros_like(probs).scatter(1, probs.topk(topk, dim=-1).indices, 1.0)
    return experts / (topk * n * n) * (routed.sum(0) * probs.sum(0)).sum()


def test_aux_loss_gradient_and_report_match_a_hand_computation(single_rank):
    microbatches = _microbatches()
    answers = [int(mb["answer_mask"].sum()) for mb in microbatches]
    assert answers[0] != answers[1]  # the weighting by answer tokens shows

    cfg, chunks, model = _model(COEFF)
    clear_aux_losses_tracker()  # what other tests' training passes left in Megatron's tracker
    with_aux = _schedule_grads(model, microbatches)
    reported = aux_loss_report(chunks[0].config, len(microbatches))
    _, plain_chunks, plain_model = _model(0.0)
    without = _schedule_grads(plain_model, microbatches)

    # By hand, on the model without aux loss (same weights): the logits' graph is intact.
    (chunk,) = plain_chunks
    captured = _routers_logits(chunk)
    layers, topk = cfg.llm.num_layers, cfg.llm.moe_router_topk
    hand_loss, per_layer = 0.0, []
    for mb, t in zip(microbatches, answers, strict=True):
        captured.clear()
        chunk(mb)
        assert len(captured) == layers
        aux = [_switch_loss(logits, topk) for logits in captured]
        per_layer += [a.detach() for a in aux]
        hand_loss = hand_loss + t * COEFF * torch.stack(aux).sum() / sum(answers)
    params = [(n, p) for n, p in chunk.named_parameters() if p.requires_grad]
    hand = torch.autograd.grad(hand_loss, [p for _, p in params], allow_unused=True)

    # Megatron's report: per layer and micro-batch, without the coefficient.
    expected_report = torch.stack(per_layer).sum() / (layers * len(microbatches))
    assert reported == pytest.approx(float(expected_report), rel=1e-5)

    total = torch.stack([g.norm() for g in hand if g is not None]).norm()
    router = [n for n, _ in params if "router" in n]
    assert router and all(hand[i] is not None for i, (n, _) in enumerate(params) if n in router)
    for (name, _), grad in zip(params, hand, strict=True):
        added = with_aux[name] - without[name]
        expected = torch.zeros_like(added) if grad is None else grad
        error = (added - expected).norm() / max(expected.norm(), 1e-2 * total)
        assert error < 1e-4, (name, float(error), float(expected.norm()))
    assert max(hand[[n for n, _ in params].index(r)].norm() for r in router) > 1e-3 * total
