"""Shared by the parallel-equivalence workers and their tests.

The reference run (one process, TP=PP=1) writes the model's weights and, after one
forward/backward, its gradients as Megatron dist checkpoints: gradients are saved by copying each
``main_grad`` into its parameter. A parallel layout loads both through ``dist_checkpointing``,
which reshards them to its own TP/PP split, so every local gradient has a reference to match (an
expert-parallel rank's local experts are saved and loaded at their global expert indices, so
they meet the reference's gradients of the same experts).
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from salm_megatron.config import ParallelConfig

TOL = 1e-5


def layout_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--name", default="layout", help="names this layout's result files")
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1, help="expert parallel (MoE LLMs)")
    ap.add_argument("--etp", type=int, default=None, help="expert tensor parallel (MoE LLMs)")
    return ap


def parallel_config(args) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        sequence_parallel=args.sp,
        context_parallel_size=args.cp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp,
    )


def save(chunks, ckpt_dir: Path) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    dist_checkpointing.save(sharded, str(ckpt_dir))


def load(chunks, ckpt_dir: Path) -> list[dict]:
    """Megatron dist-checkpoint load of every chunk, resharded to this layout."""
    sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    return [state[f"model{i}"] for i in range(len(chunks))]


def load_reference(chunks, workdir: Path) -> list[dict]:
    """Load the reference weights into ``chunks``; return the reference gradients per chunk."""
    grads = [
        {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        for sd in load(chunks, workdir / "grads")
    ]
    for chunk, sd in zip(chunks, load(chunks, workdir / "weights"), strict=True):
        chunk.load_state_dict(sd)
    return grads


def wrap_ddp(chunks) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False)
    return [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(chunks)
    ]


def save_grads(chunks, workdir: Path) -> None:
    """Gradients as a checkpoint of the model's own layout (ends the model's use)."""
    for chunk in chunks:
        for p in chunk.parameters():
            if p.requires_grad:
                p.data.copy_(p.main_grad)
    save(chunks, workdir / "grads")


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """``|actual - expected| / max(|expected|, floor)``."""
    diff = (actual.float() - expected.float()).norm()
    return (diff / expected.float().norm().clamp_min(floor)).item()


def grad_errors(chunks, reference_grads) -> dict[str, float]:
    """:func:`compare_grads` of every chunk's trainable parameters' ``main_grad``."""
    actual = [
        {name: p.main_grad for name, p in chunk.named_parameters() if p.requires_grad}
        for chunk in chunks
    ]
    return compare_grads(actual, reference_grads)


def compare_grads(actual: list[dict], reference: list[dict]) -> dict[str, float]:
    """Relative error of every gradient (per chunk: name -> tensor), against at least 1% of the
    whole chunk's reference gradient: with TOL that is rtol 1e-5 plus an atol of 1e-7 of the
    total, like ``torch.testing.assert_close``. Gradients that are zero up to rounding (an
    attention key bias, which softmax cancels; a conv bias before BatchNorm) are then not failed
    for noise."""
    errors = {}
    for i, (grads, ref) in enumerate(zip(actual, reference, strict=True)):
        scale = torch.stack([ref[name].float().norm() for name in grads]).norm()
        for name, grad in grads.items():
            errors[f"chunk{i}.{name}"] = rel_err(grad, ref[name], floor=1e-2 * scale)
    return errors


def write_result(workdir: Path, name: str, rank: int, result: dict) -> None:
    (workdir / f"result-{name}-rank{rank}.json").write_text(json.dumps(result, indent=1))


def read_results(workdir: Path, name: str) -> list[dict]:
    files = sorted(glob.glob(f"{workdir}/result-{name}-rank*.json"))
    return [json.loads(Path(f).read_text()) for f in files]


def check_results(
    results: list[dict], nprocs: int, parts: tuple[str, ...], prefix: str = ""
) -> None:
    """Every rank reported; losses, logits and gradients within TOL; every part's gradient
    compared. ``prefix`` picks one pass of the results (``packed_``: the packed pass)."""
    assert len(results) == nprocs, f"{len(results)} of {nprocs} ranks reported"
    with_loss = [r for r in results if f"{prefix}loss" in r]
    assert with_loss, f"no rank reported a {prefix}loss"
    for r in results:
        for key in (f"{prefix}logits", f"{prefix}loss"):
            if key in r:
                assert r[key] < TOL, f"rank {r['rank']}: {key} rel. error {r[key]:.2e}"
        grads = r[f"{prefix}grads"]
        assert grads, f"rank {r['rank']} compared no {prefix}gradients"
        for name, err in grads.items():
            assert err < TOL, f"rank {r['rank']}: {prefix}gradient of {name} rel. error {err:.2e}"
    compared = [name for r in results for name in r[f"{prefix}grads"]]
    for part in parts:
        assert any(part in name for name in compared), f"no gradient of {part} was compared"
