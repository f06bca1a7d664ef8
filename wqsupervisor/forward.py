"""Proving the forward: what a probe through the head node's remote port found."""

from __future__ import annotations

import enum


class ForwardCheck(enum.Enum):
    """What one probe through the head node's remote port found."""

    REACHED = "reached"  # this master answered through the remote port
    HELD = "held"  # the connection stayed open without an answer: the master is busy
    LOST = "lost"  # the master answers here but not through the head node
    REFUSED = "refused"  # the remote port closed the connection at once
    WRONG = "wrong"  # a different master answered
