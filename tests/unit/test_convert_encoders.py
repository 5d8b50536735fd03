"""`salm convert nemo-encoder`/`hf-whisper-encoder`: load as training does, equal NeMo's/HF's."""

from __future__ import annotations

import copy
import io
import json
import logging
import tarfile

import pytest
import torch
import yaml

from salm_megatron.cli import main as salm
from salm_megatron.config import ConfigError, load_config
from salm_megatron.convert.nemo_encoder import (
    NemoArchiveError,
    encoder_config_from_nemo,
    read_nemo,
)
from salm_megatron.models.audio_path import AudioPath
from salm_megatron.training import checkpoint
from tests.conftest import nemo_reference
from tests.speech_fixtures import waveform

TOLERANCE = 1e-4

# A NeMo FastConformer-CTC model config, as its model_config.yaml reads (tiny sizes).
NEMO_CONFIG = {
    "sample_rate": 16000,
    "labels": list("abcdefghijklmnopqrstuvwxyz' "),
    "train_ds": {"manifest_filepath": None, "sample_rate": "${model.sample_rate}"},
    "preprocessor": {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": "${model.sample_rate}",
        "normalize": "per_feature",
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": 80,
        "n_fft": 512,
        "log": True,
        "frame_splicing": 1,
        "dither": 1.0e-05,
        "pad_to": 0,
        "pad_value": 0.0,
    },
    "spec_augment": {
        "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
        "freq_masks": 2,
        "time_masks": 5,
        "freq_width": 27,
        "time_width": 0.05,
    },
    "encoder": {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": "${model.preprocessor.features}",
        "feat_out": -1,
        "n_layers": 2,
        "d_model": 64,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": 32,
        "causal_downsampling": False,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": 4,
        "att_context_size": [-1, -1],
        "att_context_style": "regular",
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "conv_context_size": None,
        "use_bias": True,
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
        "stochastic_depth_drop_prob": 0.0,
    },
    "decoder": {
        "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
        "feat_in": "${model.encoder.d_model}",
        "num_classes": 28,
        "vocabulary": "${model.labels}",
    },
    "optim": {"name": "adamw", "lr": 0.001},
    "target": "nemo.collections.asr.models.ctc_models.EncDecCTCModel",
    "nemo_version": "2.0.0",
}


def write_nemo(path, config: dict, state: dict, mode: str = "w:") -> None:
    """A .nemo laid out as NeMo writes it: the model folder added to a tar as ``.``."""
    folder = path.parent / f"{path.stem}_folder"
    folder.mkdir()
    (folder / "model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    torch.save(state, folder / "model_weights.ckpt")
    with tarfile.open(path, mode) as tar:
        tar.add(folder, arcname=".")


def load_like_training(request, out):
    """The converted folder as a run uses it: encoder.yaml -> config, then pretrained_encoder."""
    cfg = load_config(out / "encoder.yaml")
    audio = AudioPath(cfg, torch.float32).eval()
    request.getfixturevalue("single_rank")  # after the conversion, which starts its own group
    checkpoint.load_pretrained(audio.encoder, out, "encoder")
    return cfg, audio


def clips_batch(seconds: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    clips = [waveform(s, seed=i) for i, s in enumerate(seconds)]
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = clip
    return batch, lengths


def max_error(ours, reference, lengths, time_dim) -> float:
    return max(
        (ours[i].narrow(time_dim, 0, n) - reference[i].narrow(time_dim, 0, n)).abs().max().item()
        for i, n in enumerate(lengths.tolist())
    )


# ------------------------------------------------------------------------------------------ NeMo


@pytest.mark.reference
@torch.no_grad()
def test_nemo_archive_converts_and_equals_nemo(tmp_path, request, caplog):
    reference = nemo_reference()
    from nemo.collections.asr.modules import (
        AudioToMelSpectrogramPreprocessor,
        ConformerEncoder,
        ConvASRDecoder,
    )
    from omegaconf import OmegaConf

    # NeMo's own modules, built from the very config the archive carries.
    model = OmegaConf.create({"model": copy.deepcopy(NEMO_CONFIG)}).model
    preprocessor = AudioToMelSpectrogramPreprocessor.from_config_dict(model.preprocessor).eval()
    encoder = ConformerEncoder.from_config_dict(model.encoder).eval()
    decoder = ConvASRDecoder.from_config_dict(model.decoder)
    reference.randomize_(encoder, seed=1)
    state = {
        **{f"{name}.{k}": v for name, module in
           (("preprocessor", preprocessor), ("encoder", encoder), ("decoder", decoder))
           for k, v in module.state_dict().items()},
    }  # fmt: skip
    nemo, out = tmp_path / "model.nemo", tmp_path / "encoder"
    write_nemo(nemo, NEMO_CONFIG, state)

    caplog.set_level(logging.INFO, logger="salm.convert")
    assert salm(["convert", "nemo-encoder", "--nemo", str(nemo), "--out", str(out)]) == 0
    assert "dropped 4 tensors that are not the encoder's: decoder (2), preprocessor (2)" in (
        caplog.text
    )
    cfg, audio = load_like_training(request, out)
    enc = cfg.encoder
    assert (enc.d_model, enc.num_layers, enc.subsampling_factor, enc.dropout_att) == (64, 2, 8, 0.1)
    assert (enc.features.n_mels, enc.features.n_fft, enc.features.dither) == (80, 512, 1e-5)
    assert enc.spec_augment.time_masks == 5

    batch, lengths = clips_batch((1.37, 0.73, 0.05))
    nemo_features, nemo_frames = preprocessor(input_signal=batch, length=lengths)
    features, frames = audio.features(batch, lengths)
    assert torch.equal(frames, nemo_frames)
    assert max_error(features, nemo_features, frames, time_dim=1) < TOLERANCE
    nemo_encoded, nemo_lengths = encoder(audio_signal=nemo_features, length=nemo_frames)
    encoded, encoded_lengths = audio.encoder(features, frames)
    assert torch.equal(encoded_lengths, nemo_lengths)
    assert max_error(encoded, nemo_encoded.transpose(1, 2), nemo_lengths, 0) < TOLERANCE


def test_nemo_archive_refuses_unsafe_members(tmp_path, capsys):
    good = io.BytesIO(b"encoder: {}\n")

    def archive(name: str, add) -> str:
        path = tmp_path / name
        with tarfile.open(path, "w:") as tar:
            info = tarfile.TarInfo("./model_config.yaml")
            info.size = len(good.getvalue())
            tar.addfile(info, io.BytesIO(good.getvalue()))
            add(tar)
        return str(path)

    def member(name: str, kind=tarfile.REGTYPE, link: str = ""):
        def add(tar):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)

        return add

    cases = {
        "traversal.nemo": (member("../../evil.py"), r"'../../evil.py' points outside"),
        "absolute.nemo": (member("/etc/evil"), r"'/etc/evil' points outside"),
        "symlink.nemo": (
            member("./model_weights.ckpt", tarfile.SYMTYPE, "/etc/passwd"),
            r"'./model_weights.ckpt' is a link \(to '/etc/passwd'\)",
        ),
        "hardlink.nemo": (member("./x", tarfile.LNKTYPE, "model_config.yaml"), "is a link"),
        "device.nemo": (member("./dev", tarfile.CHRTYPE), "is a device"),
    }
    for name, (add, message) in cases.items():
        path = archive(name, add)
        with pytest.raises(NemoArchiveError, match=message):
            read_nemo(path)
        assert salm(["convert", "nemo-encoder", "--nemo", path, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("salm convert nemo-encoder: error: ") and path in err
        assert not (tmp_path / "o").exists()
    with pytest.raises(NemoArchiveError, match="has no model_weights.ckpt"):
        read_nemo(archive("incomplete.nemo", lambda tar: None))
    (tmp_path / "not.nemo").write_text("hello")
    with pytest.raises(NemoArchiveError, match="is not a .nemo archive"):
        read_nemo(tmp_path / "not.nemo")


def test_gzipped_nemo_archive_reads(tmp_path):
    state = {"encoder.layers.0.fc.weight": torch.arange(6.0).view(2, 3), "decoder.w": torch.ones(1)}
    write_nemo(tmp_path / "old.nemo", NEMO_CONFIG, state, mode="w:gz")
    config, loaded = read_nemo(tmp_path / "old.nemo")
    assert config == NEMO_CONFIG
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("encoder", "subsampling", "striding", "encoder.subsampling='striding' is not supported"),
        ("encoder", "self_attention_model", "abs_pos", "self_attention_model='abs_pos' is not"),
        ("encoder", "att_context_style", "chunked_limited", "att_context_style='chunked_limi"),
        ("encoder", "conv_norm_type", "group_norm", "encoder.conv_norm_type='group_norm' is not"),
        ("encoder", "feat_in", 64, r"encoder.feat_in=64 is not supported \(preprocessor.feat"),
        ("encoder", "_target_", "nemo.X.SqueezeformerEncoder", "encoder._target_='nemo.X.Sque"),
        ("preprocessor", "normalize", "all_features", "normalize='all_features' is not supp"),
        ("preprocessor", "window", "hamming", "preprocessor.window='hamming' is not supported"),
        ("preprocessor", "sample_rate", "${model.rate}", r"sample_rate='\$\{model.rate\}' names"),
    ],
)
def test_unsupported_nemo_settings_are_refused(section, key, value, message):
    config = copy.deepcopy(NEMO_CONFIG)
    config[section][key] = value
    with pytest.raises(ConfigError, match=f"^x.nemo: .*{message}"):
        encoder_config_from_nemo(config, "x.nemo")


def test_nemo_settings_map_to_ours():
    config = copy.deepcopy(NEMO_CONFIG)
    config["encoder"].update(subsampling_conv_channels=-1, att_context_size=[[70, 13], [70, 1]])
    config["preprocessor"].update(n_fft=None, window_size=0.02, preemph=None, normalize=None)
    enc = encoder_config_from_nemo(config, "x.nemo")
    assert enc.subsampling_conv_channels == 64  # -1: d_model
    assert enc.att_context_size == [70, 13]  # NeMo's default is the first
    assert (enc.features.n_fft, enc.features.preemph, enc.features.normalize) == (512, None, None)


# --------------------------------------------------------------------------------------- Whisper


@torch.no_grad()
def test_hf_whisper_converts_and_equals_transformers(tmp_path, request, caplog):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        max_source_positions=1500,
    )
    model = transformers.WhisperForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    for tensor in model.parameters():  # norms and biases start at 1 and 0: make them matter
        if tensor.dim() == 1:
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    folder, out = tmp_path / "whisper-tiny-random", tmp_path / "encoder"
    model.save_pretrained(folder)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    extractor.save_pretrained(folder)

    caplog.set_level(logging.INFO, logger="salm.convert")
    assert salm(["convert", "hf-whisper-encoder", "--hf", str(folder), "--out", str(out)]) == 0
    assert "dropped" in caplog.text and "not the encoder's" in caplog.text
    cfg, audio = load_like_training(request, out)
    enc = cfg.encoder
    assert (enc.type, enc.d_model, enc.max_source_positions) == ("whisper", 64, 1500)
    assert cfg.data.max_duration == 30.0

    batch, lengths = clips_batch((2.37, 1.0))
    # Hugging Face pads to 30 s: ours on the same 30 s input.
    hf_features = extractor(list(batch.numpy()), sampling_rate=16000, return_tensors="pt")
    hf_features = hf_features.input_features
    padded = torch.zeros(2, 30 * 16000)
    padded[:, : batch.size(1)] = batch
    full = torch.full((2,), 30 * 16000)
    features, frames = audio.features(padded, full)
    assert frames.tolist() == [3000, 3000]
    assert (features - hf_features).abs().max() < TOLERANCE
    # Without the padding, ours gives the same valid frames.
    unpadded, unpadded_frames = audio.features(batch, lengths)
    assert unpadded_frames.tolist() == (lengths // 160).tolist()
    assert max_error(unpadded, features, unpadded_frames, time_dim=1) < 1e-5

    hf_encoded = model.model.encoder(hf_features).last_hidden_state
    encoded, encoded_lengths = audio.encoder(hf_features, frames)
    assert encoded_lengths.tolist() == [1500, 1500]
    assert (encoded - hf_encoded).abs().max() < TOLERANCE
    pipeline, _ = audio.encoder(features, frames)  # our features, our encoder
    assert (pipeline - hf_encoded).abs().max() < TOLERANCE


def test_hf_whisper_refusals(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    cases = {
        '{"model_type": "llama"}': "model_type='llama' is not 'whisper'",
        '{"model_type": "whisper", "activation_function": "relu"}': "activation_function='relu'",
        '{"model_type": "whisper", "d_model": 64, "encoder_ffn_dim": 100}': "encoder_ffn_dim=100",
        '{"model_type": "whisper", "d_model": 64, "encoder_attention_heads": 5}': "num_heads=5",
        '{"model_type": "whisper"}': "has no model.safetensors",
    }
    for text, message in cases.items():
        (folder / "config.json").write_text(text)
        code = salm(["convert", "hf-whisper-encoder", "--hf", str(folder), "--out", "unused"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("salm convert hf-whisper-encoder: error: "), err
        assert message in err, err


def test_hf_whisper_weights_from_bin_and_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    from salm_megatron.convert.whisper_encoder import read_encoder_weights

    encoder = {
        "model.encoder.conv1.weight": torch.ones(2, 3),
        "model.encoder.embed_positions.weight": torch.zeros(4, 2),
    }
    other = {
        "model.decoder.embed_tokens.weight": torch.ones(5, 2),
        "proj_out.weight": torch.ones(1),
    }
    expected = {"conv1.weight": torch.ones(2, 3), "embed_positions": torch.zeros(4, 2)}
    (tmp_path / "bin").mkdir()
    torch.save({**encoder, **other}, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "sharded").mkdir()
    save_file(encoder, tmp_path / "sharded" / "model-00001-of-00002.safetensors")
    save_file(other, tmp_path / "sharded" / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in encoder} | {
        k: "model-00002-of-00002.safetensors" for k in other
    }
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    for folder in ("bin", "sharded"):
        loaded = read_encoder_weights(tmp_path / folder)
        assert loaded.keys() == expected.keys(), folder
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        read_encoder_weights(tmp_path / "sharded")
