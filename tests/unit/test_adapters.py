"""Proves adapters give [b, ceil(t/k), d_out] with exact lengths; padding never reaches outputs."""

import pytest
import torch

from salm_megatron.audio import (
    ConformerAdapter,
    FastConformerEncoder,
    LinearAdapter,
    MLPAdapter,
    adapter_output_lengths,
    build_adapter,
    stack_frames,
)
from salm_megatron.config import AdapterConfig, ConfigError, encoder_preset

D_IN, D_OUT = 64, 48

CASES = {
    "linear": (AdapterConfig(type="linear"), 1),
    "linear-stack3": (AdapterConfig(type="linear", stack=3), 3),
    "mlp-stack2": (AdapterConfig(type="mlp", stack=2, hidden_size=96), 2),
    "conformer": (AdapterConfig(type="conformer", num_heads=4), 1),
    "conformer-subsampled": (
        AdapterConfig(type="conformer", num_heads=4, hidden_size=32, extra_subsampling=True),
        2,
    ),
}


def adapter(name: str):
    torch.manual_seed(0)
    cfg, _ = CASES[name]
    return build_adapter(cfg, D_IN, D_OUT).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_and_lengths(name):
    module, k = adapter(name), CASES[name][1]
    lengths = torch.tensor([25, 24, 7, 1])
    with torch.no_grad():
        y, out_lengths = module(torch.randn(4, 25, D_IN), lengths)
    assert y.shape == (4, -(-25 // k), D_OUT)
    assert out_lengths.tolist() == [-(-n // k) for n in lengths.tolist()]
    assert torch.equal(module.output_lengths(lengths), out_lengths)
    assert torch.equal(adapter_output_lengths(CASES[name][0], lengths), out_lengths)


@pytest.mark.parametrize("name", list(CASES))
def test_padding_never_leaks_into_valid_outputs(name):
    module = adapter(name)
    torch.manual_seed(1)
    lengths = torch.tensor([25, 22, 7, 1])
    x = torch.randn(4, 25, D_IN)
    garbage = x.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = 1e3  # loud padding
    with torch.no_grad():
        y, out_lengths = module(garbage, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone, m = module(x[i : i + 1, :n], lengths[i : i + 1])
            torch.testing.assert_close(y[i, : int(m)], alone[0], atol=1e-5, rtol=0)
            assert (y[i, int(m) :] == 0).all()


def test_stack_frames_concatenates_consecutive_frames():
    x = torch.arange(1, 8, dtype=torch.float32).view(1, 7, 1).repeat(2, 1, 2)  # frames 1..7
    stacked, lengths = stack_frames(x, torch.tensor([7, 5]), 3)
    assert stacked.shape == (2, 3, 6) and lengths.tolist() == [3, 2]
    assert stacked[0, :, ::2].tolist() == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]
    assert stacked[1, :, ::2].tolist() == [[1, 2, 3], [4, 5, 0], [0, 0, 0]]  # padding zeroed


def test_build_adapter_defaults():
    mlp = build_adapter(AdapterConfig(type="mlp"), D_IN, D_OUT)
    assert isinstance(mlp, MLPAdapter) and mlp.mlp[0].out_features == D_OUT  # hidden = d_out
    assert isinstance(build_adapter(AdapterConfig(type="linear"), D_IN, D_OUT), LinearAdapter)
    conformer = build_adapter(AdapterConfig(type="conformer"), D_IN, D_OUT)
    assert isinstance(conformer, ConformerAdapter) and len(conformer.layers) == 2
    assert conformer.proj_in.out_features == D_IN  # width = d_in


def test_adapter_after_the_encoder():
    torch.manual_seed(0)
    encoder = FastConformerEncoder(encoder_preset("tiny")).eval()
    module = build_adapter(AdapterConfig(type="mlp", stack=2), encoder.d_model, D_OUT).eval()
    with torch.no_grad():
        encoded, lengths = encoder(torch.randn(2, 80, 161), torch.tensor([161, 100]))
        y, y_lengths = module(encoded, lengths)
    assert y.shape == (2, 11, D_OUT)
    assert (
        y_lengths.tolist()
        == module.output_lengths(encoder.output_lengths(torch.tensor([161, 100]))).tolist()
        == [11, 7]
    )


def test_bad_config_and_inputs_are_named():
    with pytest.raises(ConfigError, match="adapter.type='qformer'"):
        AdapterConfig(type="qformer")
    with pytest.raises(ConfigError, match="adapter.stack=2 applies to linear and mlp"):
        AdapterConfig(type="conformer", stack=2)
    with pytest.raises(
        ConfigError, match="adapter.extra_subsampling=true applies to the conformer"
    ):
        AdapterConfig(type="mlp", extra_subsampling=True)
    with pytest.raises(ValueError, match="width 60 .* not divisible by adapter.num_heads=8"):
        build_adapter(AdapterConfig(type="conformer", hidden_size=60), D_IN, D_OUT)
    with pytest.raises(ValueError, match=r"\[batch, frames, features\]"):
        adapter("linear")(torch.zeros(2, D_IN), torch.tensor([1, 1]))
