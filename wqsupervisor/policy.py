"""The scaling policy: how many workers to start, and which pending jobs to withdraw.

Pure: (settings, state, observation) -> (state, decision), with ``now``
passed in, so it is tested as exact tables. The rules:

* demand is the backlog divided by ``tasks_per_worker``, clamped to
  ``[min_workers, max_workers]``; workers that joined on their own count;
* supply is the connected workers plus the jobs still on their way (queued,
  or started but not yet connected); it never exceeds ``max_workers``;
* nothing is submitted while the tunnel is not up (a worker that cannot reach
  the master only burns allocation, and a scheduler blip must not become a
  storm), at most ``max_per_cycle`` at a time, at most ``max_pending`` on their
  way, and not within ``cooldown`` seconds of the last submission;
* scale-in waits until supply has exceeded demand for ``idle_time`` seconds,
  then withdraws queued jobs that are no longer needed. Connected workers are
  never killed: they leave by themselves after ``idle_time`` without work
  (their idle timeout), so a worker running a task is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ScalingSettings:
    """Limits and pace of the scaling policy."""

    min_workers: int = 0
    max_workers: int = 4
    tasks_per_worker: int = 1
    max_pending: int = 4
    max_per_cycle: int = 2
    cooldown: float = 10.0
    idle_time: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 0 <= min_workers <= max_workers, not {self.min_workers} and {self.max_workers}"
            )
        for name in ("tasks_per_worker", "max_pending", "max_per_cycle"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.cooldown < 0 or self.idle_time < 0:
            raise ValueError("cooldown and idle_time must not be negative")


@dataclass(frozen=True)
class Observation:
    """What the policy sees at ``now``."""

    now: float
    tunnel_up: bool
    tasks_waiting: int
    tasks_on_workers: int
    workers_connected: int
    pending_jobs: tuple[str, ...] = ()  # queued at the scheduler, oldest first
    running_jobs: int = 0  # started at the scheduler


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions."""

    last_submit: float | None = None
    surplus_since: float | None = None


@dataclass(frozen=True)
class Decision:
    """What to do now, and why."""

    submit: int = 0
    cancel: tuple[str, ...] = ()
    why: str = ""


def starting(obs: Observation) -> int:
    """Jobs on their way: queued, or started without their worker connected yet."""
    return len(obs.pending_jobs) + max(0, obs.running_jobs - obs.workers_connected)


def demand(settings: ScalingSettings, obs: Observation) -> int:
    """Workers wanted for the backlog, within the limits."""
    wanted = math.ceil((obs.tasks_waiting + obs.tasks_on_workers) / settings.tasks_per_worker)
    return max(settings.min_workers, min(settings.max_workers, wanted))


def decide(settings: ScalingSettings, state: PolicyState, obs: Observation) -> tuple[PolicyState, Decision]:
    """The next step of the policy."""
    target = demand(settings, obs)
    on_the_way = starting(obs)
    supply = obs.workers_connected + on_the_way

    # Hysteresis: remember since when there has been more than enough.
    surplus_since = None
    if supply > target:
        surplus_since = obs.now if state.surplus_since is None else state.surplus_since
    state = replace(state, surplus_since=surplus_since)
    if surplus_since is not None:
        if obs.now - surplus_since >= settings.idle_time and obs.pending_jobs:
            extra = min(supply - target, len(obs.pending_jobs))
            # Withdraw the newest queued jobs; the oldest are closest to starting.
            cancel = obs.pending_jobs[-extra:]
            return state, Decision(cancel=cancel, why=f"{supply} workers for a demand of {target}")
        return state, Decision(why=f"{supply} workers for a demand of {target}")

    want = target - supply
    if want <= 0:
        return state, Decision(why="enough workers")
    if not obs.tunnel_up:
        return state, Decision(why="the tunnel is not up: no submission")
    if state.last_submit is not None and obs.now - state.last_submit < settings.cooldown:
        return state, Decision(why="cooling down after the last submission")
    n = min(want, settings.max_workers - supply, settings.max_pending - on_the_way, settings.max_per_cycle)
    if n <= 0:
        return state, Decision(
            why=f"{on_the_way} jobs already on their way (max_pending {settings.max_pending})"
        )
    return replace(state, last_submit=obs.now), Decision(submit=n, why=f"demand {target}, supply {supply}")
