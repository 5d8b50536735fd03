"""Proves SALM and BESTOW give TP=PP=1's loss, logits and gradients at TP=2+SP, PP=2, TP=2 x PP=2,
PP=2 x VPP=2, PP=4 (SALM) and context parallelism (CP=2, CP=2 x TP=2+SP), the auxiliary CTC loss
on the first stage included; and that packed rows give the padded batch's loss and gradients at
TP=1 and every layout without CP."""

import pytest

from tests.conftest import REPO, launch
from tests.parallel import equivalence as eq

WORKER = REPO / "tests/parallel/speech_worker.py"

LAYOUTS = {
    "tp2-sp": (2, ["--tp", "2", "--sp"]),
    "pp2": (2, ["--pp", "2"]),
    "tp2-pp2": (4, ["--tp", "2", "--pp", "2"]),
    "pp2-vpp2": (2, ["--pp", "2", "--vpp", "2"]),
    "pp4": (4, ["--pp", "4"]),  # stages that read no samples (packed: each row's bounds only)
    "cp2": (2, ["--cp", "2"]),
    "cp2-tp2-sp": (4, ["--cp", "2", "--tp", "2", "--sp"]),
}
# Packed rows are cut into context-parallel chunks nowhere (refused by the config).
PACKED = [layout for layout in LAYOUTS if not layout.startswith("cp")]
PARTS = {
    "salm": (
        "llm.embedding",
        "llm.decoder.layers",
        "llm.output_layer",
        "audio.encoder",
        "audio.adapter",
        "ctc.proj",
    ),
}
PARTS["bestow"] = PARTS["salm"] + ("cross_attention.layers.0.cross_attention",)
CASES = [(arch, layout) for arch in PARTS for layout in LAYOUTS]
CASES.remove(("bestow", "cp2-tp2-sp"))  # BESTOW at CP=2 alone: its block runs before the cut
CASES.remove(("bestow", "pp4"))  # stages without the first or last layer hold no BESTOW part


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    dirs = {}
    for arch in PARTS:
        dirs[arch] = tmp_path_factory.mktemp(f"ref-{arch}")
        launch(WORKER, 1, "--workdir", str(dirs[arch]), "--reference", "--arch", arch)
    return dirs


@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", list(PARTS))
def test_packed_rows_match_padded_batch(arch, references):
    """TP=PP=1: the reference process runs both passes."""
    eq.check_results(eq.read_results(references[arch], "tp1"), 1, PARTS[arch], prefix="packed_")


@pytest.mark.multiprocess
@pytest.mark.parametrize(("arch", "layout"), CASES)
def test_speech_layout_matches_reference(arch, layout, references):
    nprocs, flags = LAYOUTS[layout]
    workdir = references[arch]
    launch(WORKER, nprocs, "--workdir", str(workdir), "--name", layout, "--arch", arch, *flags)
    results = eq.read_results(workdir, layout)
    eq.check_results(results, nprocs, PARTS[arch])
    assert any("logits" in r for r in results), "no rank compared logits"
    if layout in PACKED:
        eq.check_results(results, nprocs, PARTS[arch], prefix="packed_")
