"""Proves decoding with the KV cache equals full recomputation token for token (SALM, BESTOW;
greedy, sampling, beam search; fp32 and bf16; on an MoE LLM too), that a sample decodes alike
alone and in a left-padded batch (sampled ones too: each draws from its own seeded stream), that
beam search reorders the cache in place, and the decoding rules: stop tokens, banned ids, top-k 1
and beam 1 are greedy, seeds repeat; validation's decoding copy carries every weight; MoE experts
decode at EP=1 unless placed inside the TP group."""

import dataclasses

import pytest
import torch

from salm_megatron.config import DecodeConfig, ParallelConfig, apply_overrides
from salm_megatron.data import build_prompt, load_tokenizer
from salm_megatron.data.prompts import generation_prompt
from salm_megatron.inference.generation import Generator, _Cached
from salm_megatron.inference.loading import generation_config
from salm_megatron.models import build_speech_llm
from salm_megatron.models.local_copy import copy_weights, decoding_model
from tests.speech_fixtures import (
    AUDIO_TOKEN,
    make_hf_tokenizer,
    prompt_samples,
    tiny_config,
    wake_zero_outputs,
)

ARCHS = ("salm", "bestow")
EOS = 2


def _generator(
    arch: str, dtype: torch.dtype = torch.float32, llm: str = "tiny", **decoding
) -> Generator:
    torch.manual_seed(0)
    cfg = apply_overrides(tiny_config(arch), [f"llm.preset={llm}"])
    (model,) = build_speech_llm(cfg, params_dtype=dtype)
    wake_zero_outputs(model)
    settings = {"max_new_tokens": 10, "beam_size": 3, "top_k": 20, "top_p": 0.9, **decoding}
    return Generator(
        model, DecodeConfig(**settings), stop_ids={EOS}, vocab_size=250, banned_ids=(AUDIO_TOKEN,)
    )


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cache_equals_recomputation(single_rank, arch, strategy):
    generator = _generator(arch, strategy=strategy, temperature=0.8)
    samples = prompt_samples(arch)
    cached = generator.generate(samples)
    assert cached == generator.generate(samples, use_cache=False)
    assert all(cached) and len(cached) == len(samples)
    if strategy != "beam":  # 10 tokens, or fewer ending with the stop token
        assert all(len(t) == 10 or t[-1] == EOS for t in cached)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@pytest.mark.parametrize("arch", ARCHS)
def test_moe_cache_equals_recomputation(single_rank, arch, strategy):
    """tiny-moe (Qwen3-MoE): MoE layers in inference route every token to its top-k experts
    (no dropping, no auxiliary loss), with the KV cache as without it."""
    generator = _generator(arch, llm="tiny-moe", strategy=strategy)
    samples = prompt_samples(arch)
    cached = generator.generate(samples)
    assert cached == generator.generate(samples, use_cache=False)
    assert all(cached) and len(cached) == len(samples)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_changes_nothing(single_rank, arch):
    generator = _generator(arch)
    samples = prompt_samples(arch)
    together = generator.generate(samples)
    assert together == [generator.generate([s])[0] for s in samples]
    beam = _generator(arch, strategy="beam")
    assert beam.generate(samples) == [beam.generate([s])[0] for s in samples]


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_does_not_depend_on_the_batch(single_rank, arch):
    generator = _generator(arch, strategy="sample", seed=7)
    samples = prompt_samples(arch)
    together = generator.generate(samples)  # batch size 3
    assert together == [generator.generate([s])[0] for s in samples]  # batch size 1
    assert generator.generate(samples[::-1]) == together[::-1]
    assert together != _generator(arch, strategy="sample", seed=8).generate(samples)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_beam_reorders_the_cache_in_place(single_rank, arch):
    generator = _generator(arch, strategy="beam")
    rows = _Cached(generator, prompt_samples(arch), rows=6)
    memory = rows.context.key_value_memory_dict
    used = rows.context.sequence_len_offset
    before = {
        layer: [(t.data_ptr(), t[:used, :3].clone()) for t in kv] for layer, kv in memory.items()
    }
    index = torch.tensor([2, 0, 1, 1, 0, 2])
    rows.reorder(index)
    assert memory  # every LLM layer has its buffers
    for layer, kv in memory.items():
        for tensor, (pointer, old) in zip(kv, before[layer], strict=True):
            assert tensor.data_ptr() == pointer and tensor.shape[1] == 6  # the same buffer
            assert torch.equal(tensor[:used, :6], old[:, index])


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_decoding_equals_its_recomputation(single_rank, arch):
    for strategy in ("greedy", "beam"):
        generator = _generator(arch, torch.bfloat16, strategy=strategy)
        samples = prompt_samples(arch)
        cached = generator.generate(samples)
        assert cached == generator.generate(samples, use_cache=False) and all(cached)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_rules(single_rank, arch):
    samples = prompt_samples(arch)
    greedy = _generator(arch).generate(samples)
    assert _generator(arch, strategy="sample", top_k=1).generate(samples) == greedy
    assert _generator(arch, strategy="beam", beam_size=1, length_penalty=0.0).generate(samples) == [
        t for t in greedy
    ]
    first = _generator(arch, strategy="sample", seed=5).generate(samples)
    assert _generator(arch, strategy="sample", seed=5).generate(samples) == first
    assert _generator(arch, strategy="sample", seed=6).generate(samples) != first

    # The likeliest first token, banned, never appears; made a stop token, it ends every row.
    top = greedy[0][0]
    banned = _generator(arch)
    banned.banned_ids.append(top)
    assert all(top not in row for row in banned.generate(samples))
    stopping = _generator(arch)
    stopping.stop_ids = [top]
    assert stopping.generate(samples[:1]) == [[top]]


def test_generation_prompt_stops_where_the_answer_starts(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path))
    for fmt, end in (("plain", tok.eos_id), ("llama3", tok.require("<|eot_id|>"))):
        full = build_prompt(tok, fmt, "Transcribe the audio.", "one two", 1)
        prompt, stop = generation_prompt(tok, fmt, "Transcribe the audio.", 1)
        assert full.input_ids[: len(prompt)] == prompt
        assert full.answer_mask[len(prompt)] == 1 and not any(full.answer_mask[: len(prompt)])
        assert stop == end == full.input_ids[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_validation_decodes_a_copy_with_the_same_weights(single_rank, arch):
    """``copy_weights`` (how validation copies a TE-spec model into the local spec) carries every
    weight by checkpoint key: a model of other weights then decodes as the source does."""
    source = _generator(arch)
    torch.manual_seed(1)
    (target,) = build_speech_llm(tiny_config(arch))
    pairs = [
        ((name, mine), theirs)
        for (name, mine), theirs in zip(
            target.state_dict().items(), source.model.state_dict().values(), strict=True
        )
        if isinstance(mine, torch.Tensor)  # not the modules' empty extra state
    ]
    assert any(not torch.equal(mine, theirs) for (_, mine), theirs in pairs)
    copy_weights(source.model, target)
    for (name, mine), theirs in pairs:
        assert torch.equal(mine, theirs), name
    copied = Generator(
        target, source.decoding, stop_ids={EOS}, vocab_size=250, banned_ids=(AUDIO_TOKEN,)
    )
    samples = prompt_samples(arch)
    assert copied.generate(samples) == source.generate(samples)
    assert decoding_model(tiny_config(arch), source.model) is source.model  # the local spec


def test_weights_of_another_model_are_refused(single_rank):
    (salm,), (bestow,) = (build_speech_llm(tiny_config(arch)) for arch in ARCHS)
    with pytest.raises(KeyError, match="cross_attention"):
        copy_weights(salm, bestow)


def test_decoding_puts_experts_at_ep1_unless_told():
    """An EP=2 training run decodes at EP=1 (DP ranks decode on their own; the checkpoint
    reshards), or with its experts placed inside the TP group when the overrides say so."""
    cfg = apply_overrides(tiny_config("salm"), ["llm.preset=tiny-moe"])
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig(expert_model_parallel_size=2))
    decoding = generation_config(cfg, 1, []).parallel
    assert (decoding.expert_model_parallel_size, decoding.expert_tensor_parallel_size) == (1, None)
    placed = generation_config(cfg, 2, ["parallel.expert_tensor_parallel_size=1"]).parallel
    assert (placed.expert_model_parallel_size, placed.expert_tensor_parallel_size) == (2, 1)
