"""Every LLM tensor as a rule: its name in GPTModel's state dict at TP=1, the Hugging Face tensors
it is made of, and how to join and split them.

Megatron's tensors differ from Hugging Face's in three ways: q/k/v are one matrix, grouped per
query group as [q heads of the group, k, v]; gate and up are one matrix [gate; up] (in every
expert too); the vocabulary is padded to ``LLMConfig.padded_vocab_size`` with zero rows. The rest
(norms, Qwen3's per-head query/key norms, the MoE router, down projections) carry over as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..config import LLMConfig
from .hf_io import ConversionError
from .llm_families import family_of

# Hugging Face tensors that carry nothing (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Megatron tensor (its name in GPTModel's state dict at TP=1) and the Hugging Face
    tensors it is made of, with their shapes; ``join`` and ``split`` convert both ways."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    join: Callable[..., torch.Tensor]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _same(megatron: str, hf: str, shape: tuple[int, ...]) -> Rule:
    return Rule(megatron, (hf,), (shape,), lambda t: t, lambda t: (t,))


def _vocab_rows(llm: LLMConfig, megatron: str, hf: str, hf_vocab: int) -> Rule:
    """Embedding or output layer: zero rows appended up to the padded vocabulary (the rows of
    tokens conversion adds among them)."""
    vocab, padded = llm.vocab_size, llm.padded_vocab_size

    def join(t):
        rows = padded - hf_vocab
        return torch.cat([t, t.new_zeros(rows, *t.shape[1:])]) if rows else t

    return Rule(megatron, (hf,), ((hf_vocab, llm.hidden_size),), join, lambda t: (t[:vocab],))


def _qkv(llm: LLMConfig, megatron: str, hf: tuple[str, str, str], rest: tuple[int, ...]) -> Rule:
    """q, k, v ``[heads * d, ...]`` -> per query group [its q heads, k, v] stacked."""
    groups, d = llm.num_query_groups, llm.head_dim
    q_rows = llm.num_attention_heads // groups * d

    def join(q, k, v):
        parts = (
            q.reshape(groups, q_rows, *rest),
            k.reshape(groups, d, *rest),
            v.reshape(groups, d, *rest),
        )
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def split(qkv):
        q, k, v = qkv.reshape(groups, q_rows + 2 * d, *rest).split([q_rows, d, d], dim=1)
        return tuple(t.reshape(-1, *rest) for t in (q, k, v))

    shapes = ((groups * q_rows, *rest), (groups * d, *rest), (groups * d, *rest))
    return Rule(megatron, hf, shapes, join, split)


def _swiglu(megatron: str, hf: str, ffn: int, hidden: int) -> list[Rule]:
    """A SwiGLU MLP (dense, or one expert): gate and up ``[ffn, h]`` -> one ``[2 * ffn, h]``
    matrix, gate first; down as it is."""
    shape = (ffn, hidden)
    return [
        Rule(
            f"{megatron}linear_fc1.weight",
            (f"{hf}gate_proj.weight", f"{hf}up_proj.weight"),
            (shape, shape),
            lambda gate, up: torch.cat([gate, up]),
            lambda t: (t[:ffn], t[ffn:]),
        ),
        _same(f"{megatron}linear_fc2.weight", f"{hf}down_proj.weight", (hidden, ffn)),
    ]


def _mlp(llm: LLMConfig, megatron: str, hf: str) -> list[Rule]:
    """A dense MLP, or an MoE layer: the router (HF ``gate``) and each expert's MLP."""
    h = llm.hidden_size
    if not llm.is_moe:
        return _swiglu(megatron, hf, llm.ffn_hidden_size, h)
    rules = [_same(f"{megatron}router.weight", f"{hf}gate.weight", (llm.num_moe_experts, h))]
    for j in range(llm.num_moe_experts):
        expert = f"{megatron}experts.local_experts.{j}."
        rules += _swiglu(expert, f"{hf}experts.{j}.", llm.expert_ffn_hidden_size, h)
    return rules


def conversion_rules(llm: LLMConfig, hf_vocab: int | None = None) -> list[list[Rule]]:
    """Every tensor of the model, in groups read together: embedding, each layer, the end.
    ``hf_vocab``: the Hugging Face vocabulary when it lacks tokens ``llm.vocab_size`` adds."""
    h, d = llm.hidden_size, llm.head_dim
    heads_dim = llm.num_attention_heads * d
    hf_vocab = llm.vocab_size if hf_vocab is None else hf_vocab
    embedding = "embedding.word_embeddings.weight", "model.embed_tokens.weight"
    groups = [[_vocab_rows(llm, *embedding, hf_vocab)]]
    for i in range(llm.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn, qkv = f"{hf}self_attn.", f"{mc}self_attention.linear_qkv"
        layer = [
            _same(f"{mc}input_layernorm.weight", f"{hf}input_layernorm.weight", (h,)),
            _qkv(llm, f"{qkv}.weight", tuple(f"{attn}{x}_proj.weight" for x in "qkv"), (h,)),
            _same(f"{mc}self_attention.linear_proj.weight", f"{attn}o_proj.weight", (h, heads_dim)),
            _same(f"{mc}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight", (h,)),
            *_mlp(llm, f"{mc}mlp.", f"{hf}mlp."),
        ]
        if llm.qkv_bias:
            layer.append(_qkv(llm, f"{qkv}.bias", tuple(f"{attn}{x}_proj.bias" for x in "qkv"), ()))
        if llm.qk_layernorm:
            for x in "qk":  # Qwen3's per-head query and key norms
                norm = f"{mc}self_attention.{x}_layernorm.weight"
                layer.append(_same(norm, f"{attn}{x}_norm.weight", (d,)))
        groups.append(layer)
    last = [_same("decoder.final_layernorm.weight", "model.norm.weight", (h,))]
    if not llm.tie_embeddings:
        last.append(_vocab_rows(llm, "output_layer.weight", "lm_head.weight", hf_vocab))
    groups.append(last)
    return groups


def check_hf_tensors(shapes: dict[str, tuple], rules: list[Rule], llm: LLMConfig, where) -> None:
    """Every tensor the rules need is there with its shape; nothing unknown is left over."""
    expected = {name: shape for r in rules for name, shape in zip(r.hf, r.hf_shapes, strict=True)}
    for name, shape in expected.items():
        if name not in shapes:
            raise ConversionError(f"{where}: tensor {name} is missing")
        if shapes[name] != shape:
            raise ConversionError(
                f"{where}: tensor {name} has shape {list(shapes[name])}, expected {list(shape)} "
                "from config.json"
            )
    for name in shapes:
        if name in expected or name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and llm.tie_embeddings:
            continue  # some tied checkpoints store the output layer too
        raise ConversionError(
            f"{where}: unexpected tensor {name} (not a {family_of(llm).name} weight)"
        )
