"""Proves the tiny LLM's logits, loss and grads at TP/SP/PP/VPP>1 and uneven PP equal TP=PP=1."""

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
# Uneven pipeline stages (fewer layers where the audio path or the loss runs): name: (processes,
# worker flags, LLM variant, each rank's layers per model chunk).
UNEVEN = {
    "pp2-uneven-1+3": (2, ["--pp", "2", "--first-stage-layers", "1"], "gqa", [[1], [3]]),
    "pp3-uneven-1+2+1": (3, ["--pp", "3", "--first-stage-layers", "1", "--last-stage-layers", "1"],
                         "gqa", [[1], [2], [1]]),
    "pp2-vpp2-uneven-2+4": (2, ["--pp", "2", "--vpp", "2", "--first-stage-layers", "2"],
                            "six-layers", [[1, 1], [2, 2]]),
}  # fmt: skip
# The uneven layout whose own checkpoint one stage loads (interleaved: the most scattered layers).
RESHARDED = "pp2-vpp2-uneven-2+4"
VARIANTS = {
    "gqa": {},
    "tied-bias": {"tie_embeddings": True, "qkv_bias": True},
    "six-layers": {"num_layers": 6},
}


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


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(UNEVEN))
def test_uneven_stages_match_reference(layout, references):
    """Each rank holds the layers asked for, and (for RESHARDED) the checkpoint it writes numbers
    them globally: at PP=1 each lands where it belongs and the results match again."""
    nprocs, flags, variant, layers = UNEVEN[layout]
    workdir, overrides = references[variant], json.dumps(VARIANTS[variant])
    saved = ["--save-weights", f"weights-{layout}"] if layout == RESHARDED else []
    launch(WORKER, nprocs, "--workdir", str(workdir), "--name", layout, *flags,
           "--llm", overrides, *saved)  # fmt: skip
    results = eq.read_results(workdir, layout)
    eq.check_results(results, nprocs, PARTS)
    assert [r["layers"] for r in results] == layers
    if saved:
        back = f"{layout}-to-pp1"
        launch(WORKER, 1, "--workdir", str(workdir), "--name", back, "--weights", saved[1],
               "--llm", overrides)  # fmt: skip
        eq.check_results(eq.read_results(workdir, back), 1, PARTS)
