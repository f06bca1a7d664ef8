"""Job tracking: the scaling policy's decisions carried out on a batch system, and accounted for.

Every job the supervisor submits has an id and a state (pending, running,
done, failed, cancelled). The tracker polls the scheduler, asks the policy
what to do, submits or withdraws, and says what happened in events. A refused
submission is not retried at once: it backs off (capped, jittered) and the
event carries the scheduler's own words. On close, every job it submitted and
that is still queued or running is cancelled, and the tracker waits until the
scheduler confirms it.

While the scheduler cannot be asked (head node unreachable, its commands
failing: :class:`~wqsupervisor.batch.base.Unavailable`), the jobs keep their
last known states and the tracker decides nothing: a job it cannot see is not
a finished job, and a replacement submitted for it would leak on the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .backoff import Backoff
from .batch.base import (
    BatchOptions,
    BatchSystem,
    JobState,
    LocalRunner,
    Runner,
    SshRunner,
    SubmitError,
    Unavailable,
)
from .clock import Clock, SystemClock
from .config import Settings
from .errors import WQSupervisorError
from .events import Event, JobsCancelled, JobsSubmitted, JobStateChanged, JobSubmitFailed
from .kinds import WORK_QUEUE, MasterKind
from .launcher import NodeLauncher
from .logs import get_logger
from .master import MasterStats
from .passwords import read_password
from .policy import Observation, PolicyState, ScalingSettings, decide

# A job the scheduler stops listing is taken as finished after this long.
_FORGOTTEN_AFTER = 30.0
# A job that ends sooner than this after submission counts as a failed submission.
_EARLY_EXIT = 20.0


def submission_failed(state: JobState, lived: float, idle_time: float) -> bool:
    """Does a job that reached ``state`` ``lived`` seconds after its submission say it failed?

    A job that fails (a non-zero exit) soon after submission does; so does one
    that ends soon without an error, unless it lived as long as its worker's
    idle time: then it may simply have run out of work and left, as workers do.
    """
    if lived >= _EARLY_EXIT:
        return False
    if state is JobState.FAILED:
        return True
    return state is JobState.DONE and lived < idle_time


@dataclass
class Job:
    """One worker job."""

    id: str
    state: JobState
    submitted_at: float
    changed_at: float
    last_seen: float

    def to_dict(self) -> dict[str, Any]:
        """For status output."""
        return {"id": self.id, "state": self.state.value, "submitted_at": self.submitted_at}


@dataclass
class JobTracker:
    """Runs the policy against one batch system for one master."""

    system: BatchSystem
    scaling: ScalingSettings
    launcher: NodeLauncher
    emit: Callable[[Event], None]
    stats: Callable[[], MasterStats | None]
    tunnel_up: Callable[[], bool]
    source: str
    clock: Clock = field(default_factory=SystemClock)
    interval: float = 2.0
    password: bytes | None = None
    submit_backoff: Backoff = field(default_factory=lambda: Backoff(initial=5.0, cap=300.0))
    rng: random.Random = field(default_factory=random.Random)
    jobs: dict[str, Job] = field(default_factory=dict)
    submitted: int = 0
    unavailable: str | None = None
    """Why the scheduler could not be asked at the last try; None while it answers."""
    _policy: PolicyState = field(default_factory=PolicyState)
    _failures: int = 0
    _retry_at: float = 0.0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    # A step runs under this lock, so that close() never races a submission in flight:
    # jobs that sbatch accepted are recorded before close() cancels what is recorded.
    _stepping: asyncio.Lock = field(default_factory=asyncio.Lock)
    _closing: bool = False

    def adapt(self, minimum: int | None = None, maximum: int | None = None) -> None:
        """Change the worker limits while running (like dask-jobqueue's ``adapt``)."""
        self.scaling = replace(
            self.scaling,
            min_workers=self.scaling.min_workers if minimum is None else minimum,
            max_workers=self.scaling.max_workers if maximum is None else maximum,
        )
        self._wake.set()

    def nudge(self) -> None:
        """Run the next step now (the backlog changed)."""
        self._wake.set()

    def counts(self) -> dict[str, int]:
        """Jobs by state."""
        out = {state.value: 0 for state in JobState}
        for job in self.jobs.values():
            out[job.state.value] += 1
        return out

    def snapshot(self) -> dict[str, Any]:
        """For status output."""
        return {
            **self.system.describe(),
            **self.counts(),
            "submitted": self.submitted,
            "min_workers": self.scaling.min_workers,
            "max_workers": self.scaling.max_workers,
            "submit_failures": self._failures,
        }

    def _emit(self, cls: type[Event], **fields: Any) -> None:
        self.emit(cls(at=self.clock.wall(), source=self.source, **fields))

    async def run(self) -> None:
        """Prepare the system, then poll, decide and act until cancelled."""
        await self.system.prepare(self.launcher, self.password)
        while not self._closing:
            try:
                async with self._stepping:
                    if self._closing:
                        return
                    await self.step()
            except Exception:
                get_logger().exception("jobs.step_failed", source=self.source)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def step(self) -> None:
        """One round: refresh job states, ask the policy, carry out its decision.

        Nothing is decided while the scheduler cannot be asked: the states
        the policy would count are unknown.
        """
        if not await self.refresh():
            return
        stats = self.stats()
        if stats is None:
            return
        now = self.clock.monotonic()
        pending = tuple(
            j.id
            for j in sorted(self.jobs.values(), key=lambda j: j.submitted_at)
            if j.state is JobState.PENDING
        )
        running = sum(j.state is JobState.RUNNING for j in self.jobs.values())
        obs = Observation(
            now=now,
            tunnel_up=self.tunnel_up(),
            tasks_waiting=stats.tasks_waiting,
            tasks_on_workers=stats.tasks_on_workers,
            workers_connected=stats.workers_connected,
            pending_jobs=pending,
            running_jobs=running,
        )
        self._policy, decision = decide(self.scaling, self._policy, obs)
        if decision.cancel:
            try:
                await self.system.cancel(list(decision.cancel))
            except Unavailable as exc:
                # Not cancelled as far as we know: they stay counted, and the next round decides again.
                self._scheduler_unavailable(exc)
                return
            for job_id in decision.cancel:
                self._set(job_id, JobState.CANCELLED, now)
            self._emit(JobsCancelled, ids=tuple(decision.cancel), why=decision.why)
        if decision.submit and now >= self._retry_at:
            await self._submit(decision.submit, decision.why, now)

    async def _submit(self, count: int, why: str, now: float) -> None:
        try:
            ids = await self.system.submit(count)
        except WQSupervisorError as exc:
            self._back_off(now, exc.message, exc.hint or "")
            return
        for job_id in ids:
            self.jobs[job_id] = Job(job_id, JobState.PENDING, now, now, now)
        self.submitted += len(ids)
        self._emit(JobsSubmitted, system=self.system.name, count=len(ids), ids=tuple(ids), why=why)

    def _set(self, job_id: str, state: JobState, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state is state:
            return
        previous = job.state
        job.state, job.changed_at = state, now
        self._emit(JobStateChanged, job=job_id, previous=previous.value, state=state.value)
        if submission_failed(state, now - job.submitted_at, self.scaling.idle_time):
            # A job that ends right away will not do better when submitted again at
            # once (a bad node, a missing program): back off as after a refusal.
            self._back_off(
                now,
                f"worker job {job_id} ended ({state.value}) {now - job.submitted_at:.0f} s after submission",
                f"look at its output in {self.system.workdir}",
            )

    def _back_off(self, now: float, error: str, hint: str) -> None:
        """One more failure in a row: no submission before the backoff's delay, and say why."""
        self._failures += 1
        delay = self.submit_backoff.delay(self._failures, self.rng.random())
        self._retry_at = now + delay
        self._emit(JobSubmitFailed, system=self.system.name, error=error, hint=hint, retry_in=round(delay, 1))

    def _scheduler_unavailable(self, exc: Unavailable) -> None:
        """Say once per outage that the scheduler cannot be asked."""
        if self.unavailable is None:
            get_logger().warning(
                "jobs.scheduler_unavailable",
                source=self.source,
                system=self.system.name,
                error=exc.message,
                hint=exc.hint or "",
                jobs=sum(j.state.active for j in self.jobs.values()),
            )
        self.unavailable = exc.message

    def _scheduler_answers(self) -> None:
        if self.unavailable is not None:
            get_logger().info("jobs.scheduler_available", source=self.source, system=self.system.name)
        self.unavailable = None

    async def refresh(self) -> bool:
        """Ask the scheduler for the states of our active jobs; False when it could not be asked."""
        active = [j.id for j in self.jobs.values() if j.state.active]
        if not active:
            return True
        try:
            states = await self.system.states(active)
        except Unavailable as exc:
            self._scheduler_unavailable(exc)
            return False  # unknown is not finished: ask again next round
        self._scheduler_answers()
        now = self.clock.monotonic()
        for job_id in active:
            job = self.jobs[job_id]
            if job_id in states:
                job.last_seen = now
                self._set(job_id, states[job_id], now)
            elif now - job.last_seen > _FORGOTTEN_AFTER:
                # Finished long enough ago for the scheduler to forget it.
                self._set(job_id, JobState.DONE, now)
            if job.state is JobState.RUNNING and now - job.submitted_at >= _EARLY_EXIT:
                self._failures = 0  # jobs work again
        return True

    async def close(self, timeout: float = 60.0) -> None:
        """Cancel every job still queued or running, wait for the scheduler to agree, clean up."""
        deadline = self.clock.monotonic() + timeout
        self._closing = True
        self._wake.set()
        # Let a step in flight finish, so the jobs it submits are known and cancelled below.
        stepped = False
        with contextlib.suppress(TimeoutError):
            stepped = await asyncio.wait_for(self._stepping.acquire(), timeout / 2)
        try:
            await self._cancel_all(deadline)
        finally:
            if stepped:
                self._stepping.release()
        await self.system.close()

    async def _cancel_all(self, deadline: float) -> None:
        active = [j.id for j in self.jobs.values() if j.state.active]
        cancelled = await self._try_cancel(active)
        if active:
            self._emit(JobsCancelled, ids=tuple(active), why="the supervisor is closing")
        while active and self.clock.monotonic() < deadline:
            try:
                if not cancelled:
                    cancelled = await self._try_cancel(active)
                states = await self.system.states(active)
            except Unavailable as exc:
                self._scheduler_unavailable(exc)
                await self.clock.sleep(1.0)
                continue
            active = [i for i in active if i in states and states[i].active]
            if active:
                await self.clock.sleep(0.5)
        for job in self.jobs.values():
            if job.state.active:
                self._set(job.id, JobState.CANCELLED, self.clock.monotonic())

    async def _try_cancel(self, ids: list[str]) -> bool:
        """Cancel ``ids``; False when the scheduler could not be asked (the caller tries again)."""
        if not ids:
            return True
        try:
            await self.system.cancel(ids)
        except Unavailable as exc:
            self._scheduler_unavailable(exc)
            return False
        return True


@dataclass
class FactoryTracker:
    """Keeps one ``work_queue_factory`` running on the head node; it scales by itself."""

    system: Any  # batch.factory.Factory
    launcher: NodeLauncher
    emit: Callable[[Event], None]
    source: str
    clock: Clock = field(default_factory=SystemClock)
    interval: float = 5.0
    password: bytes | None = None
    ids: list[str] = field(default_factory=list)
    restarts: int = 0
    _closing: bool = False

    async def run(self) -> None:
        """Start the factory, and start it again (with a backoff) if it ends."""
        await self.system.prepare(self.launcher, self.password)
        backoff = Backoff(initial=5.0, cap=120.0)
        while not self._closing:
            self.ids = await self.system.submit(1)
            self.emit(
                JobsSubmitted(
                    at=self.clock.wall(),
                    source=self.source,
                    system="factory",
                    count=1,
                    ids=tuple(self.ids),
                    why="work_queue_factory on the head node",
                )
            )
            while (await self.system.states(self.ids)).get(self.ids[0]) is JobState.RUNNING:
                await self.clock.sleep(self.interval)
            if self._closing:
                return
            self.restarts += 1
            delay = backoff.delay(min(self.restarts, 8), random.random())
            self.emit(
                JobSubmitFailed(
                    at=self.clock.wall(),
                    source=self.source,
                    system="factory",
                    error="work_queue_factory ended",
                    hint=f"see its log, {self.system.workdir}/factory.log on the head node",
                    retry_in=round(delay, 1),
                )
            )
            await self.clock.sleep(delay)

    def adapt(self, minimum: int | None = None, maximum: int | None = None) -> None:
        """New limits for the factory; they take effect when it is restarted."""
        if minimum is not None:
            self.system.min_workers = minimum
        if maximum is not None:
            self.system.max_workers = maximum

    def snapshot(self) -> dict[str, Any]:
        """For status output."""
        return {
            **self.system.describe(),
            "factory_restarts": self.restarts,
            "min_workers": self.system.min_workers,
            "max_workers": self.system.max_workers,
        }

    async def close(self, timeout: float = 60.0) -> None:
        """Stop the factory (it takes its own workers down with their idle timeout)."""
        self._closing = True
        await self.system.cancel(self.ids)
        await self.system.close()


async def build_tracker(
    settings: Settings,
    master_port: int,
    remote_port: int,
    *,
    emit: Callable[[Event], None],
    stats: Callable[[], MasterStats | None],
    tunnel_up: Callable[[], bool],
    source: str,
    clock: Clock,
    rundir: str | None = None,
    kind: MasterKind = WORK_QUEUE,
) -> JobTracker | FactoryTracker:
    """The tracker for ``settings.workers``, with its runner and the launcher its jobs run.

    With ``rundir`` (private), the scheduler's commands share one ssh
    connection of their own, its socket there; with the paramiko backend they
    share one paramiko connection of their own instead
    (:class:`~wqsupervisor.batch.paramiko_runner.ParamikoRunner`), and no ssh
    client is run. ``kind`` (the master's) names the worker program unless the
    settings do, and the factory.
    """
    from .batch import system_class
    from .batch.factory import Factory
    from .batch.paramiko_runner import ParamikoRunner

    assert settings.workers is not None
    name = settings.workers
    control = f"{rundir}/batch-{remote_port}.sock" if rundir else None
    runner: Runner
    if name == "local":
        runner = LocalRunner()
    elif settings.backend == "paramiko":
        # No ssh client: a paramiko connection of the runner's own (never the tunnel's).
        runner = ParamikoRunner(
            settings.ssh_target(), dict(settings.batch_env), others=settings.ssh_targets()[1:]
        )
    else:
        runner = SshRunner(
            settings.ssh_target(),
            dict(settings.batch_env),
            control=control,
            others=settings.ssh_targets()[1:],
        )
    options = BatchOptions(
        partition=settings.partition,
        account=settings.account,
        walltime=settings.walltime,
        cores=settings.worker_cores,
        memory_mb=settings.worker_memory,
        disk_mb=settings.worker_disk,
        directives=settings.batch_directives,
        env=dict(settings.batch_env),
    )
    system = system_class(name)(runner, options)
    also: tuple[str, ...] = ()
    if name == "local":
        # Workers on this machine need no tunnel: they go to the master's own port.
        via, port = None, master_port
    elif name == "ssh" or (name == "factory" and settings.factory_type == "local"):
        # Workers on the head node itself reach the remote port on its loopback.
        via, port = None, remote_port
    elif settings.also_via:
        (via, *others), port = await _node_names(settings), remote_port
        also = tuple(others)
    else:
        via, port = settings.node_via or await _head_hostname(runner), remote_port
    launcher = NodeLauncher(
        remote_port=port,
        via=via,
        also_via=also,
        ssh_args=tuple(shlex.split(settings.node_ssh_args or "")),
        worker=settings.worker_program or kind.worker,
        cores=settings.worker_cores,
        memory_mb=settings.worker_memory,
        disk_mb=settings.worker_disk,
        idle_timeout=max(1, round(settings.idle_time)),
        ssl=settings.ssl,
        peer_transfers=kind.peer_transfers,
        resume_hop=settings.resume_hop,
        python=settings.node_python,
        head_python=settings.relay_python,
    )
    password = read_password(settings.password_file) if settings.password_file else None
    if isinstance(system, Factory):
        system.program = settings.factory_program or kind.factory
        system.batch_type = settings.factory_type
        system.min_workers, system.max_workers = settings.min_workers, settings.max_workers
        system.idle_timeout = launcher.idle_timeout
        return FactoryTracker(
            system=system, launcher=launcher, emit=emit, source=source, clock=clock, password=password
        )
    return JobTracker(
        system=system,
        scaling=settings.scaling,
        launcher=launcher,
        password=password,
        emit=emit,
        stats=stats,
        tunnel_up=tunnel_up,
        source=source,
        clock=clock,
    )


async def _node_names(settings: Settings) -> list[str]:
    """What compute nodes call each head node, in order: the name given for it (``node_via``,
    ``also_node_via``), else its own hostname, else (it cannot be asked now) the name we reach it by.

    Each head is asked on its own: through the runner, which moves on to the next head when one
    cannot be reached, a first head that is down would answer with the second's name.
    """
    from .batch.paramiko_runner import ParamikoRunner

    given = [settings.node_via, *settings.also_node_via]
    names = []
    for i, target in enumerate(settings.ssh_targets()):
        name = given[i] if i < len(given) else None
        if not name:
            runner = ParamikoRunner(target) if settings.backend == "paramiko" else SshRunner(target)
            try:
                name = await _head_hostname(runner)
            except SubmitError:
                name = target.host
            finally:
                await runner.close()
        names.append(name)
    return names


async def _head_hostname(runner: Runner) -> str:
    """The head node's own name: what its compute nodes call it."""
    done = await runner.run(["hostname"])
    name = done.stdout.strip()
    if done.returncode != 0 or not name:
        raise SubmitError(f"cannot ask the head node its name: {done.error_text}", "set --node-via")
    return name
