"""Where a recipe runs: this machine (torchrun) or a SLURM cluster, chosen by name.

Training on SLURM starts one task per GPU with ``srun`` and no torchrun: ``salm_megatron.train.run``
takes rank and world from SLURM's variables, and ``--signal=USR1@120`` reaches every rank, which
saves a checkpoint and exits with 75; ``retries`` requeues the job that many times (any failure
counts), and the requeued job resumes from the checkpoint. Evaluation uses torchrun per node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import nemo_run as run

# Every task's environment: one thread per process for CPU ops; and kernels launched in issue
# order, which Megatron's overlap of TP/SP communication with compute relies on (it warns without).
TASK_ENV = {"OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def local(ntasks_per_node: int = 1, env: Optional[dict[str, str]] = None) -> run.LocalExecutor:
    """``ntasks_per_node`` processes under torchrun here: one per GPU, or CPU processes over gloo
    where there is no GPU."""
    bin_dir = str(Path(sys.executable).parent)  # torchrun next to this interpreter
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    env_vars = {"PATH": path, **TASK_ENV, **(env or {})}
    return run.LocalExecutor(
        ntasks_per_node=ntasks_per_node, launcher="torchrun", env_vars=env_vars
    )


def slurm(
    account: Optional[str] = None,
    partition: Optional[str] = None,
    nodes: int = 1,
    gpus_per_node: int = 8,
    ntasks_per_node: Optional[int] = None,
    time: str = "04:00:00",
    container_image: Optional[str] = None,
    container_mounts: Optional[list[str]] = None,
    env: Optional[dict[str, str]] = None,
    job_dir: Optional[str] = None,
    host: Optional[str] = None,
    user: Optional[str] = None,
    retries: int = 3,
    torchrun: bool = False,
) -> run.SlurmExecutor:
    """A SLURM job of ``nodes`` x ``gpus_per_node`` (``ntasks_per_node`` tasks per node, one per
    GPU unless set; GPUs 0 on a CPU cluster), submitted with ``sbatch`` here or, with ``host``,
    over SSH. ``container_image`` and ``container_mounts`` go to pyxis; without an image the
    nodes need the project installed. Job scripts and logs go to NeMo-Run's experiment folder
    (``$NEMORUN_HOME``, ~/.nemo_run, which the nodes must see), or over SSH to ``job_dir`` on
    ``host``."""
    home = run.config.get_nemorun_home()
    if "/nemo_run" in home.replace("\\", "/"):  # NeMo-Run 0.11.1 rewrites that in sbatch scripts
        raise ValueError(
            f"NEMORUN_HOME={home} contains '/nemo_run', which NeMo-Run replaces in its sbatch "
            "scripts (its in-container run folder): choose another folder name"
        )
    if host:
        if not job_dir:
            raise ValueError(f"executor.host={host!r} needs executor.job_dir (a folder there)")
        tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir or "")  # "": NeMo-Run's experiment folder
    executor = run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        ntasks_per_node=ntasks_per_node or max(gpus_per_node, 1),
        gpus_per_node=gpus_per_node or None,
        time=time,
        container_image=container_image,
        container_mounts=list(container_mounts or []),
        env_vars={**TASK_ENV, **(env or {})},
        job_name_prefix="salm.",  # NeMo-Run would derive it from the account, which may be unset
        signal="USR1@120",  # every task: save and exit 75 two minutes before the time limit
        tunnel=tunnel,
        packager=run.Packager(),  # the code is installed on the nodes or in the image
        launcher="torchrun" if torchrun else None,
    )
    executor.retries = retries
    return executor


EXECUTORS = {"local": local, "slurm": slurm}
