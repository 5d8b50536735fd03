"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd of this machine
(Debian's packages, installed with apt when absent and possible), with their own key, ports and
folders, started for the tests and stopped after. :func:`start` raises :class:`Unavailable` with
the reason when it cannot run here (no root, no packages, a daemon that does not come up)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}  # fmt: skip


class Unavailable(RuntimeError):
    """SLURM cannot run on this machine; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and apt-get cannot install it (needs root)")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(install, capture_output=True, env=env, timeout=300)
    if done.returncode != 0:  # an old package list: update once, then try again
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
        done = subprocess.run(install, capture_output=True, env=env, timeout=300)
    if done.returncode != 0 or not shutil.which("slurmctld"):
        raise Unavailable(f"apt-get could not install {' '.join(PACKAGES)}: {done.stderr[-500:]}")


class Cluster:
    """One node (``localhost``) and one partition (``debug``) with all of this machine's CPUs."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    # ------------------------------------------------------------------------------ daemons

    def _start_munge(self) -> None:
        folder = self.root / "munge"
        folder.mkdir(mode=0o755)
        key = folder / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True,
                       capture_output=True)  # fmt: skip
        shutil.chown(folder, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.socket = folder / "munge.socket"
        cmd = ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "-F",
               f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={folder / 'pid'}",
               f"--log-file={folder / 'log'}", f"--seed-file={folder / 'seed'}"]  # fmt: skip
        self._spawn(cmd, "munged")
        self._until(self.socket.exists, "munged did not create its socket", folder / "log")

    def _write_conf(self) -> None:
        cpus = os.cpu_count() or 1
        state = self.root / "state"
        spool = self.root / "spool"
        state.mkdir()
        spool.mkdir()
        settings = {
            "ClusterName": "salmtest", "SlurmctldHost": "localhost",
            "SlurmctldPort": _free_port(), "SlurmdPort": _free_port(),
            "SlurmUser": "root", "SlurmdUser": "root",
            "AuthType": "auth/munge", "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket}", "MpiDefault": "none", "MailProg": "/bin/true",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/builtin", "SchedulerParameters": "sched_interval=1",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none", "JobCompType": "jobcomp/none",
            "ReturnToService": 2, "StateSaveLocation": state, "SlurmdSpoolDir": spool,
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "slurmctld.log",
            "SlurmdLogFile": self.root / "slurmd.log",
            "KillWait": 5, "MinJobAge": 300,
        }  # fmt: skip
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines += [
            f"NodeName=localhost CPUs={cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (kept open while it runs)
        self.processes.append(
            subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

    def _until(self, ready, what: str, log: Path, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.2)
        text = log.read_text()[-1500:] if log.exists() else ""
        raise Unavailable(f"{what}: {text}")

    def start(self) -> Cluster:
        self._start_munge()
        self._write_conf()
        self._spawn(["slurmctld", "-D", "-i"], "slurmctld")
        self._spawn(["slurmd", "-D", "-N", "localhost"], "slurmd")
        self._until(lambda: self.node_state() == "idle", "the node did not become idle",
                    self.root / "slurmd.log")  # fmt: skip
        return self

    def stop(self) -> None:
        if os.environ.get("SALM_KEEP_SLURM"):  # to read its logs after a failure
            return
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    # --------------------------------------------------------------------------------- jobs

    def command(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def node_state(self) -> str:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip()

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        """Submit (from ``cwd``); the job id."""
        done = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.command("scontrol", "show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, until=None, timeout: float = 150.0) -> dict[str, str]:
        """Poll until the job ends (or ``until(job)`` holds); its last ``scontrol`` record."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if until(job) if until else job["JobState"] in TERMINAL:
                return job
            time.sleep(0.25)
        self.command("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")


def start() -> Cluster:
    """Install when needed, then start a cluster in a fresh folder (readable by user munge)."""
    if os.geteuid() != 0:
        raise Unavailable("the test cluster's daemons run as root")
    _install()
    root = Path(tempfile.mkdtemp(prefix="salm-slurm-"))
    root.chmod(0o755)
    cluster = Cluster(root)
    try:
        return cluster.start()
    except (Unavailable, OSError, subprocess.SubprocessError) as err:
        cluster.stop()
        raise Unavailable(f"SLURM did not start here: {err}") from err
