"""Proves (CUDA + TE only) that the TE spec computes what the local spec does, and FP8 trains."""

import pytest
import torch

from salm_megatron.config import LLMConfig, ParallelConfig
from salm_megatron.llm import build_llm

pytestmark = pytest.mark.gpu

# Local-spec names of the norms that TE fuses into the following linear.
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _te_name(local_name: str) -> str:
    for local, te in LOCAL_TO_TE.items():
        if local_name.endswith(local):
            return local_name[: -len(local)] + te
    return local_name


def test_te_spec_matches_local_spec(single_rank):
    pytest.importorskip("transformer_engine")
    torch.backends.cuda.matmul.allow_tf32 = False
    local = build_llm(LLMConfig(transformer_impl="local"), ParallelConfig()).cuda().eval()
    te = build_llm(LLMConfig(transformer_impl="transformer_engine"), ParallelConfig()).cuda().eval()
    te_params = dict(te.named_parameters())
    with torch.no_grad():
        for name, p in local.named_parameters():
            te_params.pop(_te_name(name)).copy_(p)
    assert not te_params, f"TE parameters without a local counterpart: {sorted(te_params)}"
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    positions = torch.arange(32, device="cuda").expand(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            te(ids, positions, None), local(ids, positions, None), rtol=1e-4, atol=1e-4
        )


def test_sdpa_local_spec_runs_bf16_on_gpu(single_rank):
    model = build_llm(
        LLMConfig(transformer_impl="local"), ParallelConfig(), params_dtype=torch.bfloat16
    ).cuda()
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    loss = model(ids, torch.arange(64, device="cuda").expand(2, 64), None, labels=ids)
    loss.float().mean().backward()
    assert torch.isfinite(loss).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 needs sm89+",
)
def test_fp8_hybrid_forward_backward(single_rank):
    pytest.importorskip("transformer_engine")
    cfg = LLMConfig(hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, fp8="hybrid")
    model = build_llm(cfg, ParallelConfig(), params_dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 256, (2, 32), device="cuda")  # FP8 GEMMs need multiples of 16
    loss = (
        model(ids, torch.arange(32, device="cuda").expand(2, 32), None, labels=ids).float().mean()
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
