"""Proves on one process that checkpoints load across the formats a run meets: a model whose
modules carry Transformer Engine's extra state (FP8 metadata) loads checkpoints without it, as
the local spec and converters write them, and the reverse, through every load (resume, weights,
pretrained), while any other key missing still fails naming it; a training checkpoint (with its
optimizer) serves as ``checkpoint.pretrained_model``; the optimizer state round-trips
exactly in each ``checkpoint.optimizer_format`` and from checkpoints written before the format
was recorded; and ``dp_reshardable`` state is refused at another TP/PP, naming the field."""

import logging

import pytest
import torch
from megatron.core import dist_checkpointing

from salm_megatron.config import ConfigError, apply_overrides
from salm_megatron.models import build_speech_llm
from salm_megatron.training import checkpoint, optimizer_state
from salm_megatron.training.optimizer import build_optimizer, wrap_ddp
from tests.speech_fixtures import ddp_step, tiny_config

INITIAL, SAVED = torch.tensor([1.0]), torch.tensor([8.0])


class FP8Like:
    """What a Transformer Engine module adds to a torch module: state outside its tensors (FP8
    scaling metadata), which Megatron saves as a ShardedObject ``<prefix>._extra_state``."""

    def get_extra_state(self):
        return self.fp8_meta

    def set_extra_state(self, state):
        self.fp8_meta = state


def _extra_state_modules(chunk) -> list[torch.nn.Module]:
    """Where the TE spec has extra state and the local spec has none: the final norm and each
    layer's core attention (the local linears already save an empty one, as TE's do)."""
    decoder = chunk.llm.decoder
    return [
        decoder.final_layernorm,
        *(layer.self_attention.core_attention for layer in decoder.layers),
    ]


def _make_te_like(chunk, value: torch.Tensor) -> None:
    for module in _extra_state_modules(chunk):
        module.__class__ = type(f"FP8Like{type(module).__name__}", (FP8Like, type(module)), {})
        module.fp8_meta = value.clone()


def _fp8_metas(chunk) -> list[torch.Tensor]:
    return [module.fp8_meta for module in _extra_state_modules(chunk)]


def _train(arch="salm", seed=0, te_like=False, steps=0, fmt="dp_reshardable"):
    """A tiny speech LLM under DDP with its optimizer, after ``steps`` real steps."""
    torch.manual_seed(seed)
    cfg = apply_overrides(tiny_config(arch), [f"checkpoint.optimizer_format={fmt}"])
    (chunk,) = build_speech_llm(cfg)
    if te_like:
        _make_te_like(chunk, SAVED if steps else INITIAL)
    model = wrap_ddp(cfg, [chunk])
    optimizer, _ = build_optimizer(cfg, model, torch.float32)
    losses = [ddp_step(model, optimizer) for _ in range(steps)]
    return cfg, chunk, model, optimizer, losses


def _weights(chunk) -> dict[str, torch.Tensor]:
    return {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}


def _optimizer_state(optimizer) -> dict:
    """Every tensor of the optimizer: main parameters and Adam's moments and step, per part."""
    found = {}
    for i, part in enumerate(optimizer.chained_optimizers):
        for j, (param, state) in enumerate(part.optimizer.state.items()):
            found[i, j, "param"] = param.detach().clone()
            found.update({(i, j, key): value.clone() for key, value in state.items()})
    return found


def _assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# ------------------------------------------------------------------ Transformer Engine extra state


def test_extra_state_may_be_missing_in_either_direction(single_rank, tmp_path, caplog):
    root = tmp_path / "checkpoints"
    cfg, local, _, optimizer, _ = _train(steps=1)
    checkpoint.save(root / "local", 1, [local], optimizer, {}, {}, None)
    checkpoint.save_module(local.llm, tmp_path / "local-llm")

    # A TE model resumes, loads the weights of, and starts from the local-spec checkpoints; its
    # modules keep their initial extra state, which one info line says.
    _, te, _, te_optimizer, _ = _train(seed=1, te_like=True)
    with caplog.at_level(logging.INFO, logger="salm.checkpoint"):
        checkpoint.load(root / "local" / "step_0000001", [te], te_optimizer)
    (said,) = [r.message for r in caplog.records if "extra state" in r.message]
    assert "llm.decoder.final_layernorm._extra_state and 1 more" in said, said
    _assert_equal(_weights(te), _weights(local))
    _assert_equal(_optimizer_state(te_optimizer), _optimizer_state(optimizer))
    assert all(torch.equal(meta, INITIAL) for meta in _fp8_metas(te))
    _, te, _, _, _ = _train(seed=1, te_like=True)
    checkpoint.load_weights(cfg, root / "local" / "step_0000001", [te])
    _assert_equal(_weights(te), _weights(local))
    _, te, _, _, _ = _train(seed=1, te_like=True)
    checkpoint.load_pretrained(te.llm, tmp_path / "local-llm", "LLM")
    _assert_equal(_weights(te.llm), _weights(local.llm))
    assert all(torch.equal(meta, INITIAL) for meta in _fp8_metas(te))

    # The reverse: local-spec models load a TE model's checkpoints (its extra state unread), and
    # a TE model gets the extra state back.
    _, te, _, te_optimizer, _ = _train(seed=2, te_like=True, steps=1)
    checkpoint.save(root / "te", 1, [te], te_optimizer, {}, {}, None)
    checkpoint.save_module(te.llm, tmp_path / "te-llm")
    _, local, _, optimizer, _ = _train(seed=3)
    checkpoint.load(root / "te" / "step_0000001", [local], optimizer)
    _assert_equal(_weights(local), _weights(te))
    _assert_equal(_optimizer_state(optimizer), _optimizer_state(te_optimizer))
    _, local, _, _, _ = _train(seed=3)
    checkpoint.load_pretrained(local.llm, tmp_path / "te-llm", "LLM")
    _assert_equal(_weights(local.llm), _weights(te.llm))
    _, again, _, again_optimizer, _ = _train(seed=4, te_like=True)
    checkpoint.load(root / "te" / "step_0000001", [again], again_optimizer)
    assert all(torch.equal(meta, SAVED) for meta in _fp8_metas(again))


def test_any_other_missing_key_fails_naming_it(single_rank, tmp_path):
    cfg, chunk, _, optimizer, _ = _train(steps=1)
    checkpoint.save(tmp_path / "checkpoints", 1, [chunk], optimizer, {}, {}, None)
    checkpoint.save_module(chunk.llm, tmp_path / "llm")
    name = "decoder.final_layernorm.amax_history"
    _, other, _, other_optimizer, _ = _train(seed=1)
    other.llm.decoder.final_layernorm.register_buffer("amax_history", torch.zeros(4))
    with pytest.raises(RuntimeError, match=f"step_0000001 lacks llm.{name}$"):
        checkpoint.load(tmp_path / "checkpoints" / "step_0000001", [other], other_optimizer)
    with pytest.raises(RuntimeError, match=f"llm lacks {name}$"):
        checkpoint.load_pretrained(other.llm, tmp_path / "llm", "LLM")


def test_a_training_checkpoint_serves_as_pretrained_model(single_rank, tmp_path):
    """Its common state holds counters, config and the optimizer's param groups, which are not
    the model's: only the model's keys load."""
    _, chunk, _, optimizer, _ = _train(steps=1)
    path = checkpoint.save(tmp_path, 1, [chunk], optimizer, {"step": 1}, {}, None)
    torch.manual_seed(1)
    (fresh,) = build_speech_llm(tiny_config("salm"))
    checkpoint.load_pretrained(fresh, path, "model")
    _assert_equal(_weights(fresh), _weights(chunk))


# ---------------------------------------------------------------------------- optimizer formats


@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_optimizer_state_round_trips_exactly(single_rank, tmp_path, fmt):
    """Saved after 3 steps in ``fmt``, loaded into a fresh model and optimizer: every optimizer
    tensor (Adam's step per parameter too) and the next two losses are the uninterrupted run's."""
    _, chunk, model, optimizer, _ = _train(steps=3, fmt=fmt)
    path = checkpoint.save(tmp_path, 3, [chunk], optimizer, {}, {}, None, optimizer_format=fmt)
    assert dist_checkpointing.load_content_metadata(str(path)) == {
        "distrib_optim_sharding_type": fmt,
        "chained_optim_avoid_prefix": True,
    }
    saved = _optimizer_state(optimizer)
    expected = [ddp_step(model, optimizer) for _ in range(2)]

    _, fresh, fresh_model, fresh_optimizer, _ = _train(seed=1)
    checkpoint.load(path, [fresh], fresh_optimizer)
    _assert_equal(_optimizer_state(fresh_optimizer), saved)
    assert [ddp_step(fresh_model, fresh_optimizer) for _ in range(2)] == expected


def test_checkpoints_from_before_the_format_record_load_as_fully_reshardable(single_rank, tmp_path):
    _, chunk, _, optimizer, _ = _train(steps=2, fmt="fully_reshardable")
    path = checkpoint.save(
        tmp_path, 2, [chunk], optimizer, {}, {}, None, optimizer_format="fully_reshardable"
    )
    common = torch.load(path / "common.pt", weights_only=True)
    del common["content_metadata"]  # as written before the format was recorded
    torch.save(common, path / "common.pt")
    assert optimizer_state.saved_metadata(common)["distrib_optim_sharding_type"] == (
        "fully_reshardable"
    )

    _, fresh, _, fresh_optimizer, _ = _train(seed=1)  # this run would save dp_reshardable
    checkpoint.load(path, [fresh], fresh_optimizer)
    _assert_equal(_optimizer_state(fresh_optimizer), _optimizer_state(optimizer))
    _assert_equal(_weights(fresh), _weights(chunk))


def test_dp_reshardable_state_is_refused_at_another_layout_naming_the_field():
    saved = {"tp": 2, "pp": 1, "vpp": 1, "dp": 4, "world": 8}
    here = {"tp": 1, "pp": 2, "vpp": 1, "dp": 4, "world": 8}
    dp_reshardable = optimizer_state.sharding_metadata("dp_reshardable")
    with pytest.raises(ConfigError) as err:
        optimizer_state.check_loads_here("ckpt/step_0000002", dp_reshardable, saved, here)
    message = str(err.value)
    assert "checkpoint.optimizer_format=dp_reshardable" in message
    assert "(TP=2, PP=1, VPP=1), not at this run's (TP=1, PP=2, VPP=1)" in message
    assert "checkpoint.optimizer_format=fully_reshardable" in message
    fully = optimizer_state.sharding_metadata("fully_reshardable")
    optimizer_state.check_loads_here("ckpt", fully, saved, here)  # reshards: no error
    optimizer_state.check_loads_here("ckpt", dp_reshardable, saved, {**here, "tp": 2, "pp": 1})
    optimizer_state.check_loads_here("ckpt", dp_reshardable, saved, {**saved, "dp": 2})

    with pytest.raises(ConfigError, match="checkpoint.optimizer_format='zero'.*'dp_reshardable'"):
        apply_overrides(tiny_config("salm"), ["checkpoint.optimizer_format=zero"])
