"""Proves SDPAttention and Norm compute textbook attention, RMSNorm and LayerNorm."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from salm_megatron.llm.attention import SDPAttention
from salm_megatron.llm.norms import Norm


def _config(**kw):
    base = dict(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return TransformerConfig(**{**base, **kw})


def _naive_attention(q, k, v, allowed):
    """q [s, b, n, d], k/v [s, b, g, d], allowed [sq, sk] or [b, 1, sq, sk] bool (True = attend)."""
    n, g = q.shape[2], k.shape[2]
    k = k.repeat_interleave(n // g, dim=2)
    v = v.repeat_interleave(n // g, dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bnqk,kbnd->qbnd", scores.softmax(-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _qkv(sq=6, sk=6, b=2, n=4, g=2, d=8):
    g_ = torch.Generator().manual_seed(0)
    return (
        torch.randn(sq, b, n, d, generator=g_),
        torch.randn(sk, b, g, d, generator=g_),
        torch.randn(sk, b, g, d, generator=g_),
    )


def test_causal_gqa_attention_matches_naive():
    attn = SDPAttention(_config(), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(q, k, v, None), _naive_attention(q, k, v, causal))


def test_padding_mask_uses_megatron_convention_and_stays_causal():
    attn = SDPAttention(_config(), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv()
    masked = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    masked[1, ..., 4:] = True  # sample 1: last two keys are padding (True = masked out)
    allowed = ~masked & torch.ones(6, 6, dtype=torch.bool).tril()
    out = attn(q, k, v, masked)
    torch.testing.assert_close(out, _naive_attention(q, k, v, allowed))
    # Sample 0 is unaffected by sample 1's padding.
    torch.testing.assert_close(out[:, 0], attn(q, k, v, None)[:, 0])


def test_decode_step_attends_to_all_earlier_keys():
    """One new query against a longer key cache: causal alignment is bottom-right."""
    attn = SDPAttention(_config(), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(sq=1, sk=6)
    no_padding = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    expected = _naive_attention(q, k, v, torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(attn(q, k, v, no_padding), expected)


def test_attention_dropout_uses_the_model_parallel_rng(single_rank):
    from megatron.core import tensor_parallel

    attn = SDPAttention(_config(attention_dropout=0.5), 1, AttnMaskType.causal, "self").train()
    q, k, v = _qkv()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = {name: state.clone() for name, state in tracker.get_states().items()}
    before = torch.get_rng_state()
    first = attn(q, k, v, None)
    assert torch.equal(torch.get_rng_state(), before), "dropout must not consume the default RNG"
    tracker.set_states(states)
    torch.testing.assert_close(attn(q, k, v, None), first)  # same tracker state, same mask
    assert not torch.allclose(attn(q, k, v, None), first)  # the tracker advanced
    assert torch.allclose(attn.eval()(q, k, v, None), attn(q, k, v, None))  # eval: no dropout


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_norm_matches_torch(normalization):
    config = _config(normalization=normalization)
    norm = Norm(config, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 2, 32)
    if normalization == "RMSNorm":
        expected = torch.nn.functional.rms_norm(x, (32,), norm.weight, 1e-6)
    else:
        expected = torch.nn.functional.layer_norm(x, (32,), norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(norm(x), expected)
    # bf16 input: computed in fp32, returned in the input dtype.
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_norm_marks_its_parameters_for_sequence_parallel_reduction():
    on = Norm(_config(tensor_model_parallel_size=2, sequence_parallel=True), 32)
    off = Norm(_config(), 32)
    assert all(p.sequence_parallel for p in on.parameters())
    assert not any(p.sequence_parallel for p in off.parameters())
