"""``salm convert nemo-encoder``: the FastConformer encoder of a NeMo ASR archive, as ours.

A ``.nemo`` file is a tar (gzipped in old versions) holding ``model_config.yaml`` and
``model_weights.ckpt`` (a ``torch.save`` of the model's state dict), names often under ``./``.
Every member is checked before anything is read (no absolute names, ``..``, links or devices),
and the two files are read from the archive without extracting it. The ``preprocessor:`` and
``encoder:`` sections become our ``encoder:`` config (settings we do not implement are refused,
naming the field); the ``encoder.*`` weights are kept (NeMo's names are ours), the rest dropped.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from salm_megatron.audio import nemo_state_dict_to_ours
from salm_megatron.config import ConfigError, EncoderConfig, encoder_from_dict
from salm_megatron.convert.encoder_checkpoint import run_cli, write_encoder

log = logging.getLogger("salm.convert")

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"


class NemoArchiveError(ValueError):
    """A .nemo file we refuse to read, or one without what we need; the message says which."""


# ------------------------------------------------------------------------------------- archive


def _member_name(member: tarfile.TarInfo, archive: Path) -> str:
    """The member's path inside the archive, or an error if it is not a plain file or folder
    that stays inside it."""
    name = member.name
    if member.issym() or member.islnk():
        raise NemoArchiveError(
            f"{archive}: member {name!r} is a link (to {member.linkname!r}); "
            "a .nemo archive holds plain files only, refusing to read it"
        )
    if not (member.isfile() or member.isdir()):
        raise NemoArchiveError(
            f"{archive}: member {name!r} is a device, pipe or other special file; "
            "a .nemo archive holds plain files only, refusing to read it"
        )
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise NemoArchiveError(
            f"{archive}: member {name!r} points outside the archive (absolute path or '..'); "
            "refusing to read it"
        )
    return str(path)  # "./a/b" -> "a/b"


def read_nemo(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model config, state dict)`` of a ``.nemo`` archive, read without extracting it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 (plain or gzipped; closed below)
    except tarfile.TarError as err:
        raise NemoArchiveError(f"{path} is not a .nemo archive (a tar file): {err}") from err
    with tar:
        members = {_member_name(m, path): m for m in tar.getmembers()}
        for needed in (CONFIG_MEMBER, WEIGHTS_MEMBER):
            if needed not in members or not members[needed].isfile():
                listed = ", ".join(sorted(n for n, m in members.items() if m.isfile())[:10])
                raise NemoArchiveError(
                    f"{path} has no {needed} at its top level (files: {listed or 'none'}); "
                    "model-parallel or nested archives are not supported"
                )
        try:
            config = yaml.safe_load(tar.extractfile(members[CONFIG_MEMBER]))
        except yaml.YAMLError as err:
            raise NemoArchiveError(f"{path}: {CONFIG_MEMBER} is not valid YAML: {err}") from err
        # Through a temporary file: torch.load seeks, which a gzip stream does slowly.
        with tempfile.TemporaryFile() as weights:
            shutil.copyfileobj(tar.extractfile(members[WEIGHTS_MEMBER]), weights)
            weights.seek(0)
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as err:
                raise NemoArchiveError(
                    f"{path}: {WEIGHTS_MEMBER} is not a state dict torch.load(weights_only=True) "
                    f"can read: {err}"
                ) from err
    if not isinstance(config, dict):
        raise NemoArchiveError(f"{path}: {CONFIG_MEMBER} is not a mapping")
    if not isinstance(state, dict):
        raise NemoArchiveError(f"{path}: {WEIGHTS_MEMBER} is not a mapping of names to tensors")
    return config, {key: value for key, value in state.items() if torch.is_tensor(value)}


# -------------------------------------------------------------------------------------- config


def _resolve(value: Any, root: dict[str, Any], field: str, source: str) -> Any:
    """A ``${a.b}`` interpolation (as OmegaConf saves them) replaced by what it names."""
    if not (isinstance(value, str) and value.startswith("${") and value.endswith("}")):
        return value
    path = value[2:-1].split(".")
    if path[0] == "model" and "model" not in root:  # the file holds what was under model:
        path = path[1:]
    node: Any = root
    for part in path:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{source}: {field}={value!r} names nothing in model_config.yaml")
        node = node[part]
    return _resolve(node, root, field, source)


class _Section:
    """One section of NeMo's config, read with NeMo's defaults and checked against ours."""

    def __init__(self, root: dict[str, Any], name: str, target: str, source: str):
        section = root.get(name)
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: model_config.yaml has no {name}: section")
        self.root, self.name, self.source, self.section = root, name, source, section
        found = str(section.get("_target_", ""))
        if found.rsplit(".", 1)[-1] != target:
            raise ConfigError(
                f"{source}: {name}._target_={found!r} is not supported (salm converts NeMo's "
                f"{target})"
            )

    def get(self, key: str, default: Any = None) -> Any:
        value = self.section.get(key, default)
        return _resolve(value, self.root, f"{self.name}.{key}", self.source)

    def need(self, key: str, default: Any, ok, supported: str) -> Any:
        """The value, or a clear refusal when ``ok(value)`` is false."""
        value = self.get(key, default)
        if not ok(value):
            raise ConfigError(
                f"{self.source}: {self.name}.{key}={value!r} is not supported ({supported})"
            )
        return value


def encoder_config_from_nemo(config: dict[str, Any], source: str) -> EncoderConfig:
    """Our encoder config (front end, encoder, SpecAugment) from a NeMo ASR model config."""
    pre = _Section(config, "preprocessor", "AudioToMelSpectrogramPreprocessor", source)
    rate = pre.get("sample_rate", 16000)
    window_size, window_stride = pre.get("window_size", 0.02), pre.get("window_stride", 0.01)
    if pre.get("n_window_size") is not None:
        window_size = pre.get("n_window_size") / rate
    if pre.get("n_window_stride") is not None:
        window_stride = pre.get("n_window_stride") / rate
    n_fft = pre.get("n_fft") or 2 ** math.ceil(math.log2(round(window_size * rate)))
    pre.need("window", "hann", lambda v: v == "hann", "only 'hann'")
    pre.need("log", True, lambda v: v is True, "only log features")
    pre.need("log_zero_guard_type", "add", lambda v: v == "add", "only 'add'")
    guard = pre.need(
        "log_zero_guard_value", 2**-24, lambda v: isinstance(v, (int, float)), "only a number"
    )
    pre.need("frame_splicing", 1, lambda v: v == 1, "only 1")
    pre.need("lowfreq", 0, lambda v: not v, "only 0")
    pre.need("highfreq", None, lambda v: v in (None, rate / 2), f"only null or {rate / 2:g}")
    pre.need("mag_power", 2.0, lambda v: v == 2, "only 2, the power spectrum")
    pre.need("mel_norm", "slaney", lambda v: v == "slaney", "only 'slaney'")
    pre.need("exact_pad", False, lambda v: not v, "only false")
    normalize = pre.need(
        "normalize", "per_feature", lambda v: v in ("per_feature", None, "NA"),
        "'per_feature' or none",
    )  # fmt: skip
    features = dict(
        sample_rate=rate,
        n_mels=pre.get("features", 64),
        window_size=window_size,
        window_stride=window_stride,
        n_fft=n_fft,
        preemph=pre.get("preemph", 0.97),
        log_zero_guard=float(guard),
        normalize=None if normalize == "NA" else normalize,
        dither=pre.get("dither", 1e-5),
    )

    enc = _Section(config, "encoder", "ConformerEncoder", source)
    n_mels = features["n_mels"]
    enc.need("feat_in", n_mels, lambda v: v == n_mels, f"preprocessor.features={n_mels}")
    enc.need("feat_out", -1, lambda v: v in (-1, None), "only -1: no output projection")
    enc.need("subsampling", "striding", lambda v: v == "dw_striding", "only 'dw_striding'")
    enc.need("causal_downsampling", False, lambda v: not v, "only false")
    enc.need("reduction", None, lambda v: v is None, "only null")
    enc.need("self_attention_model", "rel_pos", lambda v: v == "rel_pos", "only 'rel_pos'")
    enc.need("att_context_style", "regular", lambda v: v == "regular", "only 'regular'")
    enc.need("global_tokens", 0, lambda v: not v, "only 0")
    kernel = enc.get("conv_kernel_size", 31)
    centred = [(kernel - 1) // 2] * 2
    enc.need("conv_context_size", None, lambda v: v in (None, centred), f"only null or {centred}")
    context = enc.get("att_context_size") or [-1, -1]
    if isinstance(context[0], (list, tuple)):  # several look-aheads: NeMo's default is the first
        log.info("%s: encoder.att_context_size lists %s; using the first", source, context)
        context = context[0]
    d_model = enc.get("d_model")
    channels = enc.get("subsampling_conv_channels", -1)
    encoder = dict(
        d_model=d_model,
        num_layers=enc.get("n_layers"),
        num_heads=enc.get("n_heads", 4),
        ff_expansion_factor=enc.get("ff_expansion_factor", 4),
        conv_kernel_size=kernel,
        conv_norm_type=enc.get("conv_norm_type", "batch_norm"),
        subsampling_factor=enc.get("subsampling_factor", 4),
        subsampling_conv_channels=d_model if channels in (-1, None) else channels,
        att_context_size=list(context),
        xscaling=enc.get("xscaling", True),
        use_bias=enc.get("use_bias", True),
        dropout=enc.get("dropout", 0.1),
        dropout_pre_encoder=enc.get("dropout_pre_encoder", 0.1),
        dropout_emb=enc.get("dropout_emb", 0.1),
        dropout_att=enc.get("dropout_att", 0.0),
        features=features,
    )
    augment = config.get("spec_augment")
    if isinstance(augment, dict):
        encoder["spec_augment"] = {
            key: _resolve(augment[key], config, f"spec_augment.{key}", source)
            for key in ("freq_masks", "freq_width", "time_masks", "time_width")
            if key in augment
        }
    if enc.get("stochastic_depth_drop_prob", 0.0):
        log.warning("%s: encoder.stochastic_depth_drop_prob (training only) is not used", source)
    try:
        return encoder_from_dict(encoder)
    except ConfigError as err:
        raise ConfigError(f"{source}: from its model_config.yaml: {err}") from err


# ------------------------------------------------------------------------------------- command


def convert(nemo: str | Path, out: str | Path) -> EncoderConfig:
    """Write the encoder of ``nemo`` to ``out`` (dist checkpoint + encoder.yaml)."""
    config, state = read_nemo(nemo)
    cfg = encoder_config_from_nemo(config, str(nemo))
    dropped = Counter(key.split(".", 1)[0] for key in state if not key.startswith("encoder."))
    if dropped:
        log.info(
            "dropped %d tensors that are not the encoder's: %s",
            sum(dropped.values()),
            ", ".join(f"{name} ({n})" for name, n in sorted(dropped.items())),
        )
    write_encoder(cfg, nemo_state_dict_to_ours(state), out, str(nemo))
    return cfg


EXAMPLE = """example:
  salm convert nemo-encoder --nemo parakeet-tdt-0.6b-v2.nemo --out encoders/parakeet
  salm train run.yaml checkpoint.pretrained_encoder=encoders/parakeet

writes OUT/ (a dist checkpoint of the encoder, for checkpoint.pretrained_encoder) and
OUT/encoder.yaml (the encoder: section to put in the run config: sizes and front end).
"""


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        "salm convert nemo-encoder",
        "The FastConformer encoder of a NeMo ASR model (.nemo), as ours.",
        ("--nemo", "a .nemo archive (Canary, Parakeet, ...)"),
        convert,
        EXAMPLE,
    )


if __name__ == "__main__":
    sys.exit(main())
