"""When to restart a tunnel, and when to stop trying.

Pure decisions: (state, what happened, a random draw) -> (new state, decision).
Nothing here sleeps or reads a clock, so the whole policy is tested as tables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# The ladder stops growing here; the cap makes higher rungs equal anyway.
_MAX_LEVEL = 32


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter".

    Level 0 means "at once". Level ``n >= 1`` waits
    ``min(cap, initial * factor ** (n - 1))``, of which the last ``jitter``
    fraction is drawn at random so that many supervisors do not restart in step.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 20.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial < 0 or self.cap < 0:
            raise ValueError("backoff delays must not be negative")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be between 0 and 1")

    def ceiling(self, level: int) -> float:
        """The delay at ``level`` before jitter."""
        if level <= 0:
            return 0.0
        return min(self.cap, self.initial * self.factor ** (min(level, _MAX_LEVEL) - 1))

    def delay(self, level: int, rand: float) -> float:
        """The jittered delay at ``level`` for a uniform draw ``rand`` in [0, 1)."""
        top = self.ceiling(level)
        return top * (1.0 - self.jitter) + top * self.jitter * rand


@dataclass(frozen=True)
class Retry:
    """Restart after ``delay`` seconds."""

    delay: float
    level: int


@dataclass(frozen=True)
class GiveUp:
    """Stop restarting; ``reason`` says why, for a person."""

    reason: str


Decision = Retry | GiveUp


@dataclass(frozen=True)
class RestartPolicy:
    """Settings of the restart decision.

    ``start_attempts`` bounds the attempts of a tunnel that has never been up
    (0: no bound), so a wrong host or port fails fast instead of looping; once a
    tunnel has been up it is retried for as long as it takes. A session that
    stayed up ``stable_after`` seconds counts as healthy and its drop is retried
    at once; shorter sessions climb the backoff ladder, which is what keeps a
    flapping link from turning into a restart storm.
    """

    backoff: Backoff = Backoff()
    start_attempts: int = 5
    stable_after: float = 5.0


@dataclass(frozen=True)
class RestartState:
    """Where a tunnel stands on the restart ladder."""

    level: int = 0
    attempts: int = 0
    ever_up: bool = False

    def after_attempt(
        self,
        policy: RestartPolicy,
        *,
        up_for: float | None,
        permanent: str | None,
        rand: float,
        waits: bool = False,
    ) -> tuple[RestartState, Decision]:
        """Decide what follows an attempt that just ended.

        ``up_for`` is how long the session was verified up (None: it never got
        there); ``permanent`` is the reason when the failure cannot be fixed by
        retrying; ``waits``: the failure clears by itself in a bounded time (a
        head relay still serving a supervisor that is gone), so the attempt
        does not count against ``start_attempts``.
        """
        if permanent is not None:
            return self, GiveUp(permanent)
        if up_for is not None:
            level = 0 if up_for >= policy.stable_after else min(self.level + 1, _MAX_LEVEL)
            state = replace(self, level=level, attempts=0, ever_up=True)
        else:
            state = replace(
                self, level=min(self.level + 1, _MAX_LEVEL), attempts=self.attempts + (0 if waits else 1)
            )
            if not state.ever_up and policy.start_attempts and state.attempts >= policy.start_attempts:
                return state, GiveUp(f"gave up after {state.attempts} attempts")
        return state, Retry(policy.backoff.delay(state.level, rand), state.level)

    def wake_early(self) -> RestartState:
        """The path is back: keep the count of attempts but restart from the bottom rung."""
        return replace(self, level=0)
