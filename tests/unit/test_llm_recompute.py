"""Proves each LLM recompute setting the local spec can run trains as no recompute, dropout on."""

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.random import HAVE_TE

from salm_megatron.config import RECOMPUTE_MODULES, ConfigError, LLMConfig, ParallelConfig
from salm_megatron.llm import build_llm
from salm_megatron.llm.model import recompute_settings

DROPOUT = dict(attention_dropout=0.1, hidden_dropout=0.1)
# The submodules each setting runs twice (forward, then again in backward).
RERUN = {"core_attn": ["self_attention.core_attention"], "mlp": ["mlp"],
         "layernorm": ["input_layernorm", "pre_mlp_layernorm"]}  # fmt: skip
ALL = [name for names in RERUN.values() for name in names]
SETTINGS = {
    "full": ("full", ["core_attn"], ALL),
    "selective-default": ("selective", ["core_attn"], RERUN["core_attn"]),
    "selective-mlp": ("selective", ["mlp"], RERUN["mlp"]),
    "selective-core_attn-mlp": ("selective", ["core_attn", "mlp"], RERUN["core_attn"] + ["mlp"]),
    "selective-layernorm": ("selective", ["layernorm"], RERUN["layernorm"]),
}


def _step(model, seed: int):
    """One training forward and backward: token losses and every gradient."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    positions = torch.arange(16).expand(2, 16)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # attention dropout's generator
    loss = model(ids, positions, None, labels=ids.roll(-1, 1))
    loss.sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _calls(model) -> dict[str, int]:
    counts = dict.fromkeys(ALL, 0)
    for layer in model.decoder.layers:
        for name in ALL:
            module = layer.get_submodule(name)
            module.register_forward_pre_hook(
                lambda *_, n=name: counts.__setitem__(n, counts[n] + 1)
            )
    return counts


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_recompute_equals_no_recompute(single_rank, setting):
    recompute, modules, rerun = SETTINGS[setting]
    if "layernorm" in modules and not HAVE_TE:
        pytest.skip("Megatron-Core 0.16's norm recompute needs Transformer Engine installed")
    torch.manual_seed(0)
    reference = build_llm(LLMConfig(**DROPOUT), ParallelConfig()).train()
    cfg = LLMConfig(**DROPOUT, recompute=recompute, recompute_modules=modules)
    model = build_llm(cfg, ParallelConfig()).train()
    model.load_state_dict(reference.state_dict())
    counts = _calls(model)
    expected_loss, expected_grads = _step(reference, seed=5)
    loss, grads = _step(model, seed=5)
    layers = cfg.num_layers
    assert counts == {n: layers * (2 if n in rerun else 1) for n in ALL}  # recompute ran
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    other, _ = _step(model, seed=6)  # dropout is on: equal masks above were not free
    assert not torch.equal(other, loss)


def test_recompute_modules_are_validated():
    allowed = "core_attn, mlp, layernorm"
    for modules, message in [
        ([], f"llm.recompute_modules=\\[\\] must be a list of distinct names, some of {allowed}"),
        (["mlp", "mlp"], "must be a list of distinct names"),
        ("mlp", "llm.recompute_modules='mlp' must be a list"),
        (["attention"], "llm.recompute_modules entry='attention' is not one of 'core_attn', "),
        (["moe"], f"llm.recompute_modules: 'moe' needs MoE layers, .*; use some of {allowed}"),
        (["mla_up_proj"], "'mla_up_proj' needs multi-latent attention"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            LLMConfig(recompute="selective", recompute_modules=modules)
    assert set(RECOMPUTE_MODULES) == {  # Megatron-Core 0.16's list, each one decided here
        "core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"
    }  # fmt: skip


def test_layer_spec_decides_norm_recompute():
    cfg = LLMConfig(recompute="selective", recompute_modules=["core_attn", "layernorm"])
    with pytest.raises(ConfigError, match="'layernorm' with the transformer_engine layer spec"):
        recompute_settings(cfg, te=True)
    if HAVE_TE:
        assert recompute_settings(cfg, te=False)["recompute_modules"] == ["core_attn", "layernorm"]
    else:
        with pytest.raises(ConfigError, match="'layernorm' with the local layer spec: .* needs "):
            recompute_settings(cfg, te=False)
    mlp = LLMConfig(recompute="selective", recompute_modules=["mlp"])
    for te in (False, True):
        assert recompute_settings(mlp, te) == dict(
            recompute_granularity="selective", recompute_modules=["mlp"]
        )
    assert recompute_settings(LLMConfig(recompute_modules=["layernorm"]), te=True) == {}
