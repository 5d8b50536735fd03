"""Tiny random Hugging Face LLMs (Llama 3, Llama 3.2 tied, Qwen2 with QKV bias, Qwen3 with
query/key norms and wide heads, Qwen3-MoE) saved locally, with their logits on a fixed batch: the
reference of the LLM conversion tests."""

from __future__ import annotations

from pathlib import Path

import torch

BATCH, SEQ = 4, 16
LLAMA3_ROPE = dict(
    rope_type="llama3",
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CASES = {
    # GQA, Llama-3.1 rope scaling, untied output layer, vocabulary padded 300 -> 384;
    # saved in several safetensors shards.
    "llama3": dict(
        family="llama",
        num_key_value_heads=2,
        vocab_size=300,
        rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, **LLAMA3_ROPE),
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        max_shard_size="60KB",
    ),
    # Llama 3.2: tied embeddings, scaling factor 32.
    "llama3.2": dict(
        family="llama",
        num_key_value_heads=2,
        vocab_size=320,
        rope_theta=500000.0,
        rope_scaling=dict(factor=32.0, **LLAMA3_ROPE),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    # Qwen2: QKV bias, plain rope, multi-head attention (as many key/value heads as queries).
    "qwen2": dict(
        family="qwen2",
        num_key_value_heads=4,
        vocab_size=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # Qwen3: per-head query/key RMSNorm, heads of 32 (not hidden/heads = 16), tied.
    "qwen3": dict(
        family="qwen3",
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # Qwen3-MoE: 4 experts of FFN 48, top 2 renormalised (Qwen3-30B-A3B's norm_topk_prob).
    "qwen3_moe": dict(
        family="qwen3_moe",
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        max_shard_size="60KB",
    ),
}
MOE_CASES = ("qwen3_moe",)


def hf_config(case: str):
    import transformers

    fields = dict(CASES[case])
    family = fields.pop("family")
    fields.pop("max_shard_size", None)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }[family]
    return cls(**SHAPE, **fields)


def save_hf_model(case: str, folder: Path, dtype: torch.dtype = torch.float32) -> dict:
    """Save a random model of ``case`` (every weight perturbed, so no bias stays zero and no
    norm stays one) with a tokenizer file; returns its logits on :func:`input_ids`."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(case)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(folder, max_shard_size=CASES[case].get("max_shard_size", "1GB"))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 8192}\n')
    return logits_of(model.float())


def input_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=g)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids(model.config.vocab_size)).logits.float()


def convert_cases(root: Path, cases=tuple(CASES)) -> dict[str, dict]:
    """Each case saved by transformers under ``root/<case>/hf`` and converted by hf-to-mcore to
    ``root/<case>/mcore``; ``reference.pt`` beside them holds the input ids and HF logits."""
    from salm_megatron.convert.hf_llm import hf_to_mcore

    out = {}
    for case in cases:
        folder = root / case
        folder.mkdir(parents=True)
        logits = save_hf_model(case, folder / "hf")
        llm = hf_to_mcore(folder / "hf", folder / "mcore")
        reference = {"input_ids": input_ids(llm.vocab_size), "logits": logits}
        torch.save(reference, folder / "reference.pt")
        out[case] = {"dir": folder, "llm": llm, **reference}
    return out
