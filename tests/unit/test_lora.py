"""Proves LoRA on one process: its config is validated; off changes nothing and new adapters change
no output; with a frozen LLM only the adapters train (on an MoE LLM too: the attention's linears;
the experts' are refused with a ConfigError saying which targets work); merged equals unmerged
(a bf16 merge stays bf16, rounded once); dropout acts in training only; a LoRA-only checkpoint is
a small fraction of a full one and resumes exactly, its frozen parts reloaded from their
pretrained checkpoints (a clear error names a missing one)."""

import dataclasses
import re

import pytest
import torch
from megatron.core import dist_checkpointing

from salm_megatron.config import (
    Config,
    ConfigError,
    LLMConfig,
    LoRAConfig,
    ParallelConfig,
    apply_overrides,
)
from salm_megatron.data import collate
from salm_megatron.llm import build_llm
from salm_megatron.models import build_speech_llm
from salm_megatron.models.lora import (
    LoRALinear,
    adapter_parameters,
    apply_lora,
    lora_modules,
    merge_lora,
)
from salm_megatron.training import checkpoint
from salm_megatron.training.optimizer import build_optimizer, optimizer_step, wrap_ddp
from tests.speech_fixtures import speech_samples, tiny_config

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _lora_config(*overrides: str, arch: str = "salm") -> Config:
    return apply_overrides(tiny_config(arch), ["lora.rank=4", *overrides])


def _checkpoint_keys(module) -> set[str]:
    return {getattr(v, "key", k) for k, v in module.sharded_state_dict().items()}


def _llm_with_lora(lora: LoRAConfig, seed: int = 0):
    """The tiny LLM (2 layers) with adapters whose B is drawn nonzero, so they matter."""
    llm = build_llm(LLMConfig(num_layers=2), ParallelConfig())
    apply_lora(llm, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(llm):
            m.lora_b.weight.copy_(0.05 * torch.randn(m.lora_b.weight.shape, generator=g))
    return llm


def _logits(llm) -> torch.Tensor:
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(12).expand_as(ids)
    return llm(ids, positions, None)


# -------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=-1", "lora.rank=-1 must be an integer >= 0"),
        ("lora.alpha=0", "lora.alpha=0.0 must be > 0"),
        ("lora.dropout=1.0", "lora.dropout=1.0 must be in [0, 1)"),
        ("lora.targets=linear_qkv", "lora.targets='linear_qkv' must be a non-empty list of"),
        ("lora.targets=[]", "lora.targets=[] must be a non-empty list of"),
        ("lora.targets=[linear_q]", "lora.targets='linear_q' is not one of 'linear_qkv'"),
        ("lora.targets=[linear_fc1,linear_fc1]", "names a linear twice"),
    ],
)
def test_bad_fields_name_field_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(Config(), [override])
    cfg = apply_overrides(Config(), ["lora.rank=16", "lora.targets=[linear_qkv, linear_fc2]"])
    assert cfg.lora == LoRAConfig(rank=16, targets=["linear_qkv", "linear_fc2"])


# -------------------------------------------------------------------------------------- model


def test_off_changes_nothing_and_new_adapters_change_no_output(single_rank):
    batch = collate(speech_samples("salm"))
    torch.manual_seed(0)
    (plain,) = build_speech_llm(tiny_config("salm"))
    torch.manual_seed(0)
    (lora,) = build_speech_llm(_lora_config())
    assert not lora_modules(plain) and not adapter_parameters(plain)
    assert len(lora_modules(lora)) == 4 * len(TARGETS)

    # The adapters draw nothing from the default RNG: every other weight is as without them.
    adapted = lora.state_dict()
    for key, value in plain.state_dict().items():
        for target in TARGETS:
            key = key.replace(f".{target}.", f".{target}.base.")
        if torch.is_tensor(value):
            assert torch.equal(adapted[key], value), key
    plain.eval(), lora.eval()
    with torch.no_grad():
        assert torch.equal(lora(batch), plain(batch))  # B = 0

    # Checkpoint keys: the base's unchanged (a plain LLM checkpoint loads), the adapters' new.
    plain_keys, lora_keys = _checkpoint_keys(plain), _checkpoint_keys(lora)
    assert plain_keys < lora_keys
    added = lora_keys - plain_keys
    for target in TARGETS:
        for factor in ("lora_a", "lora_b"):
            parent = "mlp" if "fc" in target else "self_attention"
            assert f"llm.decoder.layers.{parent}.{target}.{factor}.weight" in added
    assert all(".lora_a." in key or ".lora_b." in key for key in added)


def test_moe_experts_get_no_adapters_and_the_error_says_what_does():
    """tiny-moe: the dense MLP's targets are refused, naming them and the targets that work."""
    with pytest.raises(ConfigError) as error:
        _lora_config("llm.preset=tiny-moe")
    message = str(error.value)
    assert "lora.targets=['linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2']" in message
    assert "adapts linear_fc1, linear_fc2" in message and "llm.num_moe_experts=4" in message
    assert "set lora.targets=[linear_qkv, linear_proj]" in message
    _lora_config("llm.preset=tiny-moe", "lora.targets=[linear_qkv, linear_proj]")


@pytest.mark.parametrize(
    "llm, where",
    [
        ("tiny", ("self_attention.linear_qkv", "mlp.linear_fc2")),
        ("tiny-moe", ("self_attention.linear_qkv", "self_attention.linear_proj")),
    ],
    ids=["dense", "moe"],
)
def test_frozen_llm_trains_adapters_only(single_rank, llm, where):
    """MoE too: adapters on the attention's linears train below frozen experts and router."""
    targets = ", ".join(w.split(".")[1] for w in where)
    cfg = _lora_config("model.freeze_llm=true", f"llm.preset={llm}", f"lora.targets=[{targets}]")
    torch.manual_seed(0)
    (chunk,) = build_speech_llm(cfg)
    model = wrap_ddp(cfg, [chunk])
    optimizer, _ = build_optimizer(cfg, model, torch.float32)
    named = dict(chunk.named_parameters())
    trainable_llm = sorted(n for n, p in named.items() if p.requires_grad and n.startswith("llm."))
    assert trainable_llm == sorted(
        f"llm.decoder.layers.{i}.{part}.{factor}.weight"
        for i in range(4)
        for part in where
        for factor in ("lora_a", "lora_b")
    )
    buffered = {id(p) for buffer in model[0].buffers for p in buffer.params}
    assert buffered == {id(p) for p in named.values() if p.requires_grad}

    before = {n: p.detach().clone() for n, p in named.items()}
    model[0].zero_grad_buffer()
    optimizer.zero_grad()
    model[0](collate(speech_samples("salm"))).sum().backward()
    model[0].finish_grad_sync()
    assert optimizer_step(optimizer, cfg.optim.clip_grad)[0]
    for name, p in named.items():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name
    assert all(bool(m.lora_b.weight.abs().sum() > 0) for m in lora_modules(chunk))


def test_merged_equals_unmerged(single_rank):
    llm = _llm_with_lora(LoRAConfig(rank=4, alpha=8.0))
    plain_keys = set(build_llm(LLMConfig(num_layers=2), ParallelConfig()).state_dict())
    llm.eval()
    adapters = lora_modules(llm)
    with torch.no_grad():
        unmerged = _logits(llm)
        for m in adapters:  # the adapters matter: without them the logits differ
            m.scale = 0.0
        assert (_logits(llm) - unmerged).abs().max() > 1e-2
        for m in adapters:
            m.scale = 8.0 / 4
        expected = {
            f"{name}.weight": m.base.weight.double()
            + 2.0 * m.lora_b.weight.double() @ m.lora_a.weight.double()
            for name, m in llm.named_modules()
            if isinstance(m, LoRALinear)
        }
        merge_lora(llm)
        merged = _logits(llm)
    assert not lora_modules(llm) and set(llm.state_dict()) == plain_keys
    weights = llm.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(weights[key].double(), value, rtol=0, atol=1e-7, msg=key)
    assert (merged - unmerged).abs().max() < 1e-5


def test_a_bf16_merge_stays_bf16_and_rounds_once(single_rank):
    """The merge keeps the weights' dtype (no fp32 copy of the model) and rounds the fp32 sum
    ``W + scale B A`` once: what rounding the exact sum to bf16 gives, element for element."""
    llm = build_llm(LLMConfig(num_layers=2), ParallelConfig(), params_dtype=torch.bfloat16)
    apply_lora(llm, LoRAConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(llm):
            m.lora_b.weight.copy_(0.05 * torch.randn(m.lora_b.weight.shape, generator=g))
        exact = {
            f"{name}.weight": (
                m.base.weight.double() + 2.0 * m.lora_b.weight.double() @ m.lora_a.weight.double()
            ).to(torch.bfloat16)
            for name, m in llm.named_modules()
            if isinstance(m, LoRALinear)
        }
        merge_lora(llm)
    weights = llm.state_dict()
    for key, value in exact.items():
        assert weights[key].dtype == torch.bfloat16, key
        assert torch.equal(weights[key], value), key


def test_dropout_acts_in_training_only(single_rank):
    torch.manual_seed(0)
    llm = _llm_with_lora(LoRAConfig(rank=4, dropout=0.5))
    torch.manual_seed(0)
    reference = _llm_with_lora(LoRAConfig(rank=4))
    with torch.no_grad():
        assert torch.equal(_logits(llm.eval()), _logits(reference.eval()))
        train_a, train_b = _logits(llm.train()), _logits(llm)
    assert not torch.equal(train_a, train_b)  # a new mask each time
    assert not torch.equal(train_a, _logits(reference.train()))


# --------------------------------------------------------------------------------- checkpoints


def _setup(cfg: Config, seed: int):
    torch.manual_seed(seed)
    (chunk,) = build_speech_llm(cfg)
    checkpoint.load_pretrained_parts(cfg, [chunk])
    model = wrap_ddp(cfg, [chunk])
    optimizer, _ = build_optimizer(cfg, model, torch.float32)
    return chunk, model, optimizer


def _step(cfg: Config, model, optimizer) -> None:
    model[0].zero_grad_buffer()
    optimizer.zero_grad()
    model[0](collate(speech_samples("salm"))).sum().backward()
    model[0].finish_grad_sync()
    assert optimizer_step(optimizer, cfg.optim.clip_grad)[0]


def _bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_lora_only_checkpoint_is_small_and_resumes(single_rank, tmp_path):
    # An LLM twice as wide as the tiny one: larger than the encoder, as LLMs are.
    wider = ["llm.hidden_size=128", "llm.ffn_hidden_size=512"]
    torch.manual_seed(7)
    (source,) = build_speech_llm(apply_overrides(tiny_config("salm"), wider))
    checkpoint.save_module(source.llm, tmp_path / "llm")
    checkpoint.save_module(source.audio.encoder, tmp_path / "encoder")
    cfg = _lora_config(
        *wider,
        "model.freeze_llm=true",
        "model.freeze_encoder=true",
        "model.freeze_adapter=true",
        f"checkpoint.pretrained_llm={tmp_path / 'llm'}",
        f"checkpoint.pretrained_encoder={tmp_path / 'encoder'}",
    )
    chunk, model, optimizer = _setup(cfg, seed=1)
    expected = source.state_dict()
    for key, value in chunk.llm.state_dict().items():  # the pretrained base, adapters kept
        if torch.is_tensor(value) and ".lora_" not in key:
            assert torch.equal(value, expected["llm." + key.replace(".base.", ".")]), key
    _step(cfg, model, optimizer)

    left_out = checkpoint.parts_left_out(cfg)
    assert left_out == ["llm.", "audio.encoder."]
    small = checkpoint.save(tmp_path / "lora", 1, [chunk], optimizer, {}, {}, None, None, left_out)
    full = checkpoint.save(tmp_path / "full", 1, [chunk], optimizer, {}, {}, None)
    assert checkpoint.left_out(small) == left_out and checkpoint.left_out(full) == []
    assert _bytes(small) < 0.2 * _bytes(full), (_bytes(small), _bytes(full))
    saved = dist_checkpointing.load_tensors_metadata(str(small))
    weights = [k for k in saved if k.startswith(("llm.", "audio.encoder."))]
    assert weights and all(".lora_" in k or "running_" in k or "batches" in k for k in weights)

    # A new model (other seed) resumes: without the pretrained LLM it cannot.
    fresh, fresh_model, fresh_optimizer = _setup(cfg, seed=2)
    missing = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, pretrained_llm=None)
    )
    with pytest.raises(ConfigError, match=r"holds no LLM weights.*set checkpoint\.pretrained_llm"):
        checkpoint.load_pretrained_parts(missing, [fresh], left_out, needed_by=small)
    checkpoint.load_pretrained_parts(cfg, [fresh], checkpoint.left_out(small), needed_by=small)
    checkpoint.load(small, [fresh], fresh_optimizer)
    torch.manual_seed(3)
    (evaluated,) = build_speech_llm(cfg)  # as `salm eval` and the HF export load it
    checkpoint.load_weights(cfg, small, [evaluated])
    expected = chunk.state_dict()
    for loaded in (fresh.state_dict(), evaluated.state_dict()):
        assert loaded.keys() == expected.keys()
        for name, value in expected.items():
            if torch.is_tensor(value):
                assert torch.equal(loaded[name], value), name
    _step(cfg, model, optimizer)  # the next step: the same update from the restored moments
    _step(cfg, fresh_model, fresh_optimizer)
    for (name, p), q in zip(chunk.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
