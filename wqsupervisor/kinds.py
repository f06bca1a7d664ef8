"""The kinds of master the supervisor serves: Work Queue masters and TaskVine managers.

Both listen on one port for their workers and answer status requests there
from inside ``wait()``, after the same password handshake. They differ in
what a status request is called and in their programs:

* a Work Queue master answers ``queue_status``, a TaskVine manager
  ``manager_status``; each closes the connection without a word on the
  other's request. Both answer ``resources_status`` with their own status
  (cctools' ``work_queue.c`` and ``vine_manager.c``; Debian's 9.9 and
  cctools 7.17 checked), whose ``type`` says which kind answered
  (``wq_master`` or ``vine_manager``), so that is the request the supervisor
  sends to any master;
* their workers are ``work_queue_worker`` and ``vine_worker``, and their
  factories ``work_queue_factory`` and ``vine_factory``; the flags the node
  launcher and the factory wrapper use are the same for both;
* TaskVine's workers also fetch files from each other, at the address the
  manager saw each come from, which a tunnel hides (the node launcher's
  ``peer_transfers``).

A new kind is one more :class:`MasterKind` in :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MasterKind:
    """What differs between two kinds of master, as the supervisor sees them."""

    name: str
    """As status output and MasterInfo spell it."""
    label: str
    """For people: 'Work Queue master'."""
    status_type: str
    """The ``type`` of its status reply."""
    worker: str
    factory: str
    modules: tuple[str, ...]
    """Python modules whose master objects are of this kind."""
    peer_transfers: bool = False
    """Its workers fetch files from each other, at addresses the manager hands out."""


WORK_QUEUE = MasterKind(
    name="work_queue",
    label="Work Queue master",
    status_type="wq_master",
    worker="work_queue_worker",
    factory="work_queue_factory",
    modules=("ndcctools.work_queue", "work_queue", "wqsupervisor.wqserver"),
)
TASKVINE = MasterKind(
    name="taskvine",
    label="TaskVine manager",
    status_type="vine_manager",
    worker="vine_worker",
    factory="vine_factory",
    modules=("ndcctools.taskvine",),
    peer_transfers=True,
)
KINDS = (WORK_QUEUE, TASKVINE)
ANY_LABEL = " or ".join(k.label for k in KINDS)
"""For messages about whatever answered: 'Work Queue master or TaskVine manager'."""


def kind_named(name: str) -> MasterKind:
    """The kind called ``name`` (as MasterInfo carries it)."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"unknown master kind {name!r}; known: {', '.join(k.name for k in KINDS)}")


def kind_of_status(entry: Mapping[str, Any]) -> MasterKind | None:
    """The kind whose status reply ``entry`` is, by its ``type``; None for anything else."""
    kind_type = entry.get("type")
    return next((k for k in KINDS if k.status_type == kind_type), None)


def kind_of_object(master: Any) -> MasterKind:
    """The kind of a master object, by the module its class (or a base class) comes from."""
    for cls in type(master).__mro__:
        module = cls.__module__
        for kind in KINDS:
            if any(module == m or module.startswith(m + ".") for m in kind.modules):
                return kind
    return WORK_QUEUE
