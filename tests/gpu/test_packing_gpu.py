"""Proves (CUDA only) that packed rows give the padded batch's loss and gradients on the GPU, with
the local spec (SDPA per sequence) and with Transformer Engine's THD attention and fused RoPE (that
a packed micro-batch never makes the host wait: test_host_device.py)."""

import dataclasses

import pytest
import torch

from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from salm_megatron.models.host import to_device
from tests.speech_fixtures import speech_samples, tiny_config, wake_zero_outputs

pytestmark = pytest.mark.gpu

# (layer spec, dtype, relative tolerance): TE's fused attention runs in bf16 only.
SPECS = {
    "local": ("local", torch.float32, 1e-4),
    "transformer_engine": ("transformer_engine", torch.bfloat16, 3e-2),
}


def _model(arch: str, impl: str, dtype: torch.dtype):
    cfg = tiny_config(arch)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, transformer_impl=impl))
    torch.manual_seed(0)
    (model,) = build_speech_llm(cfg, params_dtype=dtype)
    wake_zero_outputs(model)
    return cfg, model.cuda().train()


def _loss_and_grads(model, batch, length, packed):
    model.zero_grad(set_to_none=True)
    loss = model(batch, length, packed=packed).float().sum()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["salm", "bestow"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_packed_rows_match_the_padded_batch_on_gpu(single_rank, arch, spec):
    impl, dtype, tol = SPECS[spec]
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine")
    _, model = _model(arch, impl, dtype)
    batch = to_device(collate(speech_samples(arch)), "cuda")
    length = int(model.layout(batch, None).lengths.sum())
    length = -(-(length + 5) // 16) * 16
    padded_loss, padded = _loss_and_grads(model, batch, None, packed=False)
    packed_loss, packed = _loss_and_grads(model, batch, length, packed=True)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=tol, atol=0)
    assert padded.keys() == packed.keys()
    total = torch.stack([g.norm() for g in padded.values()]).norm()
    for name, grad in padded.items():
        error = (packed[name] - grad).norm() / torch.maximum(grad.norm(), 1e-2 * total)
        assert error < tol * 10, (name, float(error))
