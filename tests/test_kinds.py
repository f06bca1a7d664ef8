"""Which kind of master: by its status reply's type, by its object's module; the programs that follow."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wqsupervisor.clock import SystemClock
from wqsupervisor.config import Settings
from wqsupervisor.jobs import build_tracker
from wqsupervisor.kinds import TASKVINE, WORK_QUEUE, MasterKind, kind_named, kind_of_object, kind_of_status
from wqsupervisor.master import MasterInfo
from wqsupervisor.protocol import MasterSummary


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        ({"type": "wq_master", "port": 9123}, WORK_QUEUE),
        ({"type": "vine_manager", "port": 9123}, TASKVINE),
        ({"type": "wq_worker"}, None),
        ({"port": 9123}, None),
        ({}, None),
    ],
)
def test_the_status_type_tells_the_kind(entry, kind):
    assert kind_of_status(entry) is kind


def _object_from(module: str) -> object:
    cls = type("Master", (), {})
    cls.__module__ = module
    return cls()


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        ("ndcctools.work_queue", WORK_QUEUE),
        ("work_queue", WORK_QUEUE),
        ("wqsupervisor.wqserver", WORK_QUEUE),
        ("ndcctools.taskvine.manager", TASKVINE),
        ("ndcctools.taskvine", TASKVINE),
        ("ndcctools.taskvinex", WORK_QUEUE),  # a prefix that is not the package
        ("mylab.masters", WORK_QUEUE),
    ],
)
def test_an_objects_module_tells_the_kind(module, kind):
    assert kind_of_object(_object_from(module)) is kind


def test_a_subclass_of_a_taskvine_manager_is_a_taskvine_manager():
    base = type("Manager", (), {})
    base.__module__ = "ndcctools.taskvine.manager"
    sub = type("MyManager", (base,), {})
    sub.__module__ = "mylab.app"
    assert kind_of_object(sub()) is TASKVINE


def test_kinds_travel_by_name_and_an_unknown_name_is_refused():
    info = MasterInfo(port=9123, kind=TASKVINE.name)
    assert MasterInfo.from_dict(info.to_dict()) == info
    assert MasterInfo.from_dict({"port": 9123}).kind == "work_queue"  # from a handle of an older version
    assert MasterSummary.of(info).kind == "taskvine"
    with pytest.raises(ValueError, match="unknown master kind 'condor'"):
        kind_named("condor")


def _tracker(settings: Settings, kind: MasterKind) -> Any:
    return asyncio.run(
        build_tracker(
            settings,
            9123,
            10001,
            emit=lambda event: None,
            stats=lambda: None,
            tunnel_up=lambda: True,
            source=f"workers:{settings.workers}",
            clock=SystemClock(),
            kind=kind,
        )
    )


@pytest.mark.parametrize(
    ("kind", "program", "expected"),
    [
        (WORK_QUEUE, None, "work_queue_worker"),
        (TASKVINE, None, "vine_worker"),
        (TASKVINE, "/opt/cctools/bin/vine_worker", "/opt/cctools/bin/vine_worker"),
    ],
)
def test_the_workers_program_follows_the_kind_unless_given(kind, program, expected):
    settings = Settings(workers="local", worker_program=program, allow_no_password=True)
    tracker = _tracker(settings, kind)
    assert tracker.launcher.worker == expected
    assert f"{expected} --parent-death" in tracker.launcher.script().replace("'", "")
    # TaskVine's workers are told the node's own address for their peers (see the launcher).
    assert tracker.launcher.peer_transfers is (kind is TASKVINE)
    assert ("PEER=1" in tracker.launcher.script()) is (kind is TASKVINE)


def test_the_factory_follows_the_kind(tmp_path):
    from wqsupervisor.batch.factory import Factory

    settings = Settings(via="headnode", workers="factory", allow_no_password=True)
    for kind in (WORK_QUEUE, TASKVINE):
        tracker = _tracker(settings.replace(node_via="headnode"), kind)
        assert isinstance(tracker.system, Factory)
        tracker.system.workdir = str(tmp_path)
        assert tracker.system.factory_argv(10001)[0] == kind.factory
    given = settings.replace(node_via="headnode", factory_program="/opt/cctools/bin/vine_factory")
    tracker = _tracker(given, TASKVINE)
    tracker.system.workdir = str(tmp_path)
    assert tracker.system.factory_argv(10001)[0] == "/opt/cctools/bin/vine_factory"


def test_the_node_relay_runs_under_node_python_and_its_hop_daemon_under_relay_python():
    settings = Settings(
        via="headnode",
        node_via="headnode",
        workers="slurm",
        resume_hop=True,
        node_python="/opt/py3/bin/python3",
        relay_python="/usr/local/bin/python3.9",
        allow_no_password=True,
    )
    script = _tracker(settings, WORK_QUEUE).launcher.script()
    assert "command -v /opt/py3/bin/python3 " in script
    assert "/opt/py3/bin/python3 -c " in script
    assert ' /usr/local/bin/python3.9 "$REFUSED_MOVE"' in script
    assert "RESUME_HOP=1" in script
    # Without resume_hop the script never runs the node relay.
    assert "RESUME_HOP=0" in _tracker(settings.replace(resume_hop=False), WORK_QUEUE).launcher.script()
