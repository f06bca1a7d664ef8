"""A real single-node Slurm on this machine's loopback, for head nodes that are this machine too.

The lab's Slurm (:mod:`wqsupervisor.harness.slurm`) lives in a network
namespace; this one needs none: slurmctld and slurmd run here on private
ports, under a node name of their own, with their state in a private
directory, and the loopback head node's sshd sessions (this machine's PATH)
reach it with ``SLURM_CONF``. Jobs run as the submitting user. Needs root,
``slurm-wlm`` and ``munge``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from wqsupervisor.harness.slurm import slurm_conf, start_munge, stop_munge
from wqsupervisor.process import terminate

from support import free_port

NODE = "wqsloop"


class LoopbackSlurm:
    """slurmctld and slurmd on 127.0.0.1 (free ports), their files under ``root``."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self._daemons: list[subprocess.Popen[bytes]] = []
        self._munged: int | None = None

    @staticmethod
    def missing() -> str | None:
        """Why Slurm cannot run here (a program is missing, not root), or None."""
        if os.geteuid() != 0:
            return "Slurm's daemons need root"
        for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                return f"{tool} is not installed (apt-get install slurm-wlm munge)"
        return None

    @property
    def env(self) -> dict[str, str]:
        """This environment with ``SLURM_CONF`` set, for Slurm's clients here."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60.0) -> LoopbackSlurm:
        """Start munged (unless running), slurmctld and slurmd; return once the node is idle."""
        self._munged = start_munge()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = os.uname().nodename.split(".")[0]
        d = self.root
        ports = [f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}"]
        self.conf.write_text(
            slurm_conf(
                d, cluster="wqsloop", controller=f"{host}(127.0.0.1)", node=NODE, node_host=host,
                cpus=self.cpus, memory_mb=1000, extra=ports,
            )
        )  # fmt: skip
        os.chmod(self.root, 0o755)  # sshd sessions read slurm.conf from here
        os.chmod(self.conf, 0o644)
        for argv in (
            ["slurmctld", "-D", "-f", str(self.conf)],
            ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)],
        ):
            self._daemons.append(
                subprocess.Popen(
                    argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True, check=False
            )
            if res.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            if any(p.poll() is not None for p in self._daemons):
                break
            time.sleep(0.2)
        log = (
            (d / "log" / "slurmctld.log").read_text()[-400:] if (d / "log" / "slurmctld.log").exists() else ""
        )
        self.stop()
        raise RuntimeError(f"Slurm did not come up: {log}")

    def squeue(self) -> list[str]:
        """Jobs Slurm still holds (pending, running, completing, suspended), as "ID STATE"."""
        res = subprocess.run(
            ["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i %T"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        return [line for line in res.stdout.splitlines() if line.strip()]

    def finished(self) -> list[str]:
        """Ids of the jobs that have ended, from Slurm's job completion log."""
        log = self.root / "log" / "jobcomp.txt"
        text = log.read_text() if log.exists() else ""
        return re.findall(r"\bJobId=(\d+)", text)

    def stop(self) -> None:
        """Cancel every job, wait (bounded) for the queue to empty, stop the daemons and our munged."""
        if self._daemons:
            subprocess.run(["scancel", "--full", "--quiet"], env=self.env, capture_output=True, check=False)
            deadline = time.monotonic() + 20
            while self.squeue() and time.monotonic() < deadline:
                time.sleep(0.3)
            for proc in self._daemons:
                terminate(proc, grace=10)
            self._daemons = []
        stop_munge(self._munged)
        self._munged = None
