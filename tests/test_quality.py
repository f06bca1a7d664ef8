"""The code itself: ruff clean and mypy --strict clean, as STYLE.md asks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import REPO


@pytest.mark.parametrize(
    "tool",
    [
        ["ruff", "check", "wqsupervisor", "tests", "benchmarks", "examples"],
        ["ruff", "format", "--check", "wqsupervisor", "tests", "benchmarks", "examples"],
        ["mypy"],
    ],
)
def test_static_checks_pass(tool):
    """ruff (lint and format) and mypy --strict report nothing."""
    res = subprocess.run([sys.executable, "-m", *tool], cwd=REPO, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
