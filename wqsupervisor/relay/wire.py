"""The relay's frames: a fixed header and a payload, read incrementally from a byte stream.

This module runs on the head node too (see :mod:`wqsupervisor.relay.program`),
so it is written for Python 3.6: no f-strings with ``=``, no walrus, no
``from __future__ import annotations``, nothing outside the standard library.

A frame is ``kind`` (1 byte), ``sid`` (4 bytes: the stream), ``value``
(8 bytes: an offset, an acknowledgement or a ping number) and ``length``
(4 bytes), all big-endian, followed by ``length`` bytes of payload.
"""

import struct
from typing import List, Optional, Tuple

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
UNREACHABLE = 11  # a hop daemon to its node relay: the tunnel's port refused stream ``value``

Frame = Tuple[int, int, int, memoryview]


class WireError(Exception):
    """The byte stream does not hold frames (not our relay, or corrupted)."""


def encode(kind: int, sid: int = 0, value: int = 0, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    return HEADER.pack(kind, sid, value, len(payload)) + payload


class Decoder:
    """Turns the bytes of a carrier, as they come, into frames.

    Payloads are memoryviews into the bytes fed (no copy). A DATA frame cut
    across reads comes out in pieces, each with the offset of its first byte,
    as soon as its bytes arrive (the streams take any contiguous piece);
    every other frame comes out whole, its payload joined once.
    """

    def __init__(self) -> None:
        self._header = b""  # the start of a header cut across reads
        self._frame: Optional[Tuple[int, int, int, int]] = None  # whose payload is arriving
        self._got = 0  # of that payload, bytes already read
        self._parts: List[bytes] = []  # a control frame's payload so far

    def feed(self, data: bytes) -> List[Frame]:
        """Add ``data`` (bytes: the payloads are views of it); returns what it completes, in order."""
        view = memoryview(data)
        frames: List[Frame] = []
        pos, size = 0, len(view)
        while pos < size:
            if self._frame is None:
                if self._header or size - pos < HEADER.size:
                    take = min(HEADER.size - len(self._header), size - pos)
                    self._header += bytes(view[pos : pos + take])
                    pos += take
                    if len(self._header) < HEADER.size:
                        break
                    frame = HEADER.unpack(self._header)
                    self._header = b""
                else:
                    frame = HEADER.unpack_from(view, pos)
                    pos += HEADER.size
                kind, _sid, _value, length = frame
                if length > MAX_FRAME_PAYLOAD or kind < DATA or kind > UNREACHABLE:
                    raise WireError("bad frame header (kind %d, length %d)" % (kind, length))
                self._frame, self._got = frame, 0
            kind, sid, value, length = self._frame
            n = min(length - self._got, size - pos)
            if kind == DATA:
                if n or not length:
                    frames.append((DATA, sid, value + self._got, view[pos : pos + n]))
            elif n < length or self._parts:
                self._parts.append(bytes(view[pos : pos + n]))
            pos += n
            self._got += n
            if self._got == length:
                if kind != DATA:
                    if self._parts:
                        payload = memoryview(b"".join(self._parts))
                        self._parts = []
                    else:
                        payload = view[pos - n : pos]
                    frames.append((kind, sid, value, payload))
                self._frame = None
        return frames
