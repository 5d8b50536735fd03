"""Proves one rule places SALM's audio placeholder for training, decoding and conversion: Llama 3's
reserved token at its 128256 rows, a padded row, or the row hf-to-mcore adds for a Llama-2-style
tokenizer that fills the embedding (which then trains and exports); BESTOW needs none; a config
that cannot hold the placeholder names the fix."""

import json

import pytest
import torch

from salm_megatron.config import CheckpointConfig, Config, ConfigError, LLMConfig, ModelConfig
from salm_megatron.convert import commands
from salm_megatron.convert.hf_llm import hf_to_mcore, mcore_to_hf, placeholder_rows
from salm_megatron.data.tokenizers import load_tokenizer
from salm_megatron.training.data import check_tokenizer
from tests.tokenizer_layouts import llama2_sentencepiece, llama3_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3 = dict(vocab_size=128256, num_layers=2, hidden_size=64, ffn_hidden_size=128)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return llama3_tokenizer(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """A tiny random Llama 2 (384 rows, already a multiple of 128) with its sentencepiece
    tokenizer of 384 tokens beside it: no reserved token, no padded row."""
    folder = tmp_path_factory.mktemp("llama2") / "hf"
    config = transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    llama2_sentencepiece(folder)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return {"dir": folder, "ids": ids, "logits": logits}


def salm(llm: LLMConfig, **checkpoint) -> Config:
    return Config(llm=llm, checkpoint=CheckpointConfig(**checkpoint))


def test_llama3_trains_salm_and_bestow_at_its_vocabulary(llama3):
    tok = load_tokenizer(llama3)
    llm = LLMConfig(**LLAMA3)
    assert llm.padded_vocab_size == 128256  # the converted checkpoint's rows, unchanged
    resolved = check_tokenizer(salm(llm, pretrained_llm="ckpt"), tok)
    assert resolved.model.audio_token_id == resolved.placeholder_id == 128255
    bestow = Config(model=ModelConfig(arch="bestow"), llm=llm)
    assert check_tokenizer(bestow, tok) == bestow  # no placeholder, nothing filled in
    assert placeholder_rows(llama3, llm) == 0  # conversion adds no row


def test_a_padded_row_takes_the_placeholder(tmp_path):
    tok = load_tokenizer(llama2_sentencepiece(tmp_path, vocab_size=340))
    cfg = check_tokenizer(salm(LLMConfig(vocab_size=340)), tok)  # 384 rows
    assert cfg.model.audio_token_id == 340 and tok.vocab_size == 341
    assert check_tokenizer(cfg, tok) == cfg  # the value it filled in is the tokenizer's


def test_wrong_configs_name_the_fix(llama3, llama2):
    l3, l2 = load_tokenizer(llama3), load_tokenizer(llama2["dir"])
    given = Config(model=ModelConfig(audio_token_id=128000), llm=LLMConfig(**LLAMA3))
    with pytest.raises(ConfigError, match=r"places the audio placeholder at 128255 \(its reserv"):
        check_tokenizer(given, l3)
    with pytest.raises(ConfigError, match="has 128256 tokens but llm.vocab_size=32000"):
        check_tokenizer(salm(LLMConfig(vocab_size=32000)), l3)
    with pytest.raises(ConfigError, match="outside the embedding's rows 0..383"):
        Config(model=ModelConfig(audio_token_id=384), llm=LLMConfig(vocab_size=384))
    full = LLMConfig(vocab_size=384)  # the unconverted Llama 2: every row is a token
    with pytest.raises(ConfigError, match="convert the LLM with `salm convert hf-to-mcore`"):
        check_tokenizer(salm(full, pretrained_llm="ckpt"), l2)
    with pytest.raises(ConfigError, match="no row for the audio placeholder .* 384 rows; set llm"):
        check_tokenizer(salm(full), l2)
    bestow = Config(model=ModelConfig(arch="bestow"), llm=full)
    assert check_tokenizer(bestow, l2) == bestow


def test_conversion_adds_the_row_and_the_model_trains_and_exports(llama2, tmp_path, single_rank):
    from salm_megatron.data import collate
    from salm_megatron.data.samples import make_sample
    from salm_megatron.models import build_speech_llm
    from salm_megatron.training.checkpoint import load_pretrained

    out = tmp_path / "mcore"
    llm = hf_to_mcore(llama2["dir"], out)
    assert llm.vocab_size == 385 and llm.padded_vocab_size == 512
    assert "vocab_size: 385" in (out / "llm.yaml").read_text()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 385
    tok = load_tokenizer(out)  # the tokenizer copied beside
    cfg = check_tokenizer(salm(llm, pretrained_llm=str(out)), tok)
    assert cfg.placeholder_id == 384

    (model,) = build_speech_llm(cfg)
    load_pretrained(model.llm, out, "LLM")
    rows = model.llm.embedding.word_embeddings.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama2["dir"])
    assert torch.equal(rows[:384], hf.model.embed_tokens.weight) and not rows[384:].any()
    raw = {"key": "k", "audio": torch.randn(4000), "answer": "four", "task": "asr"}
    batch = collate([make_sample(raw, tok, "llama2", "salm")])
    loss = model(batch)
    assert torch.isfinite(loss).all() and int((loss != 0).sum()) == 2  # "▁four", EOS

    back = mcore_to_hf(out, tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert exported.config.vocab_size == 385
    with torch.no_grad():
        logits = exported(llama2["ids"]).logits
    torch.testing.assert_close(logits[..., :384], llama2["logits"], rtol=0, atol=1e-4)

    # --extra-tokens replaces the automatic choice.
    argv = ["hf-to-mcore", "--hf", str(llama2["dir"]), "--out", str(tmp_path / "none")]
    assert commands.main([*argv, "--extra-tokens", "0"]) == 0
    assert "vocab_size: 384" in (tmp_path / "none" / "llm.yaml").read_text()
