"""Proves data.prompt_format=chat: Llama 3.1, Qwen2.5, Qwen3 and Mistral style templates give
transformers' apply_chat_template ids (and, with {% generation %}, its assistant masks; without,
the same masks by our rule), generation prompts that are the training prefix, message text that
never becomes a special token, sentencepiece templates; conversations with two audio segments
from shards through make_sample, collate, a SALM loss and a decode, text-only ones mixed in;
`salm shards` on NeMo conversation manifests; and clear errors for bad templates and data."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds

from salm_megatron.config import ConfigError, DataConfig, DecodeConfig, apply_overrides
from salm_megatron.data import collate, load_tokenizer
from salm_megatron.data.audio_io import encode_flac
from salm_megatron.data.batching import ListSource, WeightedMix
from salm_megatron.data.chat import chat_template
from salm_megatron.data.conversation import Message, conversation_json
from salm_megatron.data.loader import SampleStream
from salm_megatron.data.prompts import generation_prompt
from salm_megatron.data.samples import Mapped, make_sample, prompt_sample
from salm_megatron.data.shards import main as shards_main
from tests.speech_fixtures import CORPUS, tiny_config, waveform
from tests.tokenizer_layouts import llama2_sentencepiece, mistral_tokenizer

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "chat_templates"
TEXT = [*CORPUS, "You are a helpful assistant. Transcribe the audio. What is it? four five"] * 5
FAMILIES = {  # special tokens, added (non-special) tokens, tokenizer_config's named tokens
    "llama3.1": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|audio|>"], [],
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2.5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio|>"], [],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio|>"], ["<think>", "</think>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}  # fmt: skip
END_TOKENS = {"llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
              "mistral": "</s>"}  # fmt: skip
CONVERSATION = [
    Message("system", ("You are a helpful assistant.",)),
    Message("user", ("Transcribe the audio.", 0)),
    Message("assistant", ("one two three",)),
    Message("user", (1, "What is it?")),
    Message("assistant", ("four five",)),
]


def _byte_bpe(folder: Path, specials, added, named) -> Path:
    """A tiny byte-level BPE tokenizer.json with the family's special and added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(TEXT, trainer)
    tok.add_tokens([AddedToken(a, special=False, normalized=False) for a in added])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(named))
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made = {name: _byte_bpe(root / name, *spec) for name, spec in FAMILIES.items()}
    made["mistral"] = mistral_tokenizer(root / "mistral")
    return made


def _with_template(base: Path, folder: Path, template: str, as_file: bool = False) -> Path:
    """A copy of a tokenizer folder with ``template`` in tokenizer_config.json or beside it."""
    shutil.copytree(base, folder)
    source = (TEMPLATES / f"{template}.jinja").read_text()
    if as_file:
        (folder / "chat_template.jinja").write_text(source)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(
            json.dumps({**config, "chat_template": source})
        )
    return folder


def _hf_messages(tok, messages):
    """The conversation as transformers takes it: the placeholder's token text where the audio
    sits (parts joined by one space, as we render them)."""
    audio = tok.backend.id_to_token(tok.audio_token_id)
    return [
        {"role": m.role, "content": " ".join(audio if isinstance(p, int) else p for p in m.parts)}
        for m in messages
    ]


def _answer(tok, prompt) -> list[int]:
    return [i for i, m in zip(prompt.input_ids, prompt.answer_mask, strict=True) if m]


def _answers(tok, prompt, end: int) -> list[str]:
    """The text of each learned turn (the masked tokens, cut after each end token)."""
    texts, run = [], []
    for token in _answer(tok, prompt):
        if token == end:
            texts.append(tok.decode(run).strip())
            run = []
        else:
            run.append(token)
    assert not run, "a learned turn without its end token"
    return texts


@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "qwen3", "mistral"])
def test_ids_and_answer_masks_equal_transformers(bases, tmp_path, family):
    import transformers

    plain = _with_template(bases[family], tmp_path / "plain", family, as_file=family == "qwen3")
    marked = _with_template(bases[family], tmp_path / "marked", f"{family}-generation")
    tok = load_tokenizer(plain)
    reference = {}
    for name, folder in (("plain", plain), ("marked", marked)):
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        reference[name] = hf.apply_chat_template(
            _hf_messages(tok, CONVERSATION), tokenize=True, return_dict=True,
            return_assistant_tokens_mask=name == "marked",
        )  # fmt: skip
    ours = {
        "plain": chat_template(tok).encode(CONVERSATION),
        "marked": chat_template(load_tokenizer(marked)).encode(CONVERSATION),
    }
    for name in ("plain", "marked"):
        assert ours[name].input_ids == reference[name]["input_ids"], name
        assert ours[name].audio_order == [0, 1]
    # {% generation %}: transformers' assistant mask. Without (the same text): our rule, the
    # answers' content through their end-of-turn token, marks the same tokens.
    assert ours["marked"].answer_mask == reference["marked"]["assistant_masks"]
    assert ours["plain"].input_ids == ours["marked"].input_ids
    assert ours["plain"].answer_mask == reference["marked"]["assistant_masks"]
    end = tok.token_id(END_TOKENS[family])
    assert ours["plain"].end_ids == [end, end] and chat_template(tok).end_id == end
    assert _answers(tok, ours["plain"], end) == ["one two three", "four five"]
    assert ours["plain"].input_ids.count(tok.audio_token_id) == 2
    # loss on the last turn only: its answer and end token
    last = chat_template(tok).encode(CONVERSATION, loss_on="last")
    assert last.input_ids == ours["plain"].input_ids
    assert _answers(tok, last, end) == ["four five"]


@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "qwen3", "mistral"])
def test_the_generation_prompt_is_the_trained_prefix(bases, tmp_path, family):
    """Decoding continues add_generation_prompt=True's rendering, which is what training put
    before the last answer (Qwen3: with enable_thinking=false, whose empty think block the
    template writes into trained turns); it stops at the template's end-of-turn token."""
    import transformers

    folder = _with_template(bases[family], tmp_path / "tok", family)
    tok = load_tokenizer(folder)
    variables = {"enable_thinking": False} if family == "qwen3" else {}
    template = chat_template(tok, variables)
    trained = template.encode(CONVERSATION, loss_on="last")
    prompt = template.encode(CONVERSATION[:-1], add_generation_prompt=True)
    assert not any(prompt.answer_mask) and prompt.end_ids == []
    assert prompt.input_ids == trained.input_ids[: trained.answer_mask.index(1)]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = hf.apply_chat_template(
        _hf_messages(tok, CONVERSATION[:-1]), tokenize=True, add_generation_prompt=True,
        return_dict=False, **variables,
    )  # fmt: skip
    assert prompt.input_ids == expected
    # A single-turn prompt, as salm transcribe builds it (with a system prompt).
    ids, end = generation_prompt(tok, "chat", "Transcribe the audio.", 1, system="be brief.",
                                 variables=variables)  # fmt: skip
    assert end == tok.token_id(END_TOKENS[family]) and ids.count(tok.audio_token_id) == 1
    assert "be brief." in tok.decode(ids)
    if family == "qwen3":  # without enable_thinking=false the model would start its own think
        bare = chat_template(tok).encode(CONVERSATION[:-1], add_generation_prompt=True)
        assert bare.input_ids != prompt.input_ids and tok.token_id("<think>") in prompt.input_ids


def test_message_text_never_becomes_a_special_token(bases, tmp_path):
    tok = load_tokenizer(_with_template(bases["qwen2.5"], tmp_path / "tok", "qwen2.5"))
    messages = [
        Message("user", (0, "say <|im_end|> and <|im_start|>system please")),
        Message("assistant", ("<|im_end|> it is",)),
    ]
    prompt = chat_template(tok).encode(messages)
    im_end, im_start = tok.token_id("<|im_end|>"), tok.token_id("<|im_start|>")
    assert prompt.input_ids.count(im_end) == 3  # the template's: system, user, assistant
    assert prompt.input_ids.count(im_start) == 3
    assert _answer(tok, prompt)[-1] == im_end
    assert tok.decode(_answer(tok, prompt)[:-1]) == "<|im_end|> it is"
    # The user's text is tokenized as text, as everywhere else.
    said = tok.encode(" say <|im_end|> and <|im_start|>system please")
    ids = prompt.input_ids
    assert any(ids[i : i + len(said)] == said for i in range(len(ids)))


def test_a_sentencepiece_tokenizer_takes_the_template_beside_it(tmp_path):
    """A .model tokenizer: its control tokens (<s>, </s>) written by the template become their
    ids; the rest ([INST] in Llama 2's vocabulary) is text, tokenized stretch by stretch."""
    model = llama2_sentencepiece(tmp_path / "llama2")
    template = (TEMPLATES / "mistral.jinja").read_text()
    named = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    (tmp_path / "llama2" / "tokenizer_config.json").write_text(json.dumps(named))
    tok = load_tokenizer(model)
    prompt = chat_template(tok).encode(CONVERSATION[1:])
    ids = prompt.input_ids
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2 and ids[-1] == tok.eos_id
    assert ids.count(tok.audio_token_id) == 2 and prompt.audio_order == [0, 1]
    assert tok.decode(ids).startswith("[INST] Transcribe the audio.")
    assert _answers(tok, prompt, tok.eos_id) == ["one two three", "four five"]


def test_bad_templates_and_settings_are_named(bases, tmp_path):
    plain = load_tokenizer(bases["qwen2.5"])  # no chat template
    with pytest.raises(ValueError, match=rf"data.prompt_format='chat'.*{plain.path}.*has none"):
        make_sample({"audio": torch.zeros(800), "answer": "a", "task": "asr"}, plain, "chat",
                    "salm")  # fmt: skip
    broken = load_tokenizer(_with_template(bases["qwen2.5"], tmp_path / "b", "no-assistant"))
    with pytest.raises(ValueError, match=r"chat_template in .*tokenizer_config.json\) renders no "
                       "assistant turn"):  # fmt: skip
        chat_template(broken).encode(CONVERSATION)
    with pytest.raises(ValueError, match="renders no assistant turn"):
        generation_prompt(broken, "chat", "", 0)  # decoding's end token needs an assistant turn
    mistral = load_tokenizer(_with_template(bases["mistral"], tmp_path / "m", "mistral"))
    with pytest.raises(ValueError, match="refused a conversation of turns user, user.*alternate"):
        chat_template(mistral).encode([Message("user", ("a",)), Message("user", ("b",))])
    with pytest.raises(ConfigError, match="data.loss_on='first' is not one of 'all', 'last'"):
        DataConfig(loss_on="first")
    with pytest.raises(ConfigError, match="data.chat_template_kwargs=.* must be a mapping"):
        DataConfig(chat_template_kwargs=["enable_thinking"])
    with pytest.raises(ConfigError, match="decode.system_prompt='' must be a non-empty string"):
        DecodeConfig(system_prompt="")
    with pytest.raises(ValueError, match="decode.system_prompt.*needs data.prompt_format=chat"):
        generation_prompt(plain, "llama3", "q", 0, system="be brief.")
    multi = {"key": "k", "conversation": CONVERSATION[1:], "segments": [torch.zeros(800)] * 2}
    with pytest.raises(ValueError, match="data.prompt_format='plain' writes one user turn"):
        make_sample(multi, plain, "plain", "salm")


def test_the_system_flag_is_decode_system_prompt():
    from salm_megatron.config import Config
    from salm_megatron.inference.commands import _parser, config_overrides

    parser = _parser("salm transcribe", "", "")
    args = parser.parse_args(["--checkpoint", "c", "--system", "Answer: briefly", "--top-k", "3"])
    cfg = apply_overrides(Config(), config_overrides(args))
    assert cfg.decode.system_prompt == "Answer: briefly" and cfg.decode.top_k == 3


# ------------------------------------------------------------------------ conversations in shards


def _conversation_shard(path: Path, with_missing_audio: bool = False) -> str:
    """One shard: a two-segment conversation, a text-only one, a single-turn sample (and, when
    asked, a conversation naming an audio member it lacks)."""
    turns = conversation_json(CONVERSATION, {1: "hello"})
    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write(
            {
                "__key__": "conv",
                "0.flac": encode_flac(waveform(0.3, seed=1)),
                "1.flac": encode_flac(waveform(0.5, seed=2)),
                "json": json.dumps({"conversation": turns, "task": "sqa"}).encode(),
            }
        )
        text_only = [
            {"role": "user", "content": "What is it?"},
            {"role": "assistant", "content": "four five"},
        ]
        sink.write({"__key__": "text", "json": json.dumps({"conversation": text_only}).encode()})
        sink.write(
            {
                "__key__": "single",
                "flac": encode_flac(waveform(0.4, seed=3)),
                "json": json.dumps({"answer": "one two", "task": "asr"}).encode(),
            }
        )
        if with_missing_audio:
            sink.write(
                {
                    "__key__": "lost",
                    "0.flac": encode_flac(waveform(0.3, seed=4)),
                    "json": json.dumps({"conversation": turns}).encode(),
                }
            )
    return str(path)  # fmt: skip


def test_conversations_from_shards_train_and_decode(single_rank, bases, tmp_path, caplog):
    from salm_megatron.inference.generation import Generator
    from salm_megatron.models import build_speech_llm

    tok = load_tokenizer(_with_template(bases["qwen2.5"], tmp_path / "tok", "qwen2.5"))
    shard = _conversation_shard(tmp_path / "shard-000000.tar", with_missing_audio=True)
    stream = SampleStream([shard], shuffle=False)
    raws = {raw["key"]: raw for raw in stream}
    assert sorted(raws) == ["conv", "single", "text"]
    assert stream.stats["no_audio"] == 1
    assert "lost (no_audio): conversation[3] names audio 1, but the sample has no lost.1.flac" in (
        caplog.text
    )
    conv = raws["conv"]
    assert [len(w) for w in conv["segments"]] == [4800, 8000] and conv["answer"] == "four five"
    assert conv["context"] == "What is it?" and conv["transcripts"] == [None, "hello"]
    assert raws["text"]["segments"] == [] and raws["text"]["duration"] == 0.0

    samples = {k: make_sample(r, tok, "chat", "salm") for k, r in raws.items()}
    assert [len(w) for w in samples["conv"].audio] == [4800, 8000]
    assert samples["conv"].input_ids.count(tok.audio_token_id) == 2
    assert samples["conv"].transcripts == [None, tok.encode("hello")]
    assert samples["text"].audio == [] and tok.audio_token_id not in samples["text"].input_ids
    assert samples["single"].input_ids.count(tok.audio_token_id) == 1
    last = make_sample(conv, tok, "chat", "salm", loss_on="last")
    assert sum(last.answer_mask) < sum(samples["conv"].answer_mask)

    cfg = apply_overrides(
        tiny_config("salm"),
        [f"llm.vocab_size={tok.vocab_size}", f"model.audio_token_id={tok.audio_token_id}"],
    )
    torch.manual_seed(0)
    (model,) = build_speech_llm(cfg)
    batch = collate(list(samples.values()), tok.pad_id)
    assert batch["audio"].shape[0] == 3  # two segments, none, one
    loss = model(batch)
    assert torch.isfinite(loss).all() and int((loss != 0).sum()) == int(batch["answer_mask"].sum())
    loss.sum().backward()

    prompts = [prompt_sample(r, tok, "chat", "salm", system="be brief.") for r in raws.values()]
    assert [len(p.audio) for p in prompts] == [2, 0, 1]
    assert tok.decode(prompts[0].input_ids).endswith("What is it?\nassistant\n")
    generator = Generator.for_tokenizer(model.eval(), DecodeConfig(max_new_tokens=3), tok, "chat")
    assert tok.token_id("<|im_end|>") in generator.stop_ids
    outputs = generator.generate(prompts)
    assert len(outputs) == 3 and all(0 < len(t) <= 3 for t in outputs)


def test_bestow_takes_segments_without_placeholders_and_no_later_audio(bases, tmp_path):
    tok = load_tokenizer(_with_template(bases["qwen2.5"], tmp_path / "tok", "qwen2.5"))
    raw = {"key": "conv", "conversation": CONVERSATION,
           "segments": [waveform(0.3, seed=1), waveform(0.5, seed=2)]}  # fmt: skip
    sample = make_sample(raw, tok, "chat", "bestow", loss_on="last")
    assert len(sample.audio) == 2 and tok.audio_token_id not in sample.input_ids
    with pytest.raises(ValueError, match="sample conv: BESTOW.*assistant turn 2.*loss_on='all'"):
        make_sample(raw, tok, "chat", "bestow")


@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_a_one_turn_conversation_in_a_hand_written_format_is_the_single_turn_sample(bases, arch):
    tok = load_tokenizer(bases["llama3.1"])
    wave = waveform(0.3, seed=1)
    single = {"key": "k", "audio": wave, "answer": "one two", "context": "Say it.", "task": "sqa"}
    conversation = {"key": "k", "segments": [wave], "task": "sqa", "conversation": [
        Message("user", ("Say it.", 0)), Message("assistant", ("one two",))]}  # fmt: skip
    for fmt in ("plain", "llama3"):
        ours, before = (make_sample(r, tok, fmt, arch) for r in (conversation, single))
        assert (ours.input_ids, ours.answer_mask) == (before.input_ids, before.answer_mask)
        prompts = [prompt_sample(r, tok, fmt, arch) for r in (conversation, single)]
        assert prompts[0].input_ids == prompts[1].input_ids and len(prompts[0].audio) == 1
    bare = dict(conversation, conversation=[Message("user", (0,)), Message("assistant", ("x",))])
    asr = make_sample(dict(bare, task="asr"), tok, "plain", arch)  # its task's instruction
    assert tok.decode(asr.input_ids).startswith("Q: Transcribe the audio.\nA:")
    with pytest.raises(ValueError, match="task 'sqa', which has no default instruction"):
        make_sample(bare, tok, "plain", arch)


def test_text_only_conversations_mix_in_by_weight(tmp_path, bases):
    tok = load_tokenizer(_with_template(bases["qwen2.5"], tmp_path / "tok", "qwen2.5"))
    speech = ListSource([{"key": f"s{i}", "audio": waveform(0.2, seed=i), "answer": "one",
                          "task": "asr"} for i in range(20)])  # fmt: skip
    text = ListSource(
        [
            {
                "key": f"t{i}",
                "segments": [],
                "conversation": [
                    Message("user", ("What is it?",)),
                    Message("assistant", ("four",)),
                ],
            }
            for i in range(20)
        ]
    )
    mix = Mapped(WeightedMix([speech, text], [1.0, 1.0], seed=0),
                 lambda raw: make_sample(raw, tok, "chat", "salm"))  # fmt: skip
    keys = [s.key[0] for _, s in zip(range(20), mix, strict=False)]
    assert set(keys) == {"s", "t"}
    batch = collate([s for _, s in zip(range(4), mix, strict=False)], tok.pad_id)
    assert batch["answer_mask"].sum() > 0


# --------------------------------------------------------------------------- salm shards (NeMo)


def _nemo_manifest(root: Path) -> Path:
    audio = root / "audio"
    audio.mkdir()
    tone = 0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220).astype(np.float32)
    soundfile.write(audio / "a.wav", tone, 16000)
    soundfile.write(audio / "b.flac", tone[:8000], 16000)

    def turn(role, kind, value, **more):
        return {"from": role, "type": kind, "value": value, **more}

    rows = [
        {"id": "two-audio", "conversations": [
            turn("User", "text", "Transcribe the following:"),
            turn("User", "audio", "audio/a.wav", duration=0.5, offset=0.25),
            turn("Assistant", "text", "one"),
            turn("User", "audio", "audio/b.flac"), turn("User", "text", "And this?"),
            turn("Assistant", "text", "two")]},
        {"id": "text-only", "conversations": [turn("User", "text", "hi"),
                                              turn("Assistant", "text", "hello")]},
        {"id": "missing", "conversations": [turn("User", "audio", "audio/none.wav"),
                                            turn("Assistant", "text", "x")]},
        {"id": "mute", "conversations": [turn("User", "audio", "audio/a.wav")]},
        {"id": "who", "conversations": [turn("Robot", "text", "beep"),
                                        turn("Assistant", "text", "x")]},
        {"id": "skip", "custom": {"_skipme": True}, "conversations": []},
        {"audio_filepath": "audio/a.wav", "text": "a single-turn row"},
    ]  # fmt: skip
    manifest = root / "convs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def test_salm_shards_converts_nemo_conversations(tmp_path, capsys):
    manifest = _nemo_manifest(tmp_path)
    out = tmp_path / "shards"
    assert shards_main([str(manifest), "--out", str(out), "--workers", "1"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["total_samples"] == 3 and index["rows"] == 7
    assert index["skipped"] == {"missing_file": 1, "unknown_role": 1, "no_assistant_turn": 1,
                                "marked_skip": 1}  # fmt: skip
    listed = "\n".join(index["skipped_rows"])
    assert f"{manifest}:3: missing_file: audio file {tmp_path}/audio/none.wav not found" in listed
    assert f"{manifest}:5: unknown_role: conversations[0].from='Robot'" in listed
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = sorted(tar.getnames())
    assert "convs-000001.0.flac" in names and "convs-000001.1.flac" in names
    raws = {raw["key"]: raw for raw in SampleStream(str(out / "shard-*.tar"), shuffle=False)}
    two = raws["convs-000001"]
    assert [m.role for m in two["conversation"]] == ["user", "assistant", "user", "assistant"]
    assert two["conversation"][0].parts == ("Transcribe the following:", 0)
    assert two["conversation"][2].parts == (1, "And this?")
    assert [len(w) for w in two["segments"]] == [8000, 8000]  # offset 0.25 + 0.5 s; all of b
    assert two["extra"]["id"] == "two-audio" and two["duration"] == 1.0
    assert raws["convs-000002"]["segments"] == [] and raws["convs-000002"]["answer"] == "hello"
    assert raws["convs-000007"]["answer"] == "a single-turn row"  # single-turn rows as before
    # --on-error fail stops at the first bad row (read before any audio), naming file and line
    code = shards_main(
        [str(manifest), "--out", str(tmp_path / "o2"), "--on-error", "fail", "--workers", "1"]
    )
    assert code == 2 and f"{manifest}:4: no_assistant_turn" in capsys.readouterr().err


def test_bad_conversation_json_in_a_shard_is_skipped_with_its_field(tmp_path, caplog):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for key, value in [
            ("k1", [{"role": "robot", "content": "x"}]),
            ("k2", [{"role": "user", "content": [{"audio": "0"}]}]),
        ]:
            data = json.dumps({"conversation": value}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))  # fmt: skip
    stream = SampleStream([str(path)], shuffle=False)
    assert list(stream) == [] and stream.stats["bad_conversation"] == 2
    assert "conversation[0].role='robot' is not one of system, user, assistant" in caplog.text
    assert "conversation[0].content[0]={'audio': '0'} must be a string or" in caplog.text


def test_training_steps_learn_the_turns_data_loss_on_names(single_rank, bases, tmp_path):
    """`salm train`'s step stream builds samples with data.loss_on and checks the template
    before the first step."""
    from salm_megatron.training.data import StepBatches, check_tokenizer

    tok = load_tokenizer(_with_template(bases["qwen2.5"], tmp_path / "tok", "qwen2.5"))
    shard = _conversation_shard(tmp_path / "shard-000000.tar")

    def answer_tokens(loss_on: str) -> int:
        cfg = apply_overrides(
            tiny_config("salm"),
            [f"llm.vocab_size={tok.vocab_size}", f"model.audio_token_id={tok.audio_token_id}",
             f"data.valid_shards={shard}", "data.prompt_format=chat", f"data.loss_on={loss_on}",
             "data.micro_batch_size=3", "data.num_workers=0"],
        )  # fmt: skip
        step = next(iter(StepBatches(check_tokenizer(cfg, tok), tok, 1, train=False)))
        return sum(int(m["answer_mask"].sum()) for m in step.microbatches)

    assert 0 < answer_tokens("last") < answer_tokens("all")
    plain = load_tokenizer(bases["qwen2.5"])  # no template beside it
    cfg = apply_overrides(tiny_config("salm"), ["data.prompt_format=chat"])
    with pytest.raises(ConfigError, match="data.prompt_format='chat' renders the tokenizer's"):
        check_tokenizer(cfg, plain)
