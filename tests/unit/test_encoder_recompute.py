"""Proves encoder recompute changes no output, gradient or BatchNorm statistic, with dropout on."""

import copy
import dataclasses

import pytest
import torch

from salm_megatron.audio import build_encoder
from salm_megatron.config import ConfigError, apply_overrides, encoder_preset
from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from tests.speech_fixtures import speech_samples, tiny_config

DROPOUT = dict(dropout=0.1, dropout_att=0.1)
ENCODERS = {  # every dropout on (the speech-model test keeps the presets' SpecAugment too)
    "fastconformer": encoder_preset("tiny", **DROPOUT, dropout_pre_encoder=0.1),
    "whisper": encoder_preset("tiny-whisper", **DROPOUT),
}


def _encoders(name: str, recompute_layers: int):
    """The same weights and statistics without and with recompute, in training mode."""
    torch.manual_seed(0)
    reference = build_encoder(ENCODERS[name]).train()
    cfg = dataclasses.replace(ENCODERS[name], recompute_layers=recompute_layers)
    model = build_encoder(cfg).train()
    model.load_state_dict(reference.state_dict())
    return reference, model


def _calls(encoder) -> list[int]:
    """Counts of each layer's forward calls (a recomputed layer runs twice per step)."""
    counts = [0] * len(encoder.layers)
    for i, layer in enumerate(encoder.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _step(encoder, batches, seed: int):
    """Two micro-batches in flight, as a pipeline runs them: both forwards, then both backwards."""
    torch.manual_seed(seed)
    outputs = [encoder(features, lengths)[0] for features, lengths in batches]
    for out in outputs:
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    return outputs, grads


BATCHES = [
    (torch.randn(2, 80, 48, generator=torch.Generator().manual_seed(1)), torch.tensor([48, 31])),
    (torch.randn(3, 80, 40, generator=torch.Generator().manual_seed(2)), torch.tensor([9, 40, 26])),
]


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("recompute_layers", [1, 2])
def test_recompute_equals_no_recompute(name, recompute_layers):
    reference, model = _encoders(name, recompute_layers)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    counts = _calls(model)
    expected_out, expected_grads = _step(reference, BATCHES, seed=5)
    out, grads = _step(model, BATCHES, seed=5)
    # Recompute ran: each recomputed layer once more per micro-batch.
    assert counts == [4] * recompute_layers + [2] * (2 - recompute_layers)
    for a, b in zip(out, expected_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-6, atol=1e-9, msg=key)
    # Running statistics once per micro-batch forward, not again in the recompute.
    state, expected_state = model.state_dict(), reference.state_dict()
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    tracked = [k for k in state if k.endswith("num_batches_tracked")]
    assert all(int(state[k]) == 2 for k in tracked)
    moved = [k for k in state if k.endswith("running_mean") and not state[k].equal(before[k])]
    assert len(moved) == (2 if name == "fastconformer" else 0)  # one BatchNorm per layer
    # Dropout is on: another seed draws other masks (so equal masks above were not free).
    other, _ = _step(model, BATCHES[:1], seed=6)
    assert not torch.allclose(other[0], out[0])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_nothing_is_recomputed_without_gradients(name):
    _, model = _encoders(name, recompute_layers=2)
    counts = _calls(model)
    with torch.no_grad():
        model(*BATCHES[0])
    model.eval()
    model(*BATCHES[0])
    assert counts == [2, 2]


def test_recompute_layers_is_validated():
    for value in (-1, 3):
        with pytest.raises(ConfigError, match=f"encoder.recompute_layers={value} must be an "):
            encoder_preset("tiny", recompute_layers=value)
    cfg = apply_overrides(tiny_config("salm"), ["encoder.recompute_layers=2"])
    assert cfg.encoder.recompute_layers == 2
    with pytest.raises(ConfigError, match="encoder.recompute_layers=True must be an integer"):
        apply_overrides(tiny_config("salm"), ["encoder.recompute_layers=true"])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_speech_model_trains_the_same_with_encoder_recompute(single_rank, name):
    """Through the whole first stage: features, SpecAugment, encoder, adapter, LLM."""
    batch = collate(speech_samples("salm"))
    losses, models, initial = [], [], None
    for recompute in (0, 2):
        base = tiny_config("salm")
        cfg = dataclasses.replace(
            base,
            encoder=dataclasses.replace(ENCODERS[name], recompute_layers=recompute),
            data=dataclasses.replace(base.data, max_duration=30.0),  # Whisper's longest
        )
        torch.manual_seed(0)
        (model,) = build_speech_llm(cfg)
        if initial is None:
            initial = copy.deepcopy(model.state_dict())
        model.load_state_dict(initial)
        torch.manual_seed(3)
        loss = model(batch)
        loss.sum().backward()
        losses.append(loss.detach())
        models.append(model)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    reference, model = models
    for (key, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=key)
    state = model.state_dict()
    for key, value in reference.state_dict().items():  # BatchNorm statistics among them
        if torch.is_tensor(value):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
