"""Proves both tokenizer kinds behind one interface, where the audio placeholder goes in real
layouts (Llama 3, Llama 2, Mistral v0.3), and the prompt formats' ids and answer masks: the pieces
of the whole text (no stray "▁" before an answer), the same prompt for training and decoding."""

import pytest

from salm_megatron.data.prompts import build_prompt, generation_prompt, instruction
from salm_megatron.data.tokenizers import AUDIO_TOKEN, load_tokenizer
from tests.speech_fixtures import CORPUS, make_hf_tokenizer
from tests.tokenizer_layouts import llama2_sentencepiece, llama3_tokenizer, mistral_tokenizer


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


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "llama3": load_tokenizer(llama3_tokenizer(root / "llama3")),
        "llama2": load_tokenizer(llama2_sentencepiece(root / "llama2")),
        "mistral": load_tokenizer(mistral_tokenizer(root / "mistral")),
    }


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


def test_the_placeholder_is_a_reserved_token_else_the_first_id_after_the_vocabulary(layouts):
    llama3, llama2, mistral = layouts["llama3"], layouts["llama2"], layouts["mistral"]
    # Llama 3: its last reserved token; the vocabulary (128256, the checkpoint's rows) holds it.
    assert llama3.audio_token_id == llama3.token_id("<|reserved_special_token_247|>") == 128255
    assert llama3.vocab_size == llama3.base_vocab_size == 128256
    assert "<|reserved_special_token_247|>" in llama3.audio_token_origin
    # Mistral v0.3: its last unused control token.
    assert mistral.audio_token_id == mistral.token_id("[control_9]")
    assert mistral.vocab_size == mistral.base_vocab_size
    # Llama 2: no spare token, so the first id after its 384 (an embedding row is needed).
    assert llama2.audio_token_id == llama2.base_vocab_size == 384 and llama2.vocab_size == 385
    assert "first id after its 384 tokens" in llama2.audio_token_origin
    # Text never makes a placeholder or any other special token.
    text = "a <|reserved_special_token_247|> <|eot_id|> [control_9] <|audio|> b"
    assert max(llama3.encode(text)) < 128000
    assert mistral.audio_token_id not in mistral.encode(text)


@pytest.mark.parametrize("layout", ["llama2", "mistral"])
@pytest.mark.parametrize(
    "fmt, whole", [("plain", "Q: {c}\nA: {a}"), ("llama2", "[INST] {c} [/INST] {a}")]
)
def test_prompt_and_answer_keep_the_pieces_of_the_whole_text(layouts, layout, fmt, whole):
    """Llama-2-style tokenizers (a dummy "▁" prefix): the answer is "▁four" as in the whole text,
    not "▁" "▁four" as `` four`` alone; nor does "[INST] " end in a lone "▁"."""
    tok = layouts[layout]
    context, answer = "what is the sum", "four"
    prompt = build_prompt(tok, fmt, context, answer, audio_segments=1)
    ids, audio = prompt.input_ids, tok.audio_token_id
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(audio) == 1
    text = [i for i in ids[1:-1] if i != audio]
    assert text == tok.encode(whole.format(c=context, a=answer))
    assert tok.token_id("▁") not in ids
    replied = [i for i, m in zip(ids, prompt.answer_mask, strict=True) if m]
    assert replied == tok.encode(answer) + [tok.eos_id]  # exactly the answer, then EOS
    if fmt == "llama2":  # the audio opens the user's turn, right after "[INST]"
        assert ids[1 : ids.index(audio)] == tok.encode("[INST]")
    # Whitespace around the context or answer carries nothing.
    assert build_prompt(tok, fmt, f" {context}\n", f"  {answer} ") == prompt


@pytest.mark.parametrize(
    "layout, fmt",
    [("llama2", "plain"), ("llama2", "llama2"), ("mistral", "llama2"), ("llama3", "llama3"),
     ("llama3", "plain")],
)  # fmt: skip
@pytest.mark.parametrize("answer", ["four", "one two three", "42 and 7", "ten."])
def test_decoding_prompt_is_the_training_prompt(layouts, layout, fmt, answer):
    tok = layouts[layout]
    trained = build_prompt(tok, fmt, "what is the sum", answer)
    prompt, end = generation_prompt(tok, fmt, "what is the sum")
    start = trained.answer_mask.index(1)
    assert trained.input_ids[:start] == prompt and trained.input_ids[-1] == end
    assert tok.decode(trained.input_ids[start:]).strip() == answer


def test_a_cut_inside_a_token_is_refused(layouts):
    tok = layouts["llama2"]
    assert tok.encode_split("the sum", [3]) == [tok.encode("the"), [tok.token_id("▁sum")]]
    with pytest.raises(ValueError, match="across the cut at 2"):
        tok.encode_split("four", [2])


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
