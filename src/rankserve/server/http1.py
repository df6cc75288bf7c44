"""Where the HTTP/1.1 messages on one proxied connection begin and end (RFC 9112 framing only).

The proxy copies bytes as they are; to close an HTTP connection at a stop without cutting an
answer in half it needs to know when the connection is between messages: every request the
client sent has been answered in full. :class:`H1Messages` reads the start lines and headers
going by and follows each body by its ``Content-Length`` or its chunks; it never looks inside a
body. Whatever it cannot follow (bytes that are not HTTP/1.x, an answer that runs until the
connection closes, a protocol switch, a header section past 64 KiB) makes it give up:
:attr:`H1Messages.readable` turns False and the proxy falls back to watching for quiet.
"""

from __future__ import annotations

import re
from collections import deque

MAX_HEAD = 64 * 1024
"""The longest start line plus header section followed; a longer one gives up (Triton's own limit is lower)."""

_REQUEST_LINE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/1\.[01]$")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([0-9]{3})(?: .*)?$")


class _NotFollowable(Exception):
    pass


class _Side:
    """One direction's framing: a head (start line and headers), then a body of known length or
    of chunks, then the next head."""

    def __init__(self) -> None:
        self.head = b""          # the head read so far (state "head")
        self.state = "head"      # head | body | chunk-size | chunk-data | chunk-end | trailers
        self.left = 0            # body or chunk bytes still to come
        self.line = b""          # a chunk-size or trailer line read so far

    @property
    def at_rest(self) -> bool:
        return self.state == "head" and not self.head


class H1Messages:
    """The requests and answers of one HTTP/1.1 connection, from the bytes of both directions.

    ``feed(data, from_client)`` takes the bytes as they pass. :attr:`between_messages` is True when
    every request seen so far has been answered in full and neither side is part-way through a
    message: closing the connection then cuts nothing."""

    def __init__(self) -> None:
        self.readable = True
        self._sides = {True: _Side(), False: _Side()}
        self._unanswered: deque[bytes] = deque()  # the methods of requests not yet answered in full
        self.requests = 0
        self.answers = 0

    @property
    def between_messages(self) -> bool:
        return self.readable and not self._unanswered and all(s.at_rest for s in self._sides.values())

    def feed(self, data: bytes, from_client: bool) -> None:
        if not self.readable:
            return
        try:
            side = self._sides[from_client]
            while data:
                data = self._step(side, data, from_client)
        except _NotFollowable:
            self.readable = False

    # -- framing --------------------------------------------------------------------------------
    def _step(self, side: _Side, data: bytes, from_client: bool) -> bytes:
        if side.state == "head":
            end = (side.head[-3:] + data).find(b"\r\n\r\n")
            if end < 0:
                side.head += data
                if len(side.head) > MAX_HEAD or not _plausible_start(side.head, from_client):
                    raise _NotFollowable
                return b""
            cut = end - min(3, len(side.head)) + 4  # bytes of data that finish the head
            head, side.head = side.head + data[:cut], b""
            if len(head) > MAX_HEAD:
                raise _NotFollowable
            self._head(side, head, from_client)
            return data[cut:]
        if side.state in ("body", "chunk-data"):
            take = min(side.left, len(data))
            side.left -= take
            if not side.left:
                if side.state == "body":
                    self._message_end(side, from_client)
                else:
                    side.state, side.line = "chunk-end", b""
            return data[take:]
        # line states: chunk-size, chunk-end (the CRLF after a chunk's data), trailers
        end = data.find(b"\n")
        if end < 0:
            side.line += data
            if len(side.line) > MAX_HEAD:
                raise _NotFollowable
            return b""
        line, side.line = (side.line + data[:end]).rstrip(b"\r"), b""
        rest = data[end + 1:]
        if side.state == "chunk-size":
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _NotFollowable from None
            side.state, side.left = ("trailers", 0) if size == 0 else ("chunk-data", size)
        elif side.state == "chunk-end":
            if line:
                raise _NotFollowable
            side.state = "chunk-size"
        elif not line:  # trailers end with an empty line
            self._message_end(side, from_client)
        return rest

    def _head(self, side: _Side, head: bytes, from_client: bool) -> None:
        lines = head.split(b"\r\n")
        start, fields = lines[0], _fields(lines[1:])
        if from_client:
            if not _REQUEST_LINE.match(start):
                raise _NotFollowable
            method = start.split(b" ", 1)[0]
            self._unanswered.append(method)
            self.requests += 1
            no_body = False
        else:
            status = _STATUS_LINE.match(start)
            if status is None or not self._unanswered:
                raise _NotFollowable
            code = int(status.group(1))
            if code == 101:  # switching protocols: no longer HTTP/1.1
                raise _NotFollowable
            if 100 <= code < 200:  # an interim answer (100 Continue): the final one is still to come
                return
            no_body = self._unanswered[0] == b"HEAD" or code in (204, 304)
        chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
        length = fields.get(b"content-length")
        if no_body:
            self._message_end(side, from_client)
        elif chunked:
            side.state = "chunk-size"
        elif length is not None:
            if not length.strip().isdigit():
                raise _NotFollowable
            side.left = int(length)
            if side.left:
                side.state = "body"
            else:
                self._message_end(side, from_client)
        elif from_client:  # a request with neither has no body (RFC 9112, 6.3)
            self._message_end(side, from_client)
        else:  # an answer that runs until the connection closes
            raise _NotFollowable

    def _message_end(self, side: _Side, from_client: bool) -> None:
        side.state, side.left, side.line = "head", 0, b""
        if not from_client:
            self._unanswered.popleft()
            self.answers += 1


def _fields(lines: list[bytes]) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise _NotFollowable
        key = name.strip().lower()
        fields[key] = fields[key] + b"," + value.strip() if key in fields else value.strip()
    return fields


def _plausible_start(head: bytes, from_client: bool) -> bool:
    """Whether a head still incomplete can begin an HTTP/1.x message (so TLS or another protocol
    is given up on at its first line, not after 64 KiB)."""
    first = head.split(b"\r\n", 1)
    if len(first) == 1 and b"\n" not in head:
        return len(head) < 8 * 1024 and (not head or head[:1].isalpha())
    line = first[0] if len(first) > 1 else head.split(b"\n", 1)[0]
    return bool((_REQUEST_LINE if from_client else _STATUS_LINE).match(line))
