"""When the tunnel moves to another head node, and to which: exact tables (no clock, no network)."""

from __future__ import annotations

import pytest

from wqsupervisor.heads import Heads, Move
from wqsupervisor.session import SessionFailure

REFUSED = SessionFailure.refused("login1", "Connection refused")
UNREACHABLE = SessionFailure.network("login1", "No route to host")
UNKNOWN = SessionFailure.unresolved("login1", "Name or service not known")
# A port taken after the tunnel was up once is retried (before, it is final: see test_tunnel).
TAKEN = SessionFailure.port_taken("login1", 10001).once_up()
TAKEN_AT_START = SessionFailure.port_taken("login1", 10001)
AUTH = SessionFailure.auth("login1", "Permission denied (publickey)")


@pytest.mark.parametrize(
    ("heads", "attempts", "moves", "current"),
    [
        # One head: nowhere to go, whatever happens.
        (Heads(1), [(False, REFUSED)] * 3, [None] * 3, 0),
        # Unreachable (refused, no route, unknown name): move at once.
        (Heads(2), [(False, REFUSED)], [1], 1),
        (Heads(2), [(False, UNREACHABLE)], [1], 1),
        (Heads(2), [(False, UNKNOWN)], [1], 1),
        # Reachable but no forward (the port held there): the second miss in a row moves.
        (Heads(2), [(False, TAKEN), (False, TAKEN)], [None, 1], 1),
        # A session that came up in between starts the count again.
        (Heads(2), [(False, TAKEN), (True, None), (False, TAKEN)], [None, None, None], 0),
        # Held by someone else from the start: not ours to wait for, the next head may be free.
        (Heads(2), [(False, TAKEN_AT_START)], [1], 1),
        # An attempt that ended with no failure of its own counts as a miss.
        (Heads(2), [(False, None), (False, None)], [None, 1], 1),
        # Three heads wrap around: from the last back to the first.
        (Heads(3, current=2), [(False, REFUSED)], [0], 0),
        (Heads(3), [(False, REFUSED), (False, REFUSED), (False, REFUSED)], [1, 2, 0], 0),
        # A failure waiting will not fix moves on, and that head is not tried again...
        (Heads(3), [(False, AUTH), (False, REFUSED), (False, REFUSED)], [1, 2, 1], 1),
        # ...and when every head refused for good, it stays (the restart policy gives up).
        (Heads(2), [(False, AUTH), (False, AUTH)], [1, None], 1),
    ],
)
def test_where_the_tunnel_goes_after_each_attempt(heads, attempts, moves, current):
    """Each attempt's outcome, the move it makes (the index of the next head, or None), and where it ends."""
    made = []
    for came_up, failure in attempts:
        heads, move = heads.after_attempt(came_up, failure)
        made.append(move.to if isinstance(move, Move) else None)
    assert made == moves
    assert heads.current == current


def test_each_other_head_is_tried_at_once_then_moves_wait_their_turn():
    """Every head refuses (sshd down everywhere): one round at once, then paced by the backoff."""
    heads = Heads(3)
    paced = []
    for _ in range(7):
        heads, move = heads.after_attempt(False, REFUSED)
        assert move is not None
        paced.append(move.at_once)
    assert paced == [True, True, False, False, False, False, False]
    heads, move = heads.after_attempt(True, None)  # up again somewhere: the next trouble starts afresh
    heads, move = heads.after_attempt(False, REFUSED)
    assert move is not None and move.at_once


@pytest.mark.parametrize(
    ("last_up", "moves", "stays_on"),
    [
        # Up on the first head, then no head can be reached over the network: the others are
        # tried at once, then it goes back to the first (after the restart delay) and waits there.
        (0, [(1, True), (2, True), (0, False), None, None], 0),
        # Up on the second: back to the second, where the compute nodes' hops still are.
        (1, [(2, True), (0, True), (1, False), None, None], 1),
    ],
)
def test_with_every_head_out_of_reach_it_waits_on_the_head_it_was_last_up_on(last_up, moves, stays_on):
    """Timeouts and no route on every head (the campus side cut off): no endless round between heads."""
    heads, _ = Heads(3, current=last_up).after_attempt(True, None)
    made = []
    for _ in moves:
        heads, move = heads.after_attempt(False, UNREACHABLE)
        made.append((move.to, move.at_once) if move else None)
    assert made == moves
    assert heads.current == stays_on
    # A head that refuses (reachable, its sshd down) still sends the tunnel on (after the delay now).
    heads, move = heads.after_attempt(False, REFUSED)
    assert move is not None and move.to != stays_on and not move.at_once


def test_a_move_says_why():
    """The reason names the failure, or how many attempts did not come up."""
    _, move = Heads(2).after_attempt(False, REFUSED)
    assert move is not None and move.why == REFUSED.message
    heads, _ = Heads(2).after_attempt(False, TAKEN)
    _, move = heads.after_attempt(False, TAKEN)
    assert move is not None and move.why == f"2 attempts in a row did not come up: {TAKEN.message}"
    _, move = Heads(2).after_attempt(False, AUTH)
    assert move is not None and move.why == f"{AUTH.message} (it will not change by waiting)"
