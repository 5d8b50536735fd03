"""Proves build_llm makes a real Llama-family decoder: it equals an independent Llama forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from salm_megatron.config import ConfigError, LLMConfig, ParallelConfig
from salm_megatron.llm import build_llm, uses_transformer_engine


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, inv_freq):
    """Rotate-half RoPE (Llama/HF convention); x [b, s, heads, d]."""
    freqs = positions[:, :, None].float() * inv_freq  # [b, s, d/2]
    cos = torch.cat([freqs.cos(), freqs.cos()], -1)[:, :, None]
    sin = torch.cat([freqs.sin(), freqs.sin()], -1)[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _llama3_inv_freq(d, base, factor, low=1.0, high=4.0, original=8192):
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def reference_llama(sd, cfg: LLMConfig, ids):
    """Llama forward written from the architecture, reading Megatron's tensor layouts."""
    n, g, d, eps = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.norm_epsilon
    b, s = ids.shape
    positions = torch.arange(s).expand(b, s)
    if cfg.rope_scaling_factor:
        inv_freq = _llama3_inv_freq(d, cfg.rotary_base, cfg.rope_scaling_factor)
    else:
        inv_freq = 1.0 / cfg.rotary_base ** (torch.arange(0, d, 2).float() / d)
    x = sd["embedding.word_embeddings.weight"][ids]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = F.linear(
            h,
            sd[p + "self_attention.linear_qkv.weight"],
            sd.get(p + "self_attention.linear_qkv.bias"),
        )
        # Megatron's fused QKV: per query group, its n/g query heads, then one key and one value.
        qkv = qkv.view(b, s, g, n // g + 2, d)
        q = qkv[:, :, :, : n // g].reshape(b, s, n, d)
        k, v = qkv[:, :, :, n // g], qkv[:, :, :, n // g + 1]
        q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
        k, v = k.repeat_interleave(n // g, 2), v.repeat_interleave(n // g, 2)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        attn = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, n * d)
        x = x + F.linear(attn, sd[p + "self_attention.linear_proj.weight"])
        h = _rms(x, sd[p + "pre_mlp_layernorm.weight"], eps)
        gate, up = F.linear(h, sd[p + "mlp.linear_fc1.weight"]).chunk(2, -1)
        x = x + F.linear(F.silu(gate) * up, sd[p + "mlp.linear_fc2.weight"])
    x = _rms(x, sd["decoder.final_layernorm.weight"], eps)
    out = (
        sd["embedding.word_embeddings.weight"] if cfg.tie_embeddings else sd["output_layer.weight"]
    )
    return F.linear(x, out)


VARIANTS = {
    "gqa": dict(),
    "mha-tied-bias": dict(num_query_groups=4, tie_embeddings=True, qkv_bias=True),
    "llama3-rope-scaling": dict(rotary_base=500000.0, rope_scaling_factor=32.0, norm_epsilon=1e-6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoder_equals_reference_llama(single_rank, variant):
    cfg = LLMConfig(**VARIANTS[variant])
    model = build_llm(cfg, ParallelConfig()).eval()
    with torch.no_grad():  # random biases so the QKV bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.uniform_(-0.5, 1.5)
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids, torch.arange(12).expand(2, 12), None)
        expected = reference_llama(sd, cfg, ids)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_matches_config(single_rank, variant):
    cfg = LLMConfig(**VARIANTS[variant], vocab_size=200)
    model = build_llm(cfg, ParallelConfig())
    assert cfg.padded_vocab_size == 256
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters(padded_vocab=True)
    has_bias = any(n.endswith("linear_qkv.bias") for n, _ in model.named_parameters())
    assert has_bias == cfg.qkv_bias


def test_loss_is_token_cross_entropy(single_rank):
    cfg = LLMConfig()
    model = build_llm(cfg, ParallelConfig()).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        loss = model(ids[:, :-1], positions, None, labels=ids[:, 1:])
        logits = model(ids[:, :-1], positions, None)
    expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        2, 8
    )
    torch.testing.assert_close(loss, expected)


def test_local_spec_on_cpu_and_a_clear_error_when_te_is_demanded():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert not uses_transformer_engine(LLMConfig())
    with pytest.raises(
        RuntimeError, match="transformer_impl='transformer_engine' but Transformer Engine"
    ):
        uses_transformer_engine(LLMConfig(transformer_impl="transformer_engine"))
    with pytest.raises(RuntimeError, match="llm.fp8='e4m3' needs Transformer Engine with CUDA"):
        uses_transformer_engine(LLMConfig(fp8="e4m3"))


def test_checkpoint_keys_match_the_transformer_engine_layout(single_rank):
    """Local-spec norms are saved under TE's fused names, so checkpoints move between the specs."""
    keys = set(build_llm(LLMConfig(), ParallelConfig()).sharded_state_dict())
    sharded_keys = {
        sh.key
        for sh in build_llm(LLMConfig(), ParallelConfig()).sharded_state_dict().values()
        if hasattr(sh, "key")
    }
    assert "decoder.layers.0.input_layernorm.weight" in keys
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in sharded_keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in sharded_keys


def test_builder_rejects_a_layout_changed_after_validation(single_rank):
    layout = ParallelConfig()
    layout.pipeline_model_parallel_size = 3  # bypasses ParallelConfig's own checks
    with pytest.raises(ConfigError, match="llm.num_layers=4 is not divisible by .* = 3 x 1 = 3"):
        build_llm(LLMConfig(), layout)
