"""Proves SALM and BESTOW give TP=PP=1's loss, logits and gradients at TP=2+SP, PP=2, TP=2 x PP=2,
PP=2 x VPP=2, PP=4 (SALM) and context parallelism (CP=2, CP=2 x TP=2+SP), the auxiliary CTC loss
on the first stage included; and that packed rows give the padded batch's loss and gradients at
TP=1 and every layout without CP. On a Qwen3-style LLM (query/key norms, which finalize_model_grads
sums over TP once, also under SP) SALM at TP=2+SP and PP=2; on tiny-moe (Qwen3-MoE) SALM at EP=2
(DP=2 ranks sharing the batch, tokens sent to the other rank's experts), EP=2 x TP=2+SP and PP=4,
BESTOW at EP=2, the load-balancing loss's gradient included (each expert's gradient compared on
the EP rank that holds it)."""

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
    "ep2": (2, ["--ep", "2"]),  # MoE only
    "ep2-tp2-sp": (4, ["--ep", "2", "--tp", "2", "--sp"]),  # MoE only
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
CASES = [(arch, layout) for arch in PARTS for layout in LAYOUTS if not layout.startswith("ep")]
CASES.remove(("bestow", "cp2-tp2-sp"))  # BESTOW at CP=2 alone: its block runs before the cut
CASES.remove(("bestow", "pp4"))  # stages without the first or last layer hold no BESTOW part
# Other LLMs (speech_worker.LLMS), a few layouts each: what each adds to the tiny Llama's.
LLM_PARTS = {
    "qwen3": ("self_attention.q_layernorm", "self_attention.k_layernorm"),
    "moe": ("self_attention.q_layernorm", "mlp.router", "mlp.experts.local_experts"),
}
LLM_CASES = [
    ("salm", "qwen3", "tp2-sp"),
    ("salm", "qwen3", "pp2"),
    ("salm", "moe", "ep2"),
    ("salm", "moe", "ep2-tp2-sp"),
    ("salm", "moe", "pp4"),  # two stages read no samples: the data path shares answer tokens
    ("bestow", "moe", "ep2"),
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The reference run of (arch, llm), made when a test first needs it."""
    dirs = {}

    def reference(arch: str, llm: str = "tiny"):
        if (arch, llm) not in dirs:
            workdir = dirs[arch, llm] = tmp_path_factory.mktemp(f"ref-{arch}-{llm}")
            launch(WORKER, 1, "--workdir", str(workdir), "--reference", "--arch", arch,
                   "--llm", llm)  # fmt: skip
        return dirs[arch, llm]

    return reference


@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", list(PARTS))
def test_packed_rows_match_padded_batch(arch, references):
    """TP=PP=1: the reference process runs both passes."""
    eq.check_results(eq.read_results(references(arch), "tp1"), 1, PARTS[arch], prefix="packed_")


@pytest.mark.multiprocess
@pytest.mark.parametrize(("arch", "layout"), CASES)
def test_speech_layout_matches_reference(arch, layout, references):
    nprocs, flags = LAYOUTS[layout]
    workdir = references(arch)
    launch(WORKER, nprocs, "--workdir", str(workdir), "--name", layout, "--arch", arch, *flags)
    results = eq.read_results(workdir, layout)
    eq.check_results(results, nprocs, PARTS[arch])
    assert any("logits" in r for r in results), "no rank compared logits"
    if layout in PACKED:
        eq.check_results(results, nprocs, PARTS[arch], prefix="packed_")


@pytest.mark.multiprocess
@pytest.mark.parametrize(("arch", "llm", "layout"), LLM_CASES)
def test_qwen3_and_moe_layouts_match_reference(arch, llm, layout, references):
    """Padded micro-batches only for MoE: packed rows are other micro-batches, with another
    load-balancing loss (speech_worker.py)."""
    nprocs, flags = LAYOUTS[layout]
    workdir = references(arch, llm)
    launch(WORKER, nprocs, "--workdir", str(workdir), "--name", layout, "--arch", arch,
           "--llm", llm, *flags)  # fmt: skip
    results = eq.read_results(workdir, layout)
    parts = PARTS[arch] + LLM_PARTS[llm]
    eq.check_results(results, nprocs, parts)
    assert any("logits" in r for r in results), "no rank compared logits"
    if llm != "moe" and layout in PACKED:
        eq.check_results(results, nprocs, parts, prefix="packed_")
