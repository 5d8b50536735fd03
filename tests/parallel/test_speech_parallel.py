"""Proves SALM and BESTOW give TP=PP=1's loss and gradients at TP=2+SP, PP=2 and TP=2 x PP=2, the
auxiliary CTC loss on the first stage included."""

import pytest

from tests.conftest import REPO, launch
from tests.parallel import equivalence as eq

WORKER = REPO / "tests/parallel/speech_worker.py"

LAYOUTS = {
    "tp2-sp": (2, ["--tp", "2", "--sp"]),
    "pp2": (2, ["--pp", "2"]),
    "tp2-pp2": (4, ["--tp", "2", "--pp", "2"]),
}
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


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    dirs = {}
    for arch in PARTS:
        dirs[arch] = tmp_path_factory.mktemp(f"ref-{arch}")
        launch(WORKER, 1, "--workdir", str(dirs[arch]), "--reference", "--arch", arch)
    return dirs


@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", list(PARTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_speech_layout_matches_reference(arch, layout, references):
    nprocs, flags = LAYOUTS[layout]
    workdir = references[arch]
    launch(WORKER, nprocs, "--workdir", str(workdir), "--name", layout, "--arch", arch, *flags)
    eq.check_results(eq.read_results(workdir, layout), nprocs, PARTS[arch])
