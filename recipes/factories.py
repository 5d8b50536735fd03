"""NeMo-Run recipe factories: ``run.Partial`` of ``salm_megatron.train.run`` with a complete
config, and ``run.Script`` of ``salm eval``.

The config becomes a tree of ``run.Config`` nodes, one per section, so any field can be changed
before launching (``recipe.config.train.steps = 10``); the worker builds and validates it again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import nemo_run as run

from salm_megatron.config import Config
from salm_megatron.train import run as train_entry

from . import configs


def as_run_config(value: Any) -> Any:
    """A dataclass (recursively) as ``run.Config`` with every field set; other values as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: as_run_config(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return run.Config(type(value), **fields)
    if isinstance(value, (list, tuple)):
        return type(value)(as_run_config(item) for item in value)
    return value


def training(config: Config) -> run.Partial:
    """Train ``config`` in every process of the job."""
    return run.Partial(train_entry, config=as_run_config(config))


def salm_tiny() -> run.Partial:
    return training(configs.salm_tiny())


def salm_llama3_2_1b() -> run.Partial:
    return training(configs.salm_llama3_2_1b())


def salm_llama3_8b() -> run.Partial:
    return training(configs.salm_llama3_8b())


def bestow_llama3_8b() -> run.Partial:
    return training(configs.bestow_llama3_8b())


def salm_llama3_70b() -> run.Partial:
    return training(configs.salm_llama3_70b())


def salm_qwen3_30b_a3b() -> run.Partial:
    return training(configs.salm_qwen3_30b_a3b())


def salm_eval(
    checkpoint: str,
    data: str | list[str],
    out: str,
    tensor_parallel: int | None = None,
    limit: int | None = None,
    args: tuple[str, ...] = (),
) -> run.Script:
    """``salm eval`` in every process of the job: TP groups of ``tensor_parallel`` ranks (all
    of them when unset) decode and split the samples. Decoding runs without pipeline stages: a
    70B model needs ``tensor_parallel=8`` (141 GB of bf16 weights, 17.6 GB per GPU); 8B and
    smaller fit one GPU (``tensor_parallel=1``: every GPU decodes its own share). ``args``:
    more flags of ``salm eval`` (``--strategy beam``, ``--set decode.batch_size=16``)."""
    shards = [data] if isinstance(data, str) else list(data)
    argv = ["eval", "--checkpoint", checkpoint, "--data", *shards, "--out", out]
    if tensor_parallel is not None:
        argv += ["--tensor-parallel", str(tensor_parallel)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return run.Script(path="salm_megatron.cli", args=[*argv, *args], m=True, entrypoint="python")
