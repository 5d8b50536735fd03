"""Proves (CUDA only) recompute replays CUDA's dropout masks: encoders and the LLM (local and TE
specs, norm recompute where TE is installed) train as without recompute, dropout on, fp32."""

import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.random import HAVE_TE

from salm_megatron.audio import build_encoder
from salm_megatron.config import LLMConfig, ParallelConfig, encoder_preset
from salm_megatron.llm import build_llm

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 off, so both runs compute in fp32 and differences mean other masks."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _same_step(reference, model, step):
    """``step(module, seed)`` on both: equal outputs, gradients and buffers; another seed
    differs (dropout is on)."""
    model.load_state_dict(reference.state_dict())
    expected, out = step(reference, 5), step(model, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    state = model.state_dict()
    for key, value in reference.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert not torch.allclose(step(model, 6), out)


@pytest.mark.parametrize("preset", ["tiny", "tiny-whisper"])
def test_encoder_recompute_on_cuda(preset):
    cfg = encoder_preset(preset, dropout=0.1, dropout_att=0.1)
    torch.manual_seed(0)
    reference = build_encoder(cfg).cuda().train()
    model = build_encoder(dataclasses.replace(cfg, recompute_layers=cfg.num_layers)).cuda().train()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, cfg.features.n_mels, 320, generator=g).cuda()
    lengths = torch.tensor([320, 203]).cuda()

    def step(encoder, seed):
        torch.manual_seed(seed)  # CPU and CUDA generators
        out, _ = encoder(features, lengths)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        return out.detach()

    _same_step(reference, model, step)


SETTINGS = {
    "local-full": ("local", "full", ["core_attn"]),
    "local-core_attn-mlp": ("local", "selective", ["core_attn", "mlp"]),
    "local-layernorm": ("local", "selective", ["layernorm"]),
    "te-full": ("transformer_engine", "full", ["core_attn"]),
    "te-core_attn-mlp": ("transformer_engine", "selective", ["core_attn", "mlp"]),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_llm_recompute_on_cuda(single_rank, setting):
    impl, recompute, modules = SETTINGS[setting]
    if (impl == "transformer_engine" or "layernorm" in modules) and not HAVE_TE:
        pytest.skip("needs Transformer Engine")
    base = LLMConfig(transformer_impl=impl, attention_dropout=0.1, hidden_dropout=0.1)
    torch.manual_seed(0)
    reference = build_llm(base, ParallelConfig()).cuda().train()
    cfg = dataclasses.replace(base, recompute=recompute, recompute_modules=modules)
    model = build_llm(cfg, ParallelConfig()).cuda().train()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    positions = torch.arange(64, device="cuda").expand(2, 64)

    def step(llm, seed):
        llm.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        loss = llm(ids, positions, None, labels=ids.roll(-1, 1))
        loss.sum().backward()
        return loss.detach()

    _same_step(reference, model, step)
