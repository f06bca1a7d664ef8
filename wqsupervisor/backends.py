"""The transports by name, and a tunnel built from :class:`~wqsupervisor.config.Settings`.

This is the one place that picks a transport: ``Settings.backend`` names it,
:func:`sessions_for` makes its :class:`~wqsupervisor.session.SessionFactory`,
and :func:`tunnel_for` hands that to a :class:`~wqsupervisor.tunnel.Tunnel`.
A new transport is a module that implements the session interface and one
line in :data:`BACKENDS`. Each transport is imported only when chosen.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from .session import SessionFactory

if TYPE_CHECKING:
    from .clock import Clock
    from .config import Settings
    from .events import Event
    from .forward import DirectProbe
    from .master import MasterInfo
    from .tunnel import Tunnel, TunnelOptions
    from .wqproto import Credentials


def _openssh(settings: Settings) -> SessionFactory:
    if settings.resume:
        return _resumable(settings)  # the default
    from .openssh import OpenSSHSessions

    return OpenSSHSessions(settings.ssh_target(), own_socket=settings.own_socket)


def _resumable(settings: Settings) -> SessionFactory:
    from .resumable import ResumableSessions

    return ResumableSessions(
        settings.ssh_target(),
        own_socket=settings.own_socket,
        python=settings.relay_python,
        linger=settings.relay_linger,
    )


def _paramiko(settings: Settings) -> SessionFactory:
    from .paramiko_backend import ParamikoSessions

    return ParamikoSessions(settings.ssh_target())


BACKENDS: dict[str, Callable[[Settings], SessionFactory]] = {
    "openssh": _openssh,
    "resumable": _resumable,
    "paramiko": _paramiko,
}
"""Every transport, by the name ``Settings.backend`` uses."""


def sessions_for(settings: Settings) -> SessionFactory:
    """The session factory of the transport ``settings.backend`` names."""
    try:
        make = BACKENDS[settings.backend]
    except KeyError:
        from .errors import ConfigError

        raise ConfigError(
            f"unknown backend {settings.backend!r}", f"use one of {', '.join(sorted(BACKENDS))}"
        ) from None
    return make(settings)


def tunnel_options(settings: Settings) -> TunnelOptions:
    """The tunnel's part of the settings (which must name a head node and a remote port)."""
    from .liveness import Timing
    from .tunnel import TunnelOptions

    settings.require_tunnel()
    return TunnelOptions(
        remote_port=settings.remote_port or 0,
        restart_policy=settings.restart_policy,
        timing=Timing(
            keepalive_interval=settings.keepalive_interval,
            stall_after=settings.stall_after,
            probe_interval=settings.probe_interval,
        ),
    )


def tunnel_for(
    settings: Settings,
    master: MasterInfo,
    *,
    emit: Callable[[Event], None],
    rundir: str,
    direct_probe: DirectProbe,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    credentials: Credentials | None = None,
    label: str | None = None,
) -> Tunnel:
    """A tunnel for ``master`` with these settings' head node, options and transport."""
    from .tunnel import Tunnel
    from .wqproto import NO_CREDENTIALS

    options = tunnel_options(settings)
    # The other head nodes, each with a transport of its own (its own config reading, its own socket).
    fallbacks = [
        (target, sessions_for(settings.replace(via=target.destination, also_via=())))
        for target in settings.ssh_targets()[1:]
    ]
    return Tunnel(
        settings.ssh_target(),
        options,
        master,
        sessions=sessions_for(settings),
        fallbacks=fallbacks,
        emit=emit,
        rundir=rundir,
        direct_probe=direct_probe,
        clock=clock,
        rng=rng,
        credentials=credentials if credentials is not None else NO_CREDENTIALS,
        label=label,
    )
