"""Proves `salm import/export --format qwen2-audio` against transformers' own Qwen2-Audio: a tiny
random Qwen2AudioForConditionalGeneration imported gives its logits (within 1e-4, fp32) for the
same waveform and prompt through its processor, at 30 s and at a length that is no whole number of
hops (its 30 s silence padding reproduced); import -> export is bitwise for every tensor and
transformers loads the export with the same logits; bad folders are named with file and tensor."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from salm_megatron.convert.hf_io import ConversionError
from salm_megatron.convert.qwen2_audio import config_from_hf, import_qwen2_audio
from salm_megatron.convert.speech_model import export_main, import_main

transformers = pytest.importorskip("transformers")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
           "<|audio_eos|>"]  # fmt: skip
CORPUS = ["what is in this audio", "describe the sound please", "a dog barks twice"] * 20
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = (
    "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nwhat is in this audio?"
    "<|im_end|>\n<|im_start|>assistant\na dog"
)


def _tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory):
    """A tiny random Qwen2-Audio folder as transformers saves it, with its processor."""
    folder = tmp_path_factory.mktemp("q2a") / "hf"
    folder.mkdir()
    tokenizer = _tokenizer(folder)
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(
            d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
            num_mel_bins=80, max_source_positions=1500,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        ),
        audio_token_index=audio_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # norms and biases too: each tensor must land right
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    processor = transformers.Qwen2AudioProcessor(extractor, tokenizer, chat_template=TEMPLATE)
    processor.save_pretrained(folder)
    return {"dir": folder, "model": model, "processor": processor, "audio_id": audio_id}


def _waveform(samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    return 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(samples, generator=g)


def _hf_logits(model, processor, wave: torch.Tensor):
    inputs = processor(text=PROMPT, audio=[wave.numpy()], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return inputs["input_ids"][0], model(**inputs).logits[0]


def _our_logits(model, ids: torch.Tensor, audio_id: int, wave: torch.Tensor) -> torch.Tensor:
    """Our SALM's logits for HF's expanded ids, given with one placeholder (SALM expands it)."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ~((ids[1:] == audio_id) & (ids[:-1] == audio_id))
    ids = ids[keep][None]
    batch = {
        "input_ids": ids, "answer_mask": torch.zeros_like(ids),
        "audio": wave[None], "audio_lengths": torch.tensor([wave.numel()]),
    }  # fmt: skip
    with torch.no_grad():
        layout = model.layout(batch, None)
        emb = model.embed(batch, layout)
        logits = model.llm(
            input_ids=None, position_ids=None, attention_mask=None, decoder_input=emb
        )
    return logits[0]


def _load(path):
    from salm_megatron.inference import loading

    cfg = loading.saved_config(loading.find_checkpoint(path))
    return cfg, loading.load_model(loading.generation_config(cfg, 1, []), path, torch.float32)


@pytest.fixture(scope="module")
def imported(qwen2_audio, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q2a"
    assert import_main(["--format", "qwen2-audio", str(qwen2_audio["dir"]), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("samples", [480000, 20001])  # 30 s; 1.25 s, no whole number of hops
def test_import_gives_transformers_logits(qwen2_audio, imported, samples, single_rank):
    cfg, model = _load(imported)
    assert cfg.model.audio_token_id == qwen2_audio["audio_id"]
    assert (cfg.encoder.final_norm, cfg.encoder.features.silence_padding) == (False, True)
    assert (cfg.adapter.type, cfg.data.prompt_format) == ("pool_linear", "chat")
    wave = _waveform(samples, seed=samples)
    ids, expected = _hf_logits(qwen2_audio["model"], qwen2_audio["processor"], wave)
    ours = _our_logits(model, ids, qwen2_audio["audio_id"], wave)
    vocab = expected.shape[-1]
    torch.testing.assert_close(ours[: len(ids), :vocab], expected, rtol=0, atol=1e-4)


def test_silence_padding_matters_at_the_end(qwen2_audio, imported, single_rank):
    """Zeros past a short utterance (our Whisper default) would not give Qwen2-Audio's output:
    the padding is reproduced, not ignored."""
    import dataclasses

    from salm_megatron.models.audio_path import AudioPath

    cfg, model = _load(imported)
    wave = _waveform(20001, seed=3)
    lengths = torch.tensor([wave.numel()])
    with torch.no_grad():
        padded, _ = model.audio(wave[None], lengths)
        features = dataclasses.replace(cfg.encoder.features, silence_padding=False)
        encoder = dataclasses.replace(cfg.encoder, features=features)
        plain = AudioPath(dataclasses.replace(cfg, encoder=encoder), torch.float32).eval()
        plain.load_state_dict(model.audio.state_dict())
        zeros, _ = plain(wave[None], lengths)
    n = min(padded.shape[1], zeros.shape[1])
    assert (padded[0, :n] - zeros[0, :n]).abs().amax(-1).min() > 1e-3  # every frame moves


def test_export_is_bitwise_and_loads_in_transformers(qwen2_audio, imported, tmp_path, single_rank):
    out = tmp_path / "exported"
    assert export_main(["--format", "qwen2-audio", str(imported), "--out", str(out)]) == 0
    source, exported = (
        load_file(qwen2_audio["dir"] / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert sorted(source) == sorted(exported)
    for name, tensor in source.items():
        assert torch.equal(tensor, exported[name]), name
    model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    wave = _waveform(20001, seed=5)
    _, expected = _hf_logits(qwen2_audio["model"], qwen2_audio["processor"], wave)
    _, reloaded = _hf_logits(model, processor, wave)
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=0)


def _copy(folder, dest):
    import shutil

    shutil.copytree(folder, dest)
    return dest


def test_bad_folders_are_named(qwen2_audio, tmp_path):
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(
        json.dumps({"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"})
    )
    with pytest.raises(ConversionError, match=r"config.json.*is not Qwen2-Audio"):
        config_from_hf(whisper)

    def broken(name, change):
        folder = _copy(qwen2_audio["dir"], tmp_path / name)
        path = folder / "model.safetensors"
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
        return folder

    missing = broken("missing", lambda t: t.pop("multi_modal_projector.linear.bias"))
    with pytest.raises(ConversionError, match=r"model.safetensors.*multi_modal_projector"):
        import_qwen2_audio(missing, tmp_path / "out1")
    name = "audio_tower.layers.1.fc1.weight"
    shaped = broken("shaped", lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(ConversionError, match=rf"model.safetensors.*{name} has shape"):
        import_qwen2_audio(shaped, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
