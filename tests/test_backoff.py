"""The restart decision, as exact tables: no sleeping, no clock."""

from __future__ import annotations

import pytest

from wqsupervisor.backoff import Backoff, GiveUp, RestartPolicy, RestartState, Retry

B = Backoff(initial=0.5, factor=2.0, cap=20.0, jitter=0.5)


@pytest.mark.parametrize(
    ("level", "rand", "delay"),
    [
        (0, 0.0, 0.0),
        (0, 0.99, 0.0),
        (1, 0.0, 0.25),
        (1, 0.5, 0.375),
        (1, 1.0, 0.5),
        (2, 0.0, 0.5),
        (3, 1.0, 2.0),
        (6, 1.0, 16.0),
        (7, 0.0, 10.0),
        (7, 1.0, 20.0),
        (40, 1.0, 20.0),
        (10_000, 0.5, 15.0),
    ],
)
def test_backoff_delays(level, rand, delay):
    """Each rung of the ladder: immediate at 0, doubling from 0.5 s, capped at 20 s, half jittered."""
    assert B.delay(level, rand) == pytest.approx(delay)


def test_backoff_rejects_nonsense():
    """Negative delays, shrinking factors and jitter outside [0, 1] are refused."""
    for bad in ({"initial": -1}, {"factor": 0.5}, {"jitter": 1.5}, {"cap": -2}):
        with pytest.raises(ValueError):
            Backoff(**bad)


P = RestartPolicy(backoff=B, start_attempts=3, stable_after=5.0)


def _run(steps):
    state = RestartState()
    out = []
    for up_for, permanent, rand in steps:
        state, decision = state.after_attempt(P, up_for=up_for, permanent=permanent, rand=rand)
        out.append((state.level, state.attempts, state.ever_up, decision))
    return out


def test_drop_after_a_stable_session_restarts_at_once():
    """A session up for longer than stable_after is restarted immediately, every time."""
    assert _run([(60.0, None, 0.7), (5.0, None, 0.7), (3600.0, None, 0.1)]) == [
        (0, 0, True, Retry(0.0, 0)),
        (0, 0, True, Retry(0.0, 0)),
        (0, 0, True, Retry(0.0, 0)),
    ]


def test_flapping_sessions_climb_the_ladder_and_a_stable_one_resets_it():
    """Short sessions back off further each time; one stable session brings the delay back to zero."""
    assert _run(
        [(1.0, None, 1.0), (1.0, None, 1.0), (0.2, None, 0.0), (4.9, None, 1.0), (5.0, None, 1.0)]
    ) == [
        (1, 0, True, Retry(0.5, 1)),
        (2, 0, True, Retry(1.0, 2)),
        (3, 0, True, Retry(1.0, 3)),
        (4, 0, True, Retry(4.0, 4)),
        (0, 0, True, Retry(0.0, 0)),
    ]


def test_a_tunnel_that_never_came_up_gives_up_after_start_attempts():
    """Bounded start: failures before the first success stop after start_attempts."""
    out = _run([(None, None, 0.0), (None, None, 0.0), (None, None, 0.0)])
    assert out[0] == (1, 1, False, Retry(0.25, 1))
    assert out[1] == (2, 2, False, Retry(0.5, 2))
    assert out[2][:3] == (3, 3, False)
    assert out[2][3] == GiveUp("gave up after 3 attempts")


def test_failures_that_clear_by_themselves_climb_the_ladder_but_use_no_start_attempt():
    """A head relay still serving a gone supervisor: backed off as usual, never given up on for it."""
    state, out = RestartState(), []
    for waits in (True, True, True, True, False, False, False):
        state, decision = state.after_attempt(P, up_for=None, permanent=None, rand=0.0, waits=waits)
        out.append((state.level, state.attempts, decision))
    assert out == [
        (1, 0, Retry(0.25, 1)),
        (2, 0, Retry(0.5, 2)),
        (3, 0, Retry(1.0, 3)),
        (4, 0, Retry(2.0, 4)),
        (5, 1, Retry(4.0, 5)),
        (6, 2, Retry(8.0, 6)),
        (7, 3, GiveUp("gave up after 3 attempts")),
    ]


def test_once_up_a_tunnel_retries_for_as_long_as_it_takes():
    """After it has been up, failed restarts never exhaust the tunnel, and the delay stays capped."""
    steps = [(30.0, None, 1.0)] + [(None, None, 1.0)] * 50
    out = _run(steps)
    assert all(isinstance(d, Retry) for *_, d in out)
    assert out[-1][3].delay == 20.0
    assert out[-1][1] == 50


def test_permanent_failures_are_never_retried():
    """Authentication and host-key failures give up at once, even on a tunnel that was up."""
    assert _run([(None, "Permission denied", 0.5)]) == [(0, 0, False, GiveUp("Permission denied"))]
    assert _run([(30.0, None, 0.5), (None, "host key changed", 0.5)])[1][3] == GiveUp("host key changed")


def test_no_start_bound_means_retry_forever():
    """start_attempts=0 lifts the bound for a tunnel that has never been up."""
    policy = RestartPolicy(backoff=B, start_attempts=0)
    state = RestartState()
    for _ in range(100):
        state, decision = state.after_attempt(policy, up_for=None, permanent=None, rand=0.0)
        assert isinstance(decision, Retry)


def test_the_path_coming_back_restarts_from_the_bottom_rung():
    """wake_early keeps the attempt count but drops the delay to zero."""
    state = RestartState(level=6, attempts=4, ever_up=True).wake_early()
    assert state == RestartState(level=0, attempts=4, ever_up=True)
    _, decision = state.after_attempt(P, up_for=None, permanent=None, rand=0.0)
    assert decision == Retry(0.25, 1)
