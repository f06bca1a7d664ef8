"""The two pieces of the Work Queue wire protocol the supervisor speaks.

* The password handshake of cctools' ``link_auth_password``: both sides send
  ``auth password sha1``, then a 64-character random cookie, then the hex SHA1
  of ``password + " " + peer's cookie``, then ``ok`` or ``failure``.
* Status requests on the master's worker port, answered with a JSON array
  and end of file, as ``work_queue_status HOST PORT`` and ``vine_status`` ask.
  The supervisor sends ``resources_status``, which a Work Queue master and a
  TaskVine manager both answer with their own status (``queue_status`` and
  ``manager_status`` are each known to one kind only; see
  :mod:`wqsupervisor.kinds`). The master serves them from inside ``wait()``,
  so a master whose application is busy elsewhere does not answer.

The password is the password file's bytes as they are, trailing newline
included, because that is what ``specify_password_file`` and the worker's
``-P`` read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import ssl
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import AuthenticationFailed, ProtocolError

AUTH_IDENT = b"auth password sha1"
COOKIE_LENGTH = 64
MASTER_STATUS = "resources_status"
"""The master's own status, from a Work Queue master and a TaskVine manager alike."""
STATUS_REQUESTS = (MASTER_STATUS, "queue_status", "manager_status", "worker_status", "task_status")
_MAX_REPLY = 64 * 1024 * 1024
_COOKIE_ALPHABET = string.ascii_letters + string.digits

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def make_cookie() -> bytes:
    """A fresh random challenge, as cctools' ``string_cookie`` makes them."""
    return "".join(secrets.choice(_COOKIE_ALPHABET) for _ in range(COOKIE_LENGTH)).encode()


def response_for(password: bytes, peer_cookie: bytes) -> bytes:
    """The hex SHA1 a side sends to prove it knows ``password``."""
    return hashlib.sha1(password + b" " + peer_cookie, usedforsecurity=False).hexdigest().encode()


async def _line(reader: asyncio.StreamReader) -> bytes:
    raw = await reader.readline()
    if not raw.endswith(b"\n"):
        raise ProtocolError("the master closed the connection during the password handshake")
    return raw.rstrip(b"\n")


async def authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: bytes) -> None:
    """Run the password handshake as the connecting side; raise unless both sides accept."""
    writer.write(AUTH_IDENT + b"\n")
    await writer.drain()
    if await _line(reader) != AUTH_IDENT:
        raise AuthenticationFailed(
            "the master does not ask for a password",
            "drop the password setting, or give the master the same password file",
        )
    mine = make_cookie()
    writer.write(mine + b"\n")
    await writer.drain()
    theirs = await _line(reader)
    writer.write(response_for(password, theirs) + b"\n")
    await writer.drain()
    answer = await _line(reader)
    accepted = answer == response_for(password, mine)
    writer.write(b"ok\n" if accepted else b"failure\n")
    await writer.drain()
    verdict = await _line(reader)
    if not accepted:
        raise AuthenticationFailed(
            "the master answered with a wrong password response",
            "the master and the supervisor use different password files",
        )
    if verdict != b"ok":
        raise AuthenticationFailed(
            "the master refused the supervisor's password",
            "give the supervisor the master's password file",
        )


def tls_context() -> ssl.SSLContext:
    """TLS as a Work Queue worker speaks it to an ``ssl=(key, cert)`` master.

    Workers do not verify the master's (usually self-signed) certificate, and
    neither do the probes: they run inside the SSH tunnel or on loopback, and
    TLS here is the master's protocol, not the channel's protection.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # see the docstring
    return ctx


@dataclass(frozen=True)
class Credentials:
    """What it takes to talk to a master: its password, and TLS if it uses SSL."""

    password: bytes | None = None
    tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"Credentials(password={'set' if self.password else None}, tls={self.tls is not None})"


NO_CREDENTIALS = Credentials()


async def request_status(
    connect: Connector,
    request: str = MASTER_STATUS,
    *,
    credentials: Credentials = NO_CREDENTIALS,
    timeout: float = 3.0,
) -> list[dict[str, Any]]:
    """Send one status request over a fresh connection and return the parsed reply.

    Raises :class:`TimeoutError` when nothing comes back within ``timeout``
    (a master outside ``wait()``, or a hung path), :class:`ProtocolError` when
    the connection closes without a reply, the reply is not JSON, or it runs
    past 64 MiB.
    """
    if request not in STATUS_REQUESTS:
        raise ValueError(f"unknown status request {request!r}")
    reader, writer = await asyncio.wait_for(connect(), timeout)
    try:
        async with asyncio.timeout(timeout):
            if credentials.tls is not None:
                await writer.start_tls(credentials.tls)
            if credentials.password is not None:
                await authenticate(reader, writer, credentials.password)
            elif await _peek_auth(reader):
                raise _password_wanted()
            writer.write(request.encode() + b"\n")
            await writer.drain()
            body = bytearray()
            while chunk := await reader.read(1 << 20):
                body += chunk
                if len(body) > _MAX_REPLY:
                    # A master's status is kilobytes; whatever talks on without end is not one.
                    raise ProtocolError(
                        f"the status reply is longer than {_MAX_REPLY >> 20} MiB: not a Work Queue master"
                    )
    finally:
        writer.close()
    if not body:
        raise ProtocolError("the connection closed without a status reply")
    if body.startswith(AUTH_IDENT + b"\n"):
        # The handshake came later than the peek waited (a busy master or machine).
        raise _password_wanted()
    try:
        reply = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"the status reply is not JSON: {bytes(body[:80])!r}") from exc
    if isinstance(reply, dict):
        reply = [reply]
    if not isinstance(reply, list):
        raise ProtocolError("the status reply is not a JSON array")
    return [item for item in reply if isinstance(item, dict)]


def _password_wanted() -> AuthenticationFailed:
    return AuthenticationFailed(
        "the master asks for a password",
        "give the supervisor the master's password file (password_file=...)",
    )


async def _peek_auth(reader: asyncio.StreamReader) -> bool:
    """True when a password-protected master opened with its handshake line.

    A master without a password says nothing until asked, so a short wait is
    enough to tell the two apart on a live connection.
    """
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\n"), 0.05)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False
    return head.rstrip(b"\n") == AUTH_IDENT
