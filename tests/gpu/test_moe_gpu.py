"""Proves (CUDA + TE only) that a Qwen3-MoE LLM on the Transformer Engine spec (grouped-GEMM
experts, TE query/key norms) loads the checkpoint of the local spec's (experts one after the other,
as on CPU) and computes its logits, and trains a bf16 step."""

import pytest
import torch

from salm_megatron.config import ParallelConfig, llm_preset
from salm_megatron.llm import build_llm
from salm_megatron.training import checkpoint

pytestmark = pytest.mark.gpu


def _moe(impl: str, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    llm = llm_preset("tiny-moe", transformer_impl=impl)
    return build_llm(llm, ParallelConfig(), params_dtype=dtype).cuda()


def test_te_moe_loads_a_local_moe_checkpoint_and_gives_its_logits(single_rank, tmp_path):
    pytest.importorskip("transformer_engine")
    torch.backends.cuda.matmul.allow_tf32 = False
    local, te = _moe("local", 0).eval(), _moe("transformer_engine", 1).eval()
    checkpoint.save_module(local, tmp_path / "local")
    checkpoint.load_pretrained(te, tmp_path / "local", "LLM")
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    positions = torch.arange(32, device="cuda").expand(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            te(ids, positions, None), local(ids, positions, None), rtol=1e-4, atol=1e-4
        )


def test_te_moe_trains_a_bf16_step(single_rank):
    pytest.importorskip("transformer_engine")
    model = _moe("transformer_engine", 0, torch.bfloat16)
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    loss = model(ids, torch.arange(64, device="cuda").expand(2, 64), None, labels=ids)
    loss.float().mean().backward()
    assert torch.isfinite(loss).all()
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.grad is not None and torch.isfinite(p.grad).all() for p in experts)
