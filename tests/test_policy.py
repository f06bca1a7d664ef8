"""The scaling policy as exact tables, with time passed in."""

from __future__ import annotations

import pytest

from wqsupervisor.policy import Decision, Observation, PolicyState, ScalingSettings, decide, demand

S = ScalingSettings(
    min_workers=0,
    max_workers=4,
    tasks_per_worker=2,
    max_pending=3,
    max_per_cycle=2,
    cooldown=10.0,
    idle_time=60.0,
)


def obs(now, waiting=0, on_workers=0, connected=0, pending=(), running=0, up=True):
    return Observation(
        now=now,
        tunnel_up=up,
        tasks_waiting=waiting,
        tasks_on_workers=on_workers,
        workers_connected=connected,
        pending_jobs=tuple(pending),
        running_jobs=running,
    )


def run(steps, settings=S):
    """Feed observations in order; return (submit, cancel) per step."""
    state = PolicyState()
    out = []
    for o in steps:
        state, d = decide(settings, state, o)
        out.append((d.submit, d.cancel))
    return out


@pytest.mark.parametrize(
    ("waiting", "on_workers", "expected"),
    [
        (0, 0, 0),
        (1, 0, 1),
        (2, 0, 1),
        (3, 0, 2),
        (4, 3, 4),
        (200, 0, 4),
    ],
)
def test_demand_is_the_backlog_per_worker_within_the_limits(waiting, on_workers, expected):
    """Demand rounds the backlog up to whole workers and stops at max_workers."""
    assert demand(S, obs(0, waiting, on_workers)) == expected


def test_min_workers_is_a_floor_even_without_work():
    """With min_workers, workers are kept even when there is nothing to do."""
    settings = ScalingSettings(min_workers=2, max_workers=4, max_per_cycle=4)
    assert run([obs(0)], settings) == [(2, ())]


def test_a_backlog_is_met_at_the_pace_the_limits_allow():
    """200 tasks: 2 per cycle, cooldown between, never more than max_pending on their way or max_workers."""
    assert run(
        [
            obs(0, waiting=200),  # submit 2
            obs(5, waiting=200, pending=("a", "b")),  # cooling down
            obs(10, waiting=200, pending=("a", "b")),  # 1 more: max_pending 3
            obs(20, waiting=200, pending=("a", "b", "c")),  # 3 on their way: nothing
            obs(30, waiting=196, on_workers=4, connected=2, pending=("c",), running=2),  # supply 3: 1 more
            obs(40, waiting=192, on_workers=8, connected=4),  # at max_workers
        ]
    ) == [(2, ()), (0, ()), (1, ()), (0, ()), (1, ()), (0, ())]


def test_nothing_is_submitted_while_the_tunnel_is_down_and_it_resumes_after():
    """Tunnel down: no submission, whatever the backlog; up again: submissions resume."""
    assert run(
        [
            obs(0, waiting=50, up=False),
            obs(100, waiting=50, up=False),
            obs(200, waiting=50, up=True),
        ]
    ) == [(0, ()), (0, ()), (2, ())]


def test_workers_that_joined_on_their_own_are_counted():
    """Three workers started by hand cover a demand of three: nothing is submitted."""
    assert run([obs(0, waiting=6, connected=3)]) == [(0, ())]


def test_started_jobs_count_until_their_worker_connects():
    """A running job whose worker has not connected yet is still on its way."""
    assert run([obs(0, waiting=8, connected=1, running=3)]) == [(1, ())]


def test_scale_in_waits_for_the_idle_time_and_withdraws_only_queued_jobs():
    """Hysteresis: pending jobs are withdrawn only after idle_time of surplus, newest first."""
    assert run(
        [
            obs(0, waiting=0, connected=2, pending=("old", "new")),
            obs(30, waiting=0, connected=2, pending=("old", "new")),
            obs(59, waiting=0, connected=2, pending=("old", "new")),
            obs(60, waiting=0, connected=2, pending=("old", "new")),
        ]
    ) == [(0, ()), (0, ()), (0, ()), (0, ("old", "new"))]


def test_a_new_backlog_resets_the_scale_in_clock():
    """A burst in the middle of a quiet spell restarts the idle countdown."""
    steps = [
        obs(0, connected=2, pending=("p",)),
        obs(50, waiting=8, connected=2, pending=("p",)),  # demand 4 > supply 3: no surplus
        obs(60, connected=2, pending=("p",)),  # surplus again, counted from 60
        obs(110, connected=2, pending=("p",)),
        obs(120, connected=2, pending=("p",)),
    ]
    out = run(steps, ScalingSettings(max_workers=4, max_per_cycle=2, cooldown=1000, idle_time=60))
    assert out == [(0, ()), (1, ()), (0, ()), (0, ()), (0, ("p",))]


def test_connected_idle_workers_are_never_cancelled():
    """With no queued job to withdraw, scale-in does nothing: idle workers leave on their own timeout."""
    assert run([obs(0, connected=4), obs(1000, connected=4)]) == [(0, ()), (0, ())]


def test_decisions_say_why():
    """Every decision carries a reason a person can read."""
    _, d = decide(S, PolicyState(), obs(0, waiting=5, up=False))
    assert d == Decision(why="the tunnel is not up: no submission")


def test_nonsense_limits_are_refused():
    """min above max, zero per-cycle and negative times are errors."""
    for bad in ({"min_workers": 5, "max_workers": 2}, {"max_per_cycle": 0}, {"cooldown": -1}):
        with pytest.raises(ValueError):
            ScalingSettings(**bad)
