"""Proves `salm export` then `salm import` of a SALM (LoRA merged; CTC head; frozen LLM and encoder
left out of the checkpoint) and a BESTOW gives back every tensor of the checkpoint's model bitwise
(BatchNorm statistics and padded vocabulary rows included), carries the tokenizer's token ids for
transformers, decodes the same tokens (Generator and `salm transcribe`), starts a new run through
checkpoint.pretrained_model, and names bad input (missing checkpoint, existing --out, a
speech.safetensors that does not fit its config, names leading out of the folder, links)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import soundfile
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from salm_megatron.config import DecodeConfig, LoRAConfig
from salm_megatron.convert.hf_llm import single_process
from salm_megatron.convert.speech_model import SpeechParts, export_main, import_main
from salm_megatron.data import load_tokenizer
from salm_megatron.data.collate import SpeechSample
from salm_megatron.data.prompts import generation_prompt
from salm_megatron.inference import loading
from salm_megatron.inference.commands import transcribe_main
from salm_megatron.inference.generation import Generator
from salm_megatron.models import build_speech_llm
from salm_megatron.models.lora import adapter_parameters, merge_lora
from salm_megatron.training import checkpoint
from tests.speech_fixtures import make_hf_tokenizer, tiny_config, wake_zero_outputs, waveform


def _config(arch: str, tokenizer):
    """Tiny model on the tokenizer's vocabulary (padded to 384); SALM with LoRA and a CTC head."""
    cfg = tiny_config(arch, ctc_weight=0.3 if arch == "salm" else 0.0)
    vocab = load_tokenizer(tokenizer).vocab_size
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, audio_token_id=vocab - 1),
        llm=dataclasses.replace(
            cfg.llm, vocab_size=vocab, num_layers=2, max_position_embeddings=300
        ),
        lora=LoRAConfig(rank=2 if arch == "salm" else 0, alpha=8.0),
        data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer), prompt_format="llama3"),
        decode=DecodeConfig(max_new_tokens=6, batch_size=2),
    )


@torch.no_grad()
def _randomize(model) -> None:
    """Values no initialisation gives: BatchNorm statistics, LoRA's B, BESTOW's zero outputs."""
    g = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 1, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
            module.num_batches_tracked.fill_(17)
    for p in adapter_parameters(model):
        p.normal_(0, 0.1, generator=g)
    wake_zero_outputs(model)


@pytest.fixture(scope="module", params=["salm", "bestow"])
def case(request, tmp_path_factory):
    """A saved checkpoint of a randomized model, exported, and that export imported."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    cfg = _config(arch, make_hf_tokenizer(root / "tokenizer"))
    if arch == "salm":  # LoRA on a frozen LLM, a frozen encoder: the checkpoint leaves both out
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, freeze_llm=True, freeze_encoder=True),
            checkpoint=dataclasses.replace(
                cfg.checkpoint,
                pretrained_llm=str(root / "llm"),
                pretrained_encoder=str(root / "encoder"),
            ),
        )
    with single_process():
        (model,) = build_speech_llm(cfg)
        if arch == "salm":
            checkpoint.save_module(model.llm, root / "llm")
            checkpoint.save_module(model.audio.encoder, root / "encoder")
        _randomize(model)  # after: the checkpoint's BatchNorm statistics are not the pretrained
        common = {"config": cfg.to_dict(), "step": 7}
        checkpoint.save(root / "run" / "checkpoints", 7, [model], None, common, {}, None,
                        leave_out=checkpoint.parts_left_out(cfg))  # fmt: skip
    assert export_main(["--checkpoint", str(root / "run"), "--out", str(root / "hf")]) == 0
    assert import_main(["--hf", str(root / "hf"), "--out", str(root / "imported")]) == 0
    return {"arch": arch, "cfg": cfg, "root": root}


def _load(path):
    """The model of a checkpoint as decoding loads it (TP=1), LoRA merged; and its config."""
    cfg = loading.generation_config(loading.saved_config(loading.find_checkpoint(path)), 1, [])
    model = loading.load_model(cfg, loading.find_checkpoint(path))
    merge_lora(model)
    return model, cfg


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_round_trip_is_bitwise(case, single_rank):
    root, cfg = case["root"], case["cfg"]
    names = [p.name for p in (root / "hf").iterdir()]
    for name in ("config.json", "model.safetensors", "speech.safetensors", "speech_config.json",
                 "tokenizer.json", "tokenizer_config.json"):  # fmt: skip
        assert name in names, names
    original, _ = _load(root / "run")
    imported, imported_cfg = _load(root / "imported")
    before, after = _state(original), _state(imported)
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name

    # What the test relies on: these tensors are not what a fresh model would hold.
    padding = before["llm.embedding.word_embeddings.weight"][cfg.llm.vocab_size :]
    assert padding.shape[0] == 384 - cfg.llm.vocab_size and padding.abs().sum() > 0
    assert (before["audio.encoder.layers.0.conv.batch_norm.num_batches_tracked"] == 17).all()
    # The speech file holds every non-LLM tensor of the model (SpeechParts matches SpeechLLM).
    with safe_open(root / "hf" / "speech.safetensors", framework="pt") as f:
        speech = set(f.keys())
    assert {k for k in before if not k.startswith("llm.")} == set(
        _state(SpeechParts(cfg, torch.float32))
    )
    assert speech - {k for k in before if not k.startswith("llm.")} == {
        "llm_vocab_padding.embedding.word_embeddings.weight",
        "llm_vocab_padding.output_layer.weight",
    }
    # The config comes back; LoRA is merged, so off.
    expected = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0))
    for section in ("model", "llm", "encoder", "adapter", "bestow", "lora", "decode"):
        assert getattr(imported_cfg, section) == getattr(
            loading.generation_config(expected, 1, []), section
        ), section
    assert imported_cfg.data.prompt_format == "llama3"
    assert imported_cfg.data.tokenizer == str((root / "imported").resolve())  # a folder, as given
    speech_config = json.loads((root / "hf" / "speech_config.json").read_text())
    assert speech_config["exported_from"]["step"] == 7
    if case["arch"] == "salm":
        assert speech_config["exported_from"]["lora_merged"] == {"rank": 2, "alpha": 8.0}


def test_the_export_carries_the_tokenizers_ids(case):
    """config.json and generation_config.json hold the run's tokenizer's BOS/EOS (its PAD: none
    of its own), and generation stops where ours does (EOS or Llama 3's end of turn)."""
    transformers = pytest.importorskip("transformers")
    hf = case["root"] / "hf"
    tok = load_tokenizer(hf)
    config = transformers.AutoConfig.from_pretrained(hf)
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert config.pad_token_id is None and tok.pad_id == tok.eos_id
    generation = transformers.GenerationConfig.from_pretrained(hf)
    assert generation.bos_token_id == tok.bos_id
    assert generation.eos_token_id == sorted([tok.eos_id, tok.require("<|eot_id|>")])


def test_decodes_the_same_tokens(case, single_rank):
    root = case["root"]
    clips = [waveform(0.5, seed=1), waveform(0.9, seed=2), waveform(0.3, seed=3)]
    tokens = []
    for path in (root / "run", root / "imported"):
        model, cfg = _load(path)
        tok = loading.open_tokenizer(cfg, None)  # the imported one: the copy in its folder
        segments = 1 if cfg.model.arch == "salm" else 0
        ids, _ = generation_prompt(tok, cfg.data.prompt_format, "Transcribe the audio.", segments)
        samples = [SpeechSample(ids, [0] * len(ids), [clip]) for clip in clips]
        generator = Generator.for_tokenizer(model, cfg.decode, tok, cfg.data.prompt_format)
        tokens.append(generator.generate(samples))
    assert tokens[0] == tokens[1] and sum(map(len, tokens[0])) >= 6, tokens


def test_transcribe_prints_the_same(case, tmp_path, capsys):
    root = case["root"]
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, waveform(0.9, seed=2).numpy(), 16000)
    lines = []
    for path in (root / "run", root / "imported"):
        assert transcribe_main(["--checkpoint", str(path), str(wav)]) == 0
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1] and lines[0].startswith(f"{wav}\t"), lines


def test_a_new_run_starts_from_it(case, single_rank):
    """What `salm train` does when it starts fresh: checkpoint.pretrained_model loads the whole
    model; a LoRA run on it keeps its new adapters."""
    root = case["root"]
    imported, cfg = _load(root / "imported")
    cfg = dataclasses.replace(
        cfg,
        lora=LoRAConfig(rank=4),
        checkpoint=dataclasses.replace(cfg.checkpoint, pretrained_model=str(root / "imported")),
    )
    (fresh,) = build_speech_llm(cfg)
    adapters = [p.detach().clone() for p in adapter_parameters(fresh)]
    checkpoint.load_pretrained_parts(cfg, [fresh])
    state, expected = _state(fresh), _state(imported)
    assert all(torch.equal(a, p) for a, p in zip(adapters, adapter_parameters(fresh), strict=True))
    base = {k.replace(".base.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert set(base) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(base[name], tensor), name


def _speech_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "speech.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_bad_input_is_named(case, tmp_path, capsys):
    root = case["root"]

    def fails(main, *args) -> str:
        assert main([*map(str, args)]) == 2
        return capsys.readouterr().err

    err = fails(export_main, "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert err.startswith("salm export: error:") and "nowhere does not exist" in err
    err = fails(export_main, "--checkpoint", root / "run", "--out", root / "hf")
    assert "already exists" in err
    err = fails(import_main, "--hf", root / "hf", "--out", root / "imported")
    assert err.startswith("salm import: error:") and "already exists" in err
    assert "does not exist" in fails(
        import_main, "--hf", tmp_path / "none", "--out", tmp_path / "y"
    )

    name = "audio.adapter.mlp.0.weight"
    expected = list(_speech_tensors(root / "hf")[name].shape)
    for change, words in [
        (lambda t: t.update({name: torch.zeros(3, 5)}),
         f"tensor {name} has shape [3, 5], the model of speech_config.json expects {expected}"),
        (lambda t: t.pop(name), f"tensor {name} is missing"),
        (lambda t: t.update({"audio.extra.weight": torch.zeros(2)}),
         "unexpected tensor audio.extra.weight"),
    ]:  # fmt: skip
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(root / "hf", bad)
        tensors = _speech_tensors(bad)
        change(tensors)
        save_file(tensors, bad / "speech.safetensors")
        err = fails(import_main, "--hf", bad, "--out", tmp_path / "out")
        assert words in err, err
        assert not (tmp_path / "out").exists()


def test_import_reads_only_the_folders_own_files(case, tmp_path, capsys):
    """Names read from an exported folder stay inside it, and links in it are refused: nothing
    outside the folder is read, copied or written."""
    root = case["root"]
    outside = tmp_path / "secret"
    outside.write_text("not a tokenizer")

    def refused(change, words: str) -> None:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(root / "hf", bad)
        change(bad)
        assert import_main(["--hf", str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        assert not (tmp_path / "out").exists()
        assert outside.read_text() == "not a tokenizer"

    def tokenizer_named(name: str):
        def change(bad):
            speech = json.loads((bad / "speech_config.json").read_text())
            speech["data"]["tokenizer"] = name
            (bad / "speech_config.json").write_text(json.dumps(speech))

        return change

    for name in ("../secret", str(outside), "sub/tokenizer.json", ".."):
        refused(
            tokenizer_named(name),
            f"speech_config.json: data.tokenizer {name!r} must be a plain name inside the folder",
        )

    def linked(bad):
        (bad / "tokenizer.json").unlink()
        (bad / "tokenizer.json").symlink_to(outside)

    refused(linked, f"{tmp_path / 'bad' / 'tokenizer.json'} is a symbolic link")

    def escaping_shard(bad):
        with safe_open(bad / "model.safetensors", framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118
        (bad / "model.safetensors").rename(tmp_path / "shard.safetensors")
        index = {"weight_map": dict.fromkeys(names, "../shard.safetensors")}
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))

    refused(escaping_shard, "'../shard.safetensors' must be a plain name inside the folder")
