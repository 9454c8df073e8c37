"""Sans-IO HTTP/1.1 response framing for bytes that come from machines.

The machine side is not where smuggling comes from, but framing must be right:
a response is framed exactly as RFC 9112 6.3 says (HEAD, 1xx, 204 and 304 carry
no body; chunked; Content-Length; else until the machine closes), and anything
malformed is an error, which the caller turns into a reset (502). Interim (1xx)
heads are returned before the final one, at most ``MAX_INFORMATIONAL`` per
response; the trailer fields of a chunked body are parsed like a head's fields
and kept in ``trailers`` for the caller to forward. Written for the
hot path: one ``find`` per head, no per-byte Python loops, no copies beyond one
``bytes()`` per body chunk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from edgeproxy.proxy._http1 import (
    MAX_CHUNK_LINE,
    MAX_CHUNK_SIZE,
    MAX_INFORMATIONAL,
    MAX_TRAILERS,
    NO_TRAILERS,
    ResponseParser,
    response_head,
)
from edgeproxy.proxy._http1 import MAX_RESPONSE_HEAD as MAX_HEAD
from edgeproxy.proxy.messages import (
    END,
    NEED_DATA,
    Data,
    EndOfMessage,
    NeedData,
    ResponseError,
    ResponseHead,
)

__all__ = ["NO_TRAILERS", "ResponseParser", "forwarded_informational"]

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;[^\r\n]*)?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# At a line start: name ":" OWS value CRLF, value without CR/LF (trailing OWS
# stripped after).
_FIELD_LINE = re.compile(
    rb"(?:(?<=\n)|\A)([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*)\r\n"
)
_FRAMING = frozenset({b"connection", b"transfer-encoding", b"content-length"})


# states
_HEAD, _LENGTH, _CHUNK_SIZE_S, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)
_END_PENDING = 8  # a response without a body: END comes next


# Hot-path note: CPython 3.11 builds a function object for every comprehension it
# runs, which costs more than the loop itself on lists this short; so plain loops.
def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    tokens = []
    for k, v in headers:
        if k == name:
            for t in v.split(b","):
                t = t.strip(b" \t")
                if t:
                    tokens.append(t.lower())
    return tokens


class ReferenceParser:
    """Feed bytes, take events: ResponseHead (1xx first, if any), Data*, END.

    ``start(method)`` before each request's response (the method decides whether a
    body follows). ``keep_alive`` tells whether the connection may carry another.
    The readable specification of the compiled ``_http1.ResponseParser`` that
    frames every response (exported here as ``ResponseParser``); tests hold the
    two equal on generated response streams.
    """

    __slots__ = (
        "_informational",
        "_method",
        "_remaining",
        "_state",
        "buffer",
        "eof",
        "keep_alive",
        "trailers",
    )

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._state = _DONE
        self._remaining = 0
        self._method = b"GET"
        self._informational = 0
        self.keep_alive = True
        self.eof = False
        # The trailer fields of the last chunked body (names lower-case), once END
        # was returned; NO_TRAILERS otherwise.
        self.trailers: Sequence[tuple[bytes, bytes]] = NO_TRAILERS

    def start(self, method: bytes) -> None:
        self._state = _HEAD
        self._method = method
        self._informational = 0
        self.keep_alive = True
        self.trailers = NO_TRAILERS

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> None:
        if data:
            self.buffer += data
        else:
            self.eof = True

    def next_event(self) -> ResponseHead | Data | EndOfMessage | NeedData:
        state = self._state
        if state == _HEAD:
            return self._read_head()
        if state == _LENGTH:
            return self._read_length()
        if state == _UNTIL_CLOSE:
            if self.buffer:
                chunk = bytes(self.buffer)
                self.buffer.clear()
                return Data(chunk)
            if self.eof:
                self._state = _DONE
                return END
            return NEED_DATA
        if state == _END_PENDING:
            self._state = _DONE
            return END
        if state in (_CHUNK_SIZE_S, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS):
            event = self._read_chunked()
            if event is NEED_DATA and self.eof:
                raise ResponseError("machine closed inside a chunked body")
            return event
        return NEED_DATA

    # -- head ------------------------------------------------------------------
    def _read_head(self) -> ResponseHead | NeedData:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise ResponseError("response head too large")
            if self.eof:
                raise ResponseError("machine closed before the response head")
            return NEED_DATA
        if end + 4 > MAX_HEAD:
            raise ResponseError("response head too large")
        block = bytes(buf[:end])
        del buf[: end + 4]
        head, framing = response_head(block)
        status = head.status
        version = head.http_version
        connection = _tokens(framing, b"connection") if framing else []
        if version == b"1.0":
            self.keep_alive = b"keep-alive" in connection
        else:
            self.keep_alive = b"close" not in connection
        if status < 200:
            if status == 101:
                self._state = _DONE  # the connection is a tunnel now
                self.keep_alive = False
            else:  # other 1xx: the final response follows; stay in _HEAD
                self._informational += 1
                if self._informational > MAX_INFORMATIONAL:
                    raise ResponseError("too many interim (1xx) responses from machine")
            return head
        if self._method == b"HEAD" or status in (204, 304):
            self._state = _END_PENDING
            return head
        codings = []
        lengths = []
        for name, value in framing:
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings = _tokens(framing, b"transfer-encoding")
        if codings:
            if codings != [b"chunked"]:
                raise ResponseError("unsupported Transfer-Encoding from machine")
            if lengths:
                self.keep_alive = False  # RFC 9112 6.3: TE wins, then close
            self._state = _CHUNK_SIZE_S
        elif lengths:
            if len(lengths) == 1 and b"," not in lengths[0]:
                value = lengths[0].strip(b" \t")  # the usual one value
            else:
                values = {item.strip(b" \t") for v in lengths for item in v.split(b",")}
                if len(values) != 1:
                    raise ResponseError("conflicting Content-Length from machine")
                value = values.pop()
            if not _DIGITS.fullmatch(value):
                raise ResponseError("bad Content-Length from machine")
            self._remaining = int(value)
            self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        return head

    # -- bodies ------------------------------------------------------------------
    def _read_length(self) -> Data | EndOfMessage | NeedData:
        remaining = self._remaining
        if remaining == 0:
            self._state = _DONE
            return END
        buf = self.buffer
        if not buf:
            if self.eof:
                raise ResponseError("machine closed inside the body")
            return NEED_DATA
        if len(buf) <= remaining:
            chunk = bytes(buf)
            buf.clear()
        else:
            chunk = bytes(buf[:remaining])
            del buf[:remaining]
        self._remaining = remaining - len(chunk)
        return Data(chunk)

    def _read_chunked(self) -> Data | EndOfMessage | NeedData:
        buf = self.buffer
        while True:
            state = self._state
            if state == _CHUNK_SIZE_S:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise ResponseError("bad chunk size line from machine")
                    return NEED_DATA
                match = _CHUNK_SIZE.fullmatch(buf, 0, end)
                if match is None:
                    raise ResponseError("bad chunk size from machine")
                size = int(match.group(1), 16)
                if size > MAX_CHUNK_SIZE:
                    raise ResponseError("bad chunk size from machine")
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if not buf:
                    return NEED_DATA
                remaining = self._remaining
                if len(buf) <= remaining:
                    chunk = bytes(buf)
                    buf.clear()
                else:
                    chunk = bytes(buf[:remaining])
                    del buf[:remaining]
                self._remaining = remaining - len(chunk)
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
                return Data(chunk)
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return NEED_DATA
                if buf[:2] != b"\r\n":
                    raise ResponseError("chunk not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE_S
            else:  # the trailer section: kept in ``trailers`` for the caller
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    self._state = _DONE
                    return END
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_TRAILERS:
                        raise ResponseError("trailers too large")
                    return NEED_DATA
                if end + 4 > MAX_TRAILERS:
                    raise ResponseError("trailers too large")
                block = bytes(buf[: end + 2])
                del buf[: end + 4]
                if b"\0" in block:
                    raise ResponseError("NUL in trailers")
                trailers = []
                for name, value in _field_lines(block, "trailer section"):
                    trailers.append((name.lower(), value.rstrip(b" \t")))
                self.trailers = trailers
                self._state = _DONE
                return END


def reference_response_head(block: bytes) -> tuple[ResponseHead, list[tuple[bytes, bytes]]]:
    """A machine's response head (without the blank line) as ``(head, framing)``:
    the readable specification of the compiled ``_http1.response_head`` that
    serves responses; tests hold the two equal."""
    line_end = block.find(b"\r\n")
    status_line = block if line_end < 0 else block[:line_end]
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise ResponseError(f"bad status line {status_line[:80]!r}")
    if b"\0" in block:
        raise ResponseError("NUL in response head")
    fields = []
    if line_end >= 0:
        fields = _field_lines(block[line_end + 2 :] + b"\r\n", "response header section")
    headers = []
    framing = []
    for name, value in fields:
        field = (name.lower(), value.rstrip(b" \t"))
        headers.append(field)
        if field[0] in _FRAMING:
            framing.append(field)
    version = b"1." + match.group(1)
    return ResponseHead(int(match.group(2)), match.group(3) or b"", headers, version), framing


def _field_lines(rest: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of a field section (each line ending in CRLF), names
    as sent; ResponseError if any line is not a whole, well-formed field.

    One C-level pass over the field lines, each match anchored at a line start; with
    every CR and LF part of a CRLF, as many matches as lines means every line is a
    whole field (no bare CR/LF, obs-fold, bad name)."""
    fields: list[tuple[bytes, bytes]] = _FIELD_LINE.findall(rest)
    lines = rest.count(b"\r\n")
    if not (len(fields) == lines == rest.count(b"\n") == rest.count(b"\r")):
        raise ResponseError(f"malformed {what}")
    return fields


def forwarded_informational(status: int) -> bool:
    """Whether a machine's 1xx goes on toward the client (RFC 9110 15.2: a proxy
    MUST forward 1xx responses unless it asked for them itself).

    Not 100 Continue: the edge answers ``Expect: 100-continue`` itself and strips
    Expect toward the machine, so a 100 from the machine would be a duplicate. Not
    101: that is the upgrade, which ends the HTTP exchange (tunnels handle it)."""
    return status != 100 and status != 101
