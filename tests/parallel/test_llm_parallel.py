"""Proves the tiny LLM gives the same logits, loss and gradients at TP/SP/PP/VPP>1 as at TP=PP=1."""

import json

import pytest

from tests.conftest import REPO, launch
from tests.parallel import equivalence as eq

WORKER = REPO / "tests/parallel/llm_worker.py"
# Every kind of parameter must have been compared somewhere.
PARTS = ("word_embeddings", "linear_qkv.weight", "linear_proj", "linear_fc1", "linear_fc2",
         "input_layernorm", "pre_mlp_layernorm", "final_layernorm")  # fmt: skip

LAYOUTS = {
    # name: (processes, worker flags, LLM variant)
    "tp2": (2, ["--tp", "2"], "gqa"),
    "tp2-sp": (2, ["--tp", "2", "--sp"], "gqa"),
    "pp2-1f1b": (2, ["--pp", "2"], "gqa"),
    "tp2-pp2": (4, ["--tp", "2", "--pp", "2"], "gqa"),
    "pp2-vpp2": (2, ["--pp", "2", "--vpp", "2"], "gqa"),
    "tp2-dp2": (4, ["--tp", "2"], "gqa"),  # data parallelism is what the world leaves
    # Tied embeddings across pipeline stages and Qwen2-style QKV bias, with SP on top.
    "tp2-sp-pp2-tied-bias": (4, ["--tp", "2", "--sp", "--pp", "2"], "tied-bias"),
}
VARIANTS = {"gqa": {}, "tied-bias": {"tie_embeddings": True, "qkv_bias": True}}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Reference run at TP=PP=1 per LLM variant: weights, gradients, logits and loss."""
    dirs = {}
    for variant, overrides in VARIANTS.items():
        workdir = tmp_path_factory.mktemp(f"ref-{variant}")
        launch(WORKER, 1, "--workdir", str(workdir), "--reference", "--llm", json.dumps(overrides))
        dirs[variant] = workdir
    return dirs


def test_reference_loss_is_plain_cross_entropy(references):
    import torch

    for workdir in references.values():
        ref = torch.load(workdir / "reference.pt")
        torch.testing.assert_close(ref["loss"], ref["plain_loss"], rtol=1e-6, atol=0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_reference(layout, references):
    nprocs, flags, variant = LAYOUTS[layout]
    workdir = references[variant]
    overrides = json.dumps(VARIANTS[variant])
    launch(WORKER, nprocs, "--workdir", str(workdir), "--name", layout, *flags, "--llm", overrides)
    eq.check_results(eq.read_results(workdir, layout), nprocs, PARTS)
