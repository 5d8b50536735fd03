"""Proves frozen parts stay in eval mode through a training step, also after the training loop's
eval()/train() around validation: a frozen FastConformer's BatchNorm running statistics do not
change and its dropout is off, while a trained one's statistics move and its dropout acts; a
frozen LLM stays in training mode (Megatron recomputes only there); the no-audio stand-in leaves
every part in its own mode."""

import pytest
import torch

from salm_megatron.config import apply_overrides
from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from salm_megatron.training.optimizer import build_optimizer, optimizer_step, wrap_ddp
from tests.speech_fixtures import speech_samples, tiny_config, waveform

DROPOUT = ("encoder.dropout=0.3", "encoder.dropout_att=0.3", "encoder.dropout_pre_encoder=0.3")


def _setup(*overrides: str):
    cfg = apply_overrides(tiny_config("salm"), [*DROPOUT, *overrides])
    torch.manual_seed(0)
    (chunk,) = build_speech_llm(cfg)
    model = wrap_ddp(cfg, [chunk])
    optimizer, _ = build_optimizer(cfg, model, torch.float32)
    return cfg, chunk, model, optimizer


def _train_step(cfg, model, optimizer, samples) -> None:
    """One step as the loop runs it, after a validation pass switched the model to eval."""
    model[0].eval()
    model[0].train()
    model[0].zero_grad_buffer()
    optimizer.zero_grad()
    model[0](collate(samples)).sum().backward()
    model[0].finish_grad_sync()
    assert optimizer_step(optimizer, cfg.optim.clip_grad)[0]


def _statistics(chunk) -> dict[str, torch.Tensor]:
    state = chunk.state_dict().items()
    return {k: v.clone() for k, v in state if "running_" in k or "num_batches_tracked" in k}


def _encoded_twice(chunk) -> tuple[torch.Tensor, torch.Tensor]:
    clip = waveform(0.6, seed=4)[None]
    lengths = torch.tensor([clip.shape[1]])
    with torch.no_grad():
        return chunk.audio.encode(clip, lengths)[0], chunk.audio.encode(clip, lengths)[0]


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_encoder_keeps_its_statistics_and_drops_nothing(single_rank, frozen):
    cfg, chunk, model, optimizer = _setup(f"model.freeze_encoder={str(frozen).lower()}")
    before = _statistics(chunk)
    assert before, "the FastConformer has BatchNorm statistics"
    _train_step(cfg, model, optimizer, speech_samples("salm"))
    after = _statistics(chunk)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    first, second = _encoded_twice(chunk)
    assert chunk.audio.adapter.training and chunk.llm.training
    if frozen:
        assert not changed, sorted(changed)
        assert not any(m.training for m in chunk.audio.encoder.modules())
        assert torch.equal(first, second), "dropout acted in a frozen encoder"
    else:
        assert changed == set(before)
        assert chunk.audio.encoder.training
        assert not torch.equal(first, second), "dropout should act in a trained encoder"


def test_a_frozen_llm_stays_in_training_mode_for_recompute(single_rank):
    """Megatron recomputes activations (llm.recompute) only in training mode, and gradients
    still pass through a frozen LLM to the audio path: it is not put in eval mode."""
    _, chunk, _, _ = _setup("model.freeze_llm=true", "llm.recompute=full")
    chunk.eval()
    chunk.train()
    assert all(m.training for m in chunk.llm.modules())
    assert not any(p.requires_grad for p in chunk.llm.parameters())
    assert chunk.audio.training and chunk.audio.encoder.training


def test_the_no_audio_stand_in_leaves_modes_alone(single_rank):
    cfg, chunk, model, optimizer = _setup("model.freeze_encoder=true")
    before = _statistics(chunk)
    text_only = [s for s in speech_samples("salm") if not s.audio] * 2
    _train_step(cfg, model, optimizer, text_only)
    assert not any(m.training for m in chunk.audio.encoder.modules())
    assert chunk.audio.training and chunk.audio.adapter.training
    assert all(torch.equal(before[k], v) for k, v in _statistics(chunk).items())
