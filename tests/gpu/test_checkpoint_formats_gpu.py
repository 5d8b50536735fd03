"""Proves (CUDA only) what the CPU tests stand in for: a Transformer Engine LLM loads a local-spec
LLM checkpoint (which has none of TE's extra state) and the reverse, weights exact; and the
optimizer state round-trips exactly on the GPU in each checkpoint.optimizer_format, with TE's or
apex's fused Adam where installed (step kept per group, no torch-Adam fallback)."""

import pytest
import torch

from salm_megatron.config import LLMConfig, ParallelConfig
from salm_megatron.data import collate
from salm_megatron.llm import build_llm
from salm_megatron.models import build_speech_llm
from salm_megatron.models.host import to_device
from salm_megatron.training import checkpoint
from salm_megatron.training.optimizer import build_optimizer, optimizer_step, wrap_ddp
from tests.gpu.test_transformer_engine import _te_name
from tests.speech_fixtures import speech_samples, tiny_config

pytestmark = pytest.mark.gpu


def _llm(impl: str, seed: int):
    torch.manual_seed(seed)
    return build_llm(LLMConfig(transformer_impl=impl), ParallelConfig()).cuda()


def test_te_llm_loads_local_spec_checkpoints_and_back(single_rank, tmp_path):
    pytest.importorskip("transformer_engine")
    local, te = _llm("local", 0), _llm("transformer_engine", 1)
    checkpoint.save_module(local, tmp_path / "local")
    checkpoint.load_pretrained(te, tmp_path / "local", "LLM")
    te_params = dict(te.named_parameters())
    for name, param in local.named_parameters():
        assert torch.equal(te_params[_te_name(name)], param), name

    te_saved = _llm("transformer_engine", 2)
    checkpoint.save_module(te_saved, tmp_path / "te")
    checkpoint.load_pretrained(local, tmp_path / "te", "LLM")
    te_params = dict(te_saved.named_parameters())
    for name, param in local.named_parameters():
        assert torch.equal(param, te_params[_te_name(name)]), name


def _train(seed: int, steps: int):
    torch.manual_seed(seed)
    cfg = tiny_config("salm")
    chunks = [chunk.cuda() for chunk in build_speech_llm(cfg)]
    model = wrap_ddp(cfg, chunks)
    optimizer, _ = build_optimizer(cfg, model, torch.float32)
    batch = to_device(collate(speech_samples("salm")), "cuda")
    for _ in range(steps):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        model[0](batch).sum().backward()
        model[0].finish_grad_sync()
        assert optimizer_step(optimizer, clip_grad=1.0)[0]
    return chunks, optimizer


def _state(optimizer) -> dict:
    found = {}
    for i, part in enumerate(optimizer.chained_optimizers):
        for j, group in enumerate(part.optimizer.param_groups):
            found[i, j, "step"] = group.get("step")
        for j, (param, state) in enumerate(part.optimizer.state.items()):
            found[i, j, "param"] = param.detach().clone()
            found.update({(i, j, k): v.clone() for k, v in state.items() if torch.is_tensor(v)})
    return found


@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_optimizer_state_round_trips_on_the_gpu(single_rank, tmp_path, fmt):
    chunks, optimizer = _train(seed=0, steps=2)
    path = checkpoint.save(tmp_path, 2, chunks, optimizer, {}, {}, None, optimizer_format=fmt)
    fresh, fresh_optimizer = _train(seed=1, steps=0)
    checkpoint.load(path, fresh, fresh_optimizer)
    expected, got = _state(optimizer), _state(fresh_optimizer)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(got[key].float(), value.float()), key
        else:
            assert got[key] == value, key
