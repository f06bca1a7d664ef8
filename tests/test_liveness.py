"""Liveness of an up session, as exact tables: pings, stalls, keep or replace, the RTO cap. No sleeping."""

from __future__ import annotations

import inspect
import typing

import pytest

from wqsupervisor.backends import BACKENDS, sessions_for
from wqsupervisor.liveness import (
    GRACE_CAPPED,
    GRACE_UNCAPPED,
    HEAD_RETRY_SLACK,
    HEAD_RTO_MAX,
    Acks,
    Decision,
    ForwardCheck,
    Liveness,
    Observation,
    Reach,
    Timing,
    head_retry_by,
)
from wqsupervisor.session import Session, SessionFactory

T = Timing(keepalive_interval=1.0, stall_after=3.0, probe_interval=5.0)
TICK = Observation()
PONG = Observation(pinged=True, rtt=0.01)


def start(grace: float = GRACE_CAPPED, rto_lifted: bool = False) -> Liveness:
    """A session that came up at t=100."""
    return Liveness.start(T, 100.0, grace=grace, rto_lifted=rto_lifted)


def run(live: Liveness, steps: list[tuple[float, Observation]]) -> tuple[Liveness, list[Decision]]:
    """Feed observations at the given times; collect the decisions."""
    decisions = []
    for now, seen in steps:
        live, decision = live.observe(seen, now)
        decisions.append(decision)
    return live, decisions


def test_constants_are_unchanged():
    """The resume grace is one capped retransmission with our socket, TCP's backoff without."""
    assert (GRACE_CAPPED, GRACE_UNCAPPED) == (2.0, 12.0)


def test_pings_one_at_a_time_every_keepalive_interval():
    """The first look pings at once; the next ping waits for the answer and for the interval."""
    live, ds = run(
        start(),
        [
            (100.0, TICK),
            (100.5, TICK),
            (101.0, TICK),
            (101.2, PONG),
            (102.0, TICK),
            (102.1, PONG),
            (102.5, TICK),
        ],
    )
    assert [d.ping for d in ds] == [True, False, False, True, False, False, True]
    assert not live.stalled and live.last_pong == 102.1


@pytest.mark.parametrize(
    ("silent", "stalled"),
    [(2.9, False), (3.0, False), (3.01, True), (10.0, True)],
)
def test_a_session_stalls_only_after_stall_after_seconds_of_silence(silent, stalled):
    """Silence of exactly stall_after is still up; a moment more is a stall, reported with its length."""
    live, decision = start().observe(TICK, 100.0 + silent)
    assert live.stalled is stalled
    assert decision.stalled == (pytest.approx(silent) if stalled else None)
    assert decision.end is None


def test_a_stalled_session_resumes_on_the_next_pong_and_restores_the_cap():
    """A pong after a stall resumes (with the stall's length), and puts the lifted cap back."""
    live, d = start().observe(TICK, 104.0)
    assert d.stalled == pytest.approx(4.0) and d.probe_head is False
    live, d = live.observe(TICK, 104.25)
    assert d.probe_head is True  # first look at the head once stalled
    live = live.capped(True)  # nothing lifted yet
    live, d = live.observe(PONG, 105.0)
    assert d.resumed == pytest.approx(1.0) and d.cap is None and not live.stalled
    lifted = start(rto_lifted=True)
    lifted, _ = lifted.observe(TICK, 104.0)
    lifted, d = lifted.observe(PONG, 104.5)
    assert d.resumed == pytest.approx(0.5) and d.cap is True


# Stall decisions: (time, head probe result reported at that time) -> (probe the head?, end?)
KEEP_WHILE_HEAD_DOWN = [
    (104.0, None, False, False),  # stalls
    (104.25, None, True, False),  # probe the head
    (104.5, Reach.DOWN, True, False),  # down: keep, probe again
    (105.0, Reach.DOWN, True, False),
    (130.0, Reach.DOWN, True, False),  # however long: nothing better could be opened
]


def test_a_silent_session_is_kept_while_the_head_cannot_be_reached():
    """While fresh connections to the head fail, the silent session is kept, whatever its silence."""
    live = start()
    for now, head, probe, end in KEEP_WHILE_HEAD_DOWN:
        live, d = live.observe(Observation(head=head), now)
        assert (d.probe_head, d.end is not None) == (probe, end), now
    assert live.stalled


@pytest.mark.parametrize(
    ("grace", "steps", "replaced_at"),
    [
        # head answers at 104.5: grace starts; the next probe waits for it; still answering -> replace
        (
            GRACE_CAPPED,
            [
                (104.0, None),
                (104.25, None),
                (104.5, Reach.UP),
                (105.0, None),
                (106.5, None),
                (106.75, Reach.UP),
            ],
            106.75,
        ),
        # uncapped: 12 s of grace
        (
            GRACE_UNCAPPED,
            [
                (104.0, None),
                (104.25, None),
                (104.5, Reach.UP),
                (110.0, None),
                (116.5, None),
                (116.75, Reach.UP),
            ],
            116.75,
        ),
        # the head goes away again within the grace: start over, keep
        (
            GRACE_CAPPED,
            [(104.0, None), (104.25, None), (104.5, Reach.UP), (106.5, None), (106.75, Reach.DOWN)],
            None,
        ),
    ],
)
def test_a_silent_session_is_replaced_only_after_the_grace(grace, steps, replaced_at):
    """Once the head answers fresh connections, the session gets ``grace`` s; then it is replaced."""
    live = start(grace=grace)
    ended = None
    for now, head in steps:
        live, d = live.observe(Observation(head=head), now)
        if d.end is not None:
            assert d.replace and "replacing it" in d.end
            ended = now
            break
    assert ended == replaced_at


def test_the_replace_reason_says_how_long():
    """The reason names the session's silence and how long the head has answered."""
    live = start()
    for now, head in [(104.0, None), (104.25, None), (104.5, Reach.UP), (106.5, None)]:
        live, _ = live.observe(Observation(head=head), now)
    _, d = live.observe(Observation(head=Reach.UP), 106.75)
    assert d.end == (
        "session silent for 6.8 s although the head node has answered fresh connections for 2.2 s; replacing it"
    )


def test_no_route_lifts_the_cap_and_stretches_the_grace_and_a_route_restores_it():
    """NO_ROUTE: uncap (once) and give the session GRACE_UNCAPPED; the head answering again recaps."""
    live, _ = start().observe(TICK, 104.0)
    live, d = live.observe(TICK, 104.25)
    assert d.probe_head
    live, d = live.observe(Observation(head=Reach.NO_ROUTE), 104.5)
    assert d.cap is False and d.probe_head
    assert live.stall is not None and live.stall.grace == GRACE_UNCAPPED
    live = live.capped(False)
    live, d = live.observe(Observation(head=Reach.NO_ROUTE), 105.0)
    assert d.cap is None, "already lifted"
    live, d = live.observe(Observation(head=Reach.UP), 106.0)
    assert d.cap is True and d.end is None
    live = live.capped(True)
    # the stretched grace stays for this stall: 12 s from 106.0
    live, d = live.observe(TICK, 117.0)
    assert not d.probe_head
    live, d = live.observe(TICK, 118.0)
    assert d.probe_head
    _, d = live.observe(Observation(head=Reach.UP), 118.25)
    assert d.end is not None and d.replace


def test_a_failed_uncap_is_tried_again():
    """When the cap could not be lifted (not reported as capped), the next NO_ROUTE asks again."""
    live, _ = start().observe(TICK, 104.0)
    live, _ = live.observe(TICK, 104.25)
    live, d = live.observe(Observation(head=Reach.NO_ROUTE), 104.5)
    assert d.cap is False
    live, d = live.observe(Observation(head=Reach.NO_ROUTE), 105.0)
    assert d.cap is False


def acks(unacked: int, retransmitting: bool, last_ack: float) -> Acks:
    """A TCP_INFO reading of the session's own socket."""
    return Acks(unacked=unacked, retransmitting=retransmitting, last_ack=last_ack)


def test_head_retry_by_doubles_the_loss_and_is_capped():
    """The head retries by the loss's length after the path's return (plus slack), at most 120 s after it."""
    assert (HEAD_RTO_MAX, HEAD_RETRY_SLACK) == (120.0, 2.0)
    assert head_retry_by(100.0, 121.0) == 121.0 + 21.0 + 2.0
    assert head_retry_by(100.0, 191.0) == 191.0 + 91.0 + 2.0
    assert head_retry_by(100.0, 400.0) == 400.0 + 120.0 + 2.0


# A 20 s blackhole from t=100.5 (last pong at 100.0), healed at 120.5; the head answers
# fresh connections from 120.75. (time, head probe, socket) -> (probe head?, nudge?, end?)
LOST = acks(2, True, 100.4)
SURVIVED = [
    (104.0, None, LOST, False, False, False),  # stalls; our ping is being retransmitted
    (104.25, None, LOST, True, False, False),
    (105.25, Reach.DOWN, LOST, True, False, False),
    (120.75, Reach.UP, LOST, False, False, False),  # the head answers: grace starts
    (121.5, None, acks(0, False, 121.4), False, False, False),  # our retransmission acknowledged
    (122.75, None, acks(0, False, 121.4), False, False, False),  # grace over, but kept: no probe
    (140.0, None, acks(0, False, 121.4), False, False, False),  # kept until 121.5 + 21.5 + 2 = 145.0
]


def test_a_session_whose_retransmissions_are_acknowledged_again_is_kept_past_the_grace():
    """Acknowledged after the heal: the connection survived, so no replacement while the head's backoff runs."""
    live = start()
    for now, head, tcp, probe, nudge, end in SURVIVED:
        live, d = live.observe(Observation(head=head, acks=tcp), now)
        assert (d.probe_head, d.nudge, d.end is not None) == (probe, nudge, end), now
    assert live.stall is not None and live.stall.lost_at == 104.0 and live.stall.acked_at == 121.5
    # the head's own retransmission brings the pong: resumed, never replaced
    live, d = live.observe(PONG, 141.0)
    assert d.resumed is not None and d.end is None and not live.stalled


def test_an_acknowledged_session_that_never_answers_is_replaced_once_the_head_must_have_retried():
    """The keep is bounded: past head_retry_by the head is probed again and the session replaced."""
    live = start()
    for now, head, tcp, _, _, _ in SURVIVED[:5]:
        live, _ = live.observe(Observation(head=head, acks=tcp), now)
    keep_until = head_retry_by(100.0, 121.5)
    assert keep_until == 145.0
    live, d = live.observe(Observation(acks=acks(0, False, 121.4)), 144.9)
    assert not d.probe_head and d.end is None
    live, d = live.observe(Observation(acks=acks(0, False, 121.4)), 145.0)
    assert d.probe_head and d.end is None
    _, d = live.observe(Observation(head=Reach.UP), 145.25)
    assert d.end is not None and d.replace


def test_a_forgotten_connection_is_replaced_after_the_grace_as_before():
    """Retransmissions never acknowledged after the heal: a firewall forgot the connection; replace it."""
    live = start()
    steps = [
        (104.0, None, LOST),
        (104.25, None, LOST),
        (105.25, Reach.DOWN, LOST),
        (120.75, Reach.UP, LOST),
        (121.5, None, LOST),
        (122.5, None, LOST),
        (122.75, None, LOST),  # grace over: probe again
    ]
    for now, head, tcp in steps:
        live, d = live.observe(Observation(head=head, acks=tcp), now)
    assert d.probe_head and live.stall is not None and live.stall.acked_at is None
    _, d = live.observe(Observation(head=Reach.UP, acks=LOST), 123.0)
    assert d.end is not None and d.replace


def test_acknowledgements_without_retransmission_prove_nothing():
    """A hung peer's kernel acknowledges our data at once: no loss was seen, so the grace rules as before."""
    live = start()
    steps = [
        (104.0, None, acks(0, False, 101.0), False, True),  # nothing unacknowledged: nudge
        (104.25, None, acks(1, False, 101.0), True, False),
        (104.5, Reach.UP, acks(0, False, 104.3), False, False),
        (104.75, None, acks(0, False, 104.3), False, False),  # a nudge at most every keepalive interval
        (105.0, None, acks(0, False, 104.3), False, True),
        (106.5, None, acks(0, False, 106.3), True, True),
    ]
    for now, head, tcp, probe, nudge in steps:
        live, d = live.observe(Observation(head=head, acks=tcp), now)
        assert (d.probe_head, d.nudge) == (probe, nudge), now
    assert live.stall is not None and live.stall.lost_at is None and live.stall.acked_at is None
    _, d = live.observe(Observation(head=Reach.UP), 106.75)
    assert d.end is not None and d.replace


def test_an_acknowledgement_from_before_the_loss_was_seen_does_not_count():
    """Only an acknowledgement later than the first sight of retransmission shows the path's return."""
    live = start()
    live, _ = live.observe(Observation(acks=acks(2, True, 100.4)), 104.0)
    live, _ = live.observe(Observation(acks=acks(2, True, 100.4)), 104.25)
    live, _ = live.observe(Observation(acks=acks(1, False, 103.9)), 104.5)
    assert live.stall is not None and live.stall.acked_at is None
    live, _ = live.observe(Observation(acks=acks(0, False, 104.1)), 104.75)
    assert live.stall is not None and live.stall.acked_at == 104.75


def test_no_socket_reading_keeps_todays_rules():
    """Without TCP_INFO (proxied, or not our socket) nothing is nudged and the grace rules alone."""
    live = start()
    for now, head in [(104.0, None), (104.25, None), (104.5, Reach.UP), (106.5, None)]:
        live, d = live.observe(Observation(head=head), now)
        assert not d.nudge
    _, d = live.observe(Observation(head=Reach.UP), 106.75)
    assert d.end is not None and d.replace


# Forward checks while up, every probe_interval (5 s): (time, result) -> (check now?, end reason)
@pytest.mark.parametrize(
    ("results", "ends"),
    [
        ([ForwardCheck.REACHED, ForwardCheck.HELD, ForwardCheck.REACHED], None),
        ([ForwardCheck.LOST, ForwardCheck.REACHED, ForwardCheck.LOST], None),
        ([ForwardCheck.LOST, ForwardCheck.REFUSED], "the remote port stopped reaching the master (refused)"),
        ([ForwardCheck.REFUSED, ForwardCheck.LOST], "the remote port stopped reaching the master (lost)"),
        ([ForwardCheck.WRONG], "the remote port stopped reaching the master (wrong)"),
    ],
)
def test_forward_checks_end_the_session_on_a_wrong_master_or_two_losses_in_a_row(results, ends):
    """A different master ends it at once; lost or refused must happen twice in a row."""
    live = start()
    live, d = live.observe(PONG, 102.5)
    live, d = live.observe(PONG, 104.9)
    assert not d.probe_forward
    now, ended = 105.0, None
    for result in results:
        if now > 105.0:
            live, _ = live.observe(PONG, now - 2.5)  # keep the session answering in between
        live, d = live.observe(PONG, now)
        assert d.probe_forward, now
        live, d = live.observe(Observation(pinged=True, rtt=0.01, forward=result), now + 0.5)
        assert not d.probe_forward
        if d.end is not None:
            assert not d.replace
            ended = d.end
            break
        now += 5.0
    assert ended == ends


def test_no_forward_check_while_stalled_and_a_late_result_is_ignored():
    """A check in flight when the session stalls does not count; none starts until it resumes."""
    live, d = start().observe(PONG, 105.0)
    assert d.probe_forward
    live, _ = live.observe(TICK, 108.5)  # stalled (last pong 105.0)
    assert live.stalled and live.lost_streak == 0
    live, d = live.observe(Observation(forward=ForwardCheck.LOST), 108.75)
    assert d.end is None and not d.probe_forward and live.lost_streak == 0
    live, d = live.observe(PONG, 112.0)
    assert d.resumed is not None and not d.probe_forward
    assert live.next_probe == 117.0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_transport_implements_the_session_interface(backend):
    """Each backend's factory, and the session class its start() returns, have every member the tunnel uses."""
    from wqsupervisor.config import Settings

    factory = sessions_for(Settings(via="headnode", remote_port=10001, backend=backend, resume=False))
    assert isinstance(factory, SessionFactory)
    assert factory.name == backend
    cls = typing.get_type_hints(type(factory).start)["return"]
    members = [m for m in dir(Session) if not m.startswith("_")]
    assert set(members) >= {"established", "exited", "failure", "ping", "open_probe", "close", "kill_now"}
    init = inspect.getsource(cls.__init__)
    missing = [m for m in members if not hasattr(cls, m) and f"self.{m}" not in init]
    assert not missing, f"{cls.__name__} lacks {missing}"


def test_a_resumable_session_is_replaced_after_the_grace_even_when_it_survived():
    """With the head relay, replacing costs nothing: the surviving session is not kept for the head's backoff."""
    live = Liveness.start(T, 100.0, grace=GRACE_CAPPED, resumable=True)
    for now, head, tcp, _, _, _ in SURVIVED[:5]:
        live, d = live.observe(Observation(head=head, acks=tcp), now)
        assert d.end is None, now
    assert live.stall is not None and live.stall.acked_at == 121.5
    live, d = live.observe(Observation(acks=acks(0, False, 121.4)), 122.75)  # the grace is over at 122.75
    assert d.probe_head and d.end is None
    _, d = live.observe(Observation(head=Reach.UP), 123.0)
    assert d.end is not None and d.replace


def test_no_route_does_not_stretch_a_resumable_sessions_grace():
    """An outage lifts the cap as before, but the grace stays short: the next session resumes everything."""
    live = Liveness.start(T, 100.0, grace=GRACE_CAPPED, resumable=True)
    live, _ = live.observe(TICK, 104.0)
    live, d = live.observe(TICK, 104.25)
    assert d.probe_head
    live, d = live.observe(Observation(head=Reach.NO_ROUTE), 104.5)
    assert d.cap is False and live.stall is not None and live.stall.grace == GRACE_CAPPED
