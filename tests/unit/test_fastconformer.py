"""Proves the FastConformer is NeMo's encoder: outputs, lengths, padding-proof, preset sizes."""

import math

import pytest
import torch

from salm_megatron.audio import (
    FastConformerEncoder,
    conv_output_lengths,
    encoder_output_lengths,
    nemo_state_dict_to_ours,
)
from salm_megatron.audio.fastconformer import RelPositionalEncoding, attention_mask
from salm_megatron.config import ConfigError, EncoderConfig, _build, encoder_preset
from tests.conftest import nemo_reference


def tiny_encoder(**overrides) -> FastConformerEncoder:
    """A tiny encoder in eval mode, with BatchNorm statistics and position biases not trivial."""
    torch.manual_seed(0)
    encoder = FastConformerEncoder(encoder_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "pos_bias_u", "pos_bias_v")):
                tensor.normal_(0, 0.3)
    return encoder


def nemo_length_formula(length: int, stages: int = 3) -> int:
    for _ in range(stages):
        length = math.floor((length + 2 * 1 - 3) / 2 + 1)
    return length


# -------------------------------------------------------------------------------------- lengths


def test_output_lengths_follow_nemo_formula():
    lengths = torch.arange(0, 400)
    expected = [nemo_length_formula(n) for n in range(400)]
    assert conv_output_lengths(lengths, 3).tolist() == expected
    assert tiny_encoder().output_lengths(lengths).tolist() == expected
    assert encoder_output_lengths(encoder_preset("tiny"), lengths).tolist() == expected


def test_encoder_output_frames_equal_the_formula():
    encoder = tiny_encoder()
    with torch.no_grad():
        for frames in (1, 2, 7, 8, 9, 16, 17, 31, 100, 101):
            out, lengths = encoder(torch.randn(1, 80, frames), torch.tensor([frames]))
            assert out.shape == (1, nemo_length_formula(frames), 64)
            assert lengths.tolist() == [nemo_length_formula(frames)]


# --------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("context", [[-1, -1], [3, 1]])
def test_padding_never_leaks_into_valid_outputs(context):
    encoder = tiny_encoder(att_context_size=context)
    torch.manual_seed(1)
    lengths = torch.tensor([203, 160, 57, 9])
    features = torch.randn(4, 80, 203)
    with torch.no_grad():
        out, out_lengths = encoder(features * 5 + 3, lengths)  # loud garbage in the padding
        for i, n in enumerate(lengths.tolist()):
            alone, alone_lengths = encoder(features[i : i + 1, :, :n] * 5 + 3, lengths[i : i + 1])
            m = int(alone_lengths)
            assert out_lengths[i] == m
            torch.testing.assert_close(out[i, :m], alone[0], atol=1e-5, rtol=0)


def test_gradients_are_finite_with_padding():
    encoder = tiny_encoder()
    encoder.train()
    features = torch.randn(3, 80, 64, requires_grad=True)
    out, lengths = encoder(features, torch.tensor([64, 20, 1]))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
    assert torch.isfinite(features.grad).all()


# ------------------------------------------------------------------------ relative attention


def naive_rel_attention(attn, x, pos_emb, allowed):
    """Transformer-XL scores one pair at a time: (q_i + u) . k_j + (q_i + v) . W_pos pe(i - j)."""
    b, t, d = x.shape
    h, dh = attn.num_heads, attn.d_head
    q = attn.linear_q(x).view(b, t, h, dh)
    k = attn.linear_k(x).view(b, t, h, dh)
    v = attn.linear_v(x).view(b, t, h, dh)
    p = attn.linear_pos(pos_emb[0]).view(2 * t - 1, h, dh)  # row r: distance t - 1 - r
    out = torch.zeros(b, t, h, dh)
    for bi in range(b):
        for i in range(t):
            scores = torch.full((h, t), -math.inf)
            for j in range(t):
                if allowed[bi, 0, i, j]:
                    content = ((q[bi, i] + attn.pos_bias_u) * k[bi, j]).sum(-1)
                    position = ((q[bi, i] + attn.pos_bias_v) * p[t - 1 - (i - j)]).sum(-1)
                    scores[:, j] = (content + position) / math.sqrt(dh)
            out[bi, i] = torch.einsum("hj,jhd->hd", scores.softmax(-1), v[bi])
    return attn.linear_out(out.reshape(b, t, d))


@pytest.mark.parametrize("context", [[-1, -1], [2, 0]])
def test_relative_attention_equals_a_naive_computation(context):
    encoder = tiny_encoder()
    attn = encoder.layers[0].self_attn
    torch.manual_seed(2)
    x = torch.randn(2, 6, 64)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    allowed = attention_mask(valid, context)
    _, pos_emb = RelPositionalEncoding(64, xscale=False, dropout=0.0, dropout_emb=0.0)(x)
    with torch.no_grad():
        ours = attn(x, pos_emb, valid, allowed)
        expected = naive_rel_attention(attn, x, pos_emb, allowed)
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_positional_encoding_is_sinusoids_of_distance():
    x = torch.zeros(1, 5, 8)
    scaled, pos_emb = RelPositionalEncoding(8, xscale=True, dropout=0.0, dropout_emb=0.0)(x + 1)
    assert torch.allclose(scaled, torch.full((1, 5, 8), math.sqrt(8)))
    distance = torch.arange(4, -5, -1).double()[:, None]
    inv_freq = 10000 ** (-torch.arange(0, 8, 2).double() / 8)
    expected = torch.stack([(distance * inv_freq).sin(), (distance * inv_freq).cos()], -1)
    torch.testing.assert_close(pos_emb[0].double(), expected.flatten(1), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ config, presets


def test_preset_parameter_counts():
    tiny = tiny_encoder()
    assert sum(p.numel() for p in tiny.parameters()) == tiny.cfg.num_parameters() == 225_472
    for name, expected in (("fastconformer-large", 108_762_112), ("fastconformer-xl", 609_321_984)):
        cfg = encoder_preset(name)
        with torch.device("meta"):
            encoder = FastConformerEncoder(cfg)
        assert sum(p.numel() for p in encoder.parameters()) == cfg.num_parameters() == expected
    # NVIDIA's FastConformer-Large encoder is ~108-115 M parameters (NeMo's count, checked below).
    assert 108e6 <= encoder_preset("fastconformer-large").num_parameters() <= 115e6
    no_bias = encoder_preset("tiny", use_bias=False, conv_norm_type="layer_norm")
    assert sum(p.numel() for p in FastConformerEncoder(no_bias).parameters()) == (
        no_bias.num_parameters()
    )


def test_presets_and_overrides():
    xl = encoder_preset("fastconformer-xl")
    assert (xl.d_model, xl.num_layers, xl.features.n_mels, xl.xscaling) == (1024, 24, 128, False)
    large = encoder_preset("fastconformer-large", att_context_size=[70, 13])
    assert (large.features.n_mels, large.att_context_size, large.xscaling) == (80, [70, 13], True)
    from_yaml = _build(EncoderConfig, {"d_model": 32, "features": {"n_mels": 128}}, "encoder.")
    assert from_yaml.features.n_mels == 128 and from_yaml.spec_augment.time_masks == 10
    with pytest.raises(ConfigError, match="encoder preset='huge'"):
        encoder_preset("huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=60, num_heads=8), "encoder.d_model=60 is not divisible by"),
        (dict(subsampling_factor=6), "encoder.subsampling_factor=6 must be a power of 2"),
        (dict(conv_kernel_size=8), "encoder.conv_kernel_size=8 must be odd"),
        (dict(att_context_size=[-2, 0]), r"encoder.att_context_size=\[-2, 0\]"),
        (dict(conv_norm_type="group_norm"), "encoder.conv_norm_type='group_norm'"),
        (dict(dropout=1.0), r"encoder.dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_encoder_config_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        EncoderConfig(**overrides)


def test_bad_inputs_are_named():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match=r"80 mel bins \(encoder.features.n_mels\)"):
        encoder(torch.zeros(1, 128, 50), torch.tensor([50]))
    with pytest.raises(ValueError, match=r"lengths=\[51\] must lie in \[0, 50\]"):
        encoder(torch.zeros(1, 80, 50), torch.tensor([51]))


def test_nemo_state_dict_names_map_to_ours():
    encoder = tiny_encoder()
    ours = encoder.state_dict()
    whole_model = {f"encoder.{k}": v for k, v in ours.items()}
    whole_model["decoder.decoder_layers.0.weight"] = torch.zeros(3)
    whole_model["encoder.pos_enc.pe"] = torch.zeros(1, 9, 64)  # saved by older NeMo versions
    assert nemo_state_dict_to_ours(whole_model).keys() == ours.keys()
    # untie_biases=False: one pair of position biases for all layers.
    shared = {k: v for k, v in ours.items() if "pos_bias" not in k}
    shared["pos_bias_u"], shared["pos_bias_v"] = torch.ones(4, 16), torch.zeros(4, 16)
    mapped = nemo_state_dict_to_ours(shared)
    assert mapped.keys() == ours.keys() and torch.equal(
        mapped["layers.1.self_attn.pos_bias_u"], torch.ones(4, 16)
    )


# ---------------------------------------------------------------------------------------- NeMo


@pytest.mark.reference
@pytest.mark.parametrize("case", ["tiny", "tiny-context", "tiny-variants"])
def test_encoder_equals_nemo(case):
    reference = nemo_reference()
    cfg = reference.CASES[case]()
    result = reference.check_case(case, cfg, reference.synthetic_audio(16000))
    for part in ("features", "encoder", "pipeline"):
        abs_err, _ = result[part]
        assert abs_err < 1e-4, f"{case} {part}: max abs error {abs_err:.2e} against NeMo"
    ours, nemo, formula = result["parameters"]
    assert ours == nemo == formula


@pytest.mark.reference
def test_large_preset_has_nemo_parameter_count():
    reference = nemo_reference()
    cfg = encoder_preset("fastconformer-large")
    nemo = reference.nemo_encoder(cfg)
    assert sum(p.numel() for p in nemo.parameters()) == cfg.num_parameters() == 108_762_112
    with torch.device("meta"):
        ours = FastConformerEncoder(cfg)
    assert set(ours.state_dict()) == set(nemo_state_dict_to_ours(nemo.state_dict()))
