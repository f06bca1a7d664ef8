"""What the lab, the demo and the benchmarks share: where the package lives, a checked command,
a master's status asked over the wire, and how figures and the machine are described."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import WQSupervisorError

# The directory that holds the wqsupervisor package: children started with
# `python -m wqsupervisor.harness...` get it on their PYTHONPATH.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to its end; with ``check``, a failure raises with the command's stderr."""
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise WQSupervisorError(f"lab command failed: {' '.join(argv)}: {res.stderr.strip()}")
    return res


def queue_status(port: int, timeout: float = 0.5) -> dict[str, Any] | None:
    """The status of whatever master answers on 127.0.0.1:port, or None.

    Asked with ``resources_status``, which Work Queue masters and TaskVine
    managers both answer (see :mod:`wqsupervisor.kinds`).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"resources_status\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        reply = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return reply[0] if isinstance(reply, list) and reply else None


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max and count of a list of figures."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def version(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The first line a program prints for its version (``argv``), or "missing"."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False, env=env)
    except OSError:
        return "missing"
    return (res.stdout + res.stderr).strip().splitlines()[0] if (res.stdout + res.stderr).strip() else ""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "openssh": version(["ssh", "-V"]),
        "cctools": version(["work_queue_worker", "--version"]),
        "wqsupervisor": __version__,
    }


def save(result: dict[str, Any], out: str | Path, name: str) -> Path:
    """Write ``result`` as indented JSON to ``out/name`` (``out`` is created if missing)."""
    folder = Path(out)
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(result, indent=2))
    return path
