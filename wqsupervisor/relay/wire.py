"""The relay's frames: a fixed header and a payload, read incrementally from a byte stream.

This module runs on the head node too (see :mod:`wqsupervisor.relay.program`),
so it is written for Python 3.6: no f-strings with ``=``, no walrus, no
``from __future__ import annotations``, nothing outside the standard library.

A frame is ``kind`` (1 byte), ``sid`` (4 bytes: the stream), ``value``
(8 bytes: an offset, an acknowledgement or a ping number) and ``length``
(4 bytes), all big-endian, followed by ``length`` bytes of payload.
"""

import struct
from typing import List, Tuple

HEADER = struct.Struct("!BIQI")
MAX_PAYLOAD = 256 * 1024
# The largest frame we accept: anything bigger means the stream is not ours.
MAX_FRAME_PAYLOAD = 1024 * 1024

DATA = 1  # sid, value = offset of the first byte, payload = the bytes
ACK = 2  # sid, value = bytes (and FIN) taken for good by the receiver
FIN = 3  # sid, value = offset of the end: the sender reads no more from its socket
HELLO = 4  # the agent's first frame on a carrier, payload = ``epoch host pid since keepalive``
WELCOME = 5  # the head's answer, payload = ``resumed|fresh pid``
PING = 6  # value = number
PONG = 7  # value = the number pinged
SHUTDOWN = 8  # the agent ends the relay: close every connection, exit
BYE = 9  # the head's last frame before it exits
REFUSED = 10  # to a session of another agent while this one's carrier lives; payload = its owner

Frame = Tuple[int, int, int, memoryview]


class WireError(Exception):
    """The byte stream does not hold frames (not our relay, or corrupted)."""


def encode(kind: int, sid: int = 0, value: int = 0, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    return HEADER.pack(kind, sid, value, len(payload)) + payload


class Decoder:
    """Turns the bytes of a carrier, as they come, into frames.

    Payloads are memoryviews into the bytes fed (no copy); a frame cut across
    reads is joined once, when its last byte arrives.
    """

    def __init__(self) -> None:
        self._parts: List[bytes] = []
        self._have = 0
        self._need = HEADER.size

    def feed(self, data: bytes) -> List[Frame]:
        """Add ``data``; returns every frame it completes, in order."""
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._parts)
            self._parts = []
            self._have = 0
        else:
            buf = bytes(data)
        view = memoryview(buf)
        frames: List[Frame] = []
        pos, size, need = 0, len(buf), HEADER.size
        while size - pos >= HEADER.size:
            kind, sid, value, length = HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME_PAYLOAD or kind < DATA or kind > REFUSED:
                raise WireError("bad frame header (kind %d, length %d)" % (kind, length))
            end = pos + HEADER.size + length
            if end > size:
                need = end - pos
                break
            frames.append((kind, sid, value, view[pos + HEADER.size : end]))
            pos = end
        if pos < size:
            rest = buf[pos:]
            self._parts = [rest]
            self._have = len(rest)
            self._need = need
        return frames

    @property
    def pending(self) -> int:
        """Bytes held that do not make a whole frame yet."""
        return self._have
