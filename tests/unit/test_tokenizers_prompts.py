"""Proves both tokenizer kinds behind one interface and the prompt formats' ids and answer masks."""

import pytest

from salm_megatron.data.prompts import build_prompt, instruction
from salm_megatron.data.tokenizers import AUDIO_TOKEN, load_tokenizer
from tests.speech_fixtures import CORPUS, make_hf_tokenizer


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tok"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=120,
        model_type="bpe", minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf"))


def test_sentencepiece_interface(sentencepiece_model):
    tok = load_tokenizer(sentencepiece_model)
    ids = tok.encode("the quick brown fox")
    assert tok.decode(ids) == "the quick brown fox"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.audio_token_id == tok.base_vocab_size == 120 and tok.vocab_size == 121
    assert tok.decode(ids + [tok.audio_token_id]) == "the quick brown fox"


def test_hugging_face_interface(hf_folder):
    tok = load_tokenizer(hf_folder)  # a folder with tokenizer.json
    ids = tok.encode("what is the sum of the numbers")
    assert tok.decode(ids) == "what is the sum of the numbers"
    assert tok.bos_id == tok.token_id("<|begin_of_text|>")
    assert tok.eos_id == tok.token_id("<|end_of_text|>")  # from tokenizer_config.json
    assert tok.audio_token_id == tok.base_vocab_size and tok.vocab_size == tok.base_vocab_size + 1


def test_an_existing_audio_token_is_reused_and_text_never_makes_one(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "hf", extra_special=[AUDIO_TOKEN]))
    assert tok.audio_token_id == tok.token_id(AUDIO_TOKEN) < tok.base_vocab_size
    plain = load_tokenizer(make_hf_tokenizer(tmp_path / "plain"))
    assert plain.audio_token_id not in plain.encode(f"a transcript with {AUDIO_TOKEN} in it")


@pytest.mark.parametrize("fmt", ["plain", "llama2", "llama3"])
def test_formats_mark_only_answer_and_end(hf_folder, sentencepiece_model, fmt):
    tok = load_tokenizer(hf_folder if fmt == "llama3" else sentencepiece_model)
    prompt = build_prompt(tok, fmt, "Transcribe the audio.", "one two three", audio_segments=2)
    assert len(prompt.input_ids) == len(prompt.answer_mask)
    assert prompt.input_ids.count(tok.audio_token_id) == 2
    answer = [i for i, m in zip(prompt.input_ids, prompt.answer_mask, strict=True) if m]
    end = tok.token_id("<|eot_id|>") if fmt == "llama3" else tok.eos_id
    assert answer[-1] == end and tok.decode(answer[:-1]).strip() == "one two three"
    # The mask is one contiguous run at the end: nothing of the prompt is learned.
    first = prompt.answer_mask.index(1)
    assert all(prompt.answer_mask[first:]) and not any(prompt.answer_mask[:first])
    if tok.bos_id is not None:
        assert prompt.input_ids[0] == tok.bos_id


def test_plain_and_llama3_layouts(hf_folder):
    hf = load_tokenizer(hf_folder)
    plain = build_prompt(hf, "plain", "what is the sum", "ten", audio_segments=1)
    assert plain.input_ids[:2] == [hf.bos_id, hf.audio_token_id]
    assert hf.decode(plain.input_ids[2:-1]) == "Q: what is the sum\nA: ten"
    chat = build_prompt(hf, "llama3", "what is the sum", "ten", audio_segments=0)
    ids = chat.input_ids
    assert ids[0] == hf.token_id("<|begin_of_text|>")
    assert ids.count(hf.token_id("<|start_header_id|>")) == 2
    assert ids.count(hf.token_id("<|eot_id|>")) == 2 and ids[-1] == hf.token_id("<|eot_id|>")
    assert hf.audio_token_id not in ids  # BESTOW: no placeholder


def test_bad_formats_and_tokenizers(sentencepiece_model, tmp_path):
    sp = load_tokenizer(sentencepiece_model)
    with pytest.raises(ValueError, match="has no token '<|begin_of_text|>'"):
        build_prompt(sp, "llama3", "q", "a")
    with pytest.raises(ValueError, match="prompt format 'chatml' is not one of"):
        build_prompt(sp, "chatml", "q", "a")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_default_instructions():
    assert instruction("asr", None) == "Transcribe the audio."
    assert instruction("asr", "Write down what you hear.") == "Write down what you hear."
    assert instruction("ast", "", lang="German") == "Translate the audio into German."
    with pytest.raises(ValueError, match="task 'ast' needs the sample's lang"):
        instruction("ast", None)
    with pytest.raises(ValueError, match="task 'sqa', which has no default instruction"):
        instruction("sqa", None)


@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_make_sample_prompts_a_decoded_sample(hf_folder, arch):
    import torch

    from salm_megatron.data.batching import ListSource
    from salm_megatron.data.samples import Mapped, make_sample

    tok = load_tokenizer(hf_folder)
    raw = {"key": "k1", "audio": torch.zeros(1600), "answer": "one two", "task": "asr"}
    sample = make_sample(raw, tok, "llama3", arch)
    assert sample.key == "k1" and len(sample.audio) == 1
    assert sample.input_ids.count(tok.audio_token_id) == (1 if arch == "salm" else 0)
    answer = [i for i, m in zip(sample.input_ids, sample.answer_mask, strict=True) if m]
    assert tok.decode(answer) == "one two"
    # Mapping keeps the stream resumable.
    stream = Mapped(ListSource([dict(raw, key=f"k{i}") for i in range(4)]),
                    lambda r: make_sample(r, tok, "plain", arch))  # fmt: skip
    first = [s.key for _, s in zip(range(2), stream, strict=False)]
    again = Mapped(ListSource([dict(raw, key=f"k{i}") for i in range(4)]),
                   lambda r: make_sample(r, tok, "plain", arch))  # fmt: skip
    again.load_state_dict(stream.state_dict())
    assert first + [s.key for s in again] == ["k0", "k1", "k2", "k3"]
