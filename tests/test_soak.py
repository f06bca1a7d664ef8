"""The soak, short: two minutes of random lab faults while tasks flow; nothing may be lost."""

from __future__ import annotations

import os

import pytest

from wqsupervisor.harness.bench import soak

pytestmark = [pytest.mark.lab, pytest.mark.soak]


def test_two_minutes_of_random_faults_lose_nothing():
    """Random faults every 20 s for 2 minutes: every task exactly once, every fault recovered."""
    if os.geteuid() != 0:
        pytest.fail("the soak needs root (it builds the firewall lab); CI runs as root")
    result = soak.run(minutes=2.0, every=20.0, seed=int(os.environ.get("WQS_SOAK_SEED", "7")))
    assert result["faults"] >= 3
    assert (result["lost"], result["duplicated"], result["wrong_output"]) == (0, 0, 0)
    assert all(f["forward_back_s"] is not None for f in result["raw"]), result["raw"]
