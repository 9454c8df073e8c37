"""Strict, sans-IO HTTP/1.1 request framing for bytes that come from clients.

We parse client requests ourselves rather than with h11 because the edge is where
request smuggling is stopped, and every ambiguity must become a 4xx with the
connection closed: Content-Length next to Transfer-Encoding, duplicate or
conflicting Content-Length, bad chunk sizes, obs-fold, bare LF, bad header names
or values, oversized heads. The parser is fed bytes and yields events; it never
touches a socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The head limits live with the compiled parser, which enforces them on the live path.
from edgeproxy.proxy._http1 import (
    MAX_CONTENT_LENGTH_DIGITS,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
)
from edgeproxy.proxy._http1 import parse_head as parse_head
from edgeproxy.proxy.messages import (
    END,
    NEED_DATA,
    Data,
    EndOfMessage,
    HttpError,
    NeedData,
    RequestHead,
)

# A chunk-size line (size + extensions) longer than this is malformed, not a big chunk.
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 8 * 1024
# 16 hex digits = 2**64 - 1; anything longer can only be an attack.
MAX_CHUNK_SIZE_DIGITS = 16

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# field-value: VCHAR, obs-text, SP and HTAB inside; no CTLs (this also bans bare CR/LF).
_FIELD_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]([\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?|")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)(;[\x20-\x7e\x80-\xff\t]*)?")
_BARE_LF = re.compile(rb"(?<!\r)\n")

# The usual shapes in one match each; anything else goes through the checks that
# name what is wrong. A field line: token ":" OWS field-value OWS.
_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) HTTP/1\.([0-9])"
)
_FIELD_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?)[ \t]*"
)
_FRAMING_FIELDS = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"connection", b"expect"}
)
_DIGITS = re.compile(rb"[0-9]+")


Event = RequestHead | Data | EndOfMessage


def _split_head_lines(head: bytes) -> list[bytes]:
    lines = head.split(b"\r\n")
    crlfs = len(lines) - 1
    # Every CR and every LF must belong to a CRLF: two C-level counts decide the
    # common case; only a head that breaks the rule is searched for which break.
    if head.count(b"\n") != crlfs or head.count(b"\r") != crlfs:
        if _BARE_LF.search(head):
            raise HttpError(400, "bare LF line ending")
        raise HttpError(400, "bare CR")
    return lines


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    match = _REQUEST_LINE.fullmatch(line)
    if match is not None:  # the usual shape in one pass; the checks below name errors
        method, target, minor = match.groups()
        if method != b"CONNECT" and target[:1] == b"/":
            return method, target, b"1.1" if minor != b"0" else b"1.0"
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "bad method")
    if not _TARGET.fullmatch(target):
        raise HttpError(400, "bad request target")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise HttpError(400, "bad HTTP version")
    if match.group(1) != b"1":
        raise HttpError(505, "HTTP version not supported")
    minor = b"1" if match.group(2) != b"0" else b"0"
    if method == b"CONNECT":
        raise HttpError(405, "CONNECT not supported")
    origin_or_absolute = target.startswith((b"/", b"http://", b"https://"))
    if not origin_or_absolute and not (target == b"*" and method == b"OPTIONS"):
        raise HttpError(400, "bad request target form")
    return method, target, b"1." + minor


def parse_header_lines(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: list[tuple[bytes, bytes]] = []
    field_line = _FIELD_LINE.fullmatch
    for line in lines:
        match = field_line(line)
        if match is not None:
            name, value = match.groups()
            headers.append((name.lower(), value))
            continue
        # Not a valid field line: say what is wrong with it.
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obs-fold header continuation")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "bad header name")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise HttpError(400, "bad header value")
        headers.append((name.lower(), value))
    return headers


def _comma_list(values: list[bytes]) -> list[bytes]:
    return [item.strip(b" \t").lower() for value in values for item in value.split(b",")]


def interpret_framing(head: RequestHead) -> None:
    """Decide body framing; refuse every ambiguous shape (the smuggling defences)."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in head.headers:
        if name in _FRAMING_FIELDS:
            found.setdefault(name, []).append(value)
    lengths = found.get(b"content-length", [])
    codings = found.get(b"transfer-encoding", [])
    hosts = found.get(b"host", [])
    if head.http_version == b"1.1" and len(hosts) != 1:
        raise HttpError(400, "exactly one Host header required")
    if len(hosts) > 1:
        raise HttpError(400, "duplicate Host header")
    if codings and lengths:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if codings:
        if head.http_version == b"1.0":
            raise HttpError(400, "Transfer-Encoding in HTTP/1.0")
        if _comma_list(codings) != [b"chunked"]:
            raise HttpError(501, "unsupported Transfer-Encoding")
        head.chunked = True
    if lengths:
        if len(lengths) != 1:
            raise HttpError(400, "duplicate Content-Length")
        value = lengths[0]
        if not _DIGITS.fullmatch(value) or len(value) > MAX_CONTENT_LENGTH_DIGITS:
            raise HttpError(400, "bad Content-Length")
        head.content_length = int(value)
    connection = _comma_list(found.get(b"connection", []))
    if head.http_version == b"1.0":
        head.keep_alive = b"keep-alive" in connection
    else:
        head.keep_alive = b"close" not in connection
    expect = found.get(b"expect")
    head.expect_continue = expect is not None and expect[0].lower() == b"100-continue"


def check_incomplete_head(buffer: bytes | bytearray) -> None:
    """Refuse a head that is not complete yet but can already not be valid."""
    if _BARE_LF.search(buffer):
        raise HttpError(400, "bare LF line ending")
    line_end = buffer.find(b"\r\n")
    if (line_end < 0 and len(buffer) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    if len(buffer) > MAX_HEAD:
        raise HttpError(431, "request head too large")


def reference_parse_head(block: bytes) -> RequestHead:
    """A whole request head (request line and fields, without the blank line),
    validated and with its framing decided; HttpError for anything malformed.

    The readable specification of ``parse_head`` (the compiled ``_http1`` twin that
    serves requests); tests hold the two equal."""
    lines = _split_head_lines(block)
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    method, target, version = parse_request_line(lines[0])
    head = RequestHead(method, target, version, parse_header_lines(lines[1:]))
    interpret_framing(head)
    return head


@dataclass(slots=True)
class RequestParser:
    """Feed client bytes, take events: RequestHead, Data*, EndOfMessage, repeat.

    One request at a time: after EndOfMessage the parser waits for ``next_request()``
    so pipelined requests are answered in order. Raises HttpError on anything
    malformed; the caller answers with that status and closes.
    """

    buffer: bytearray = field(default_factory=bytearray)
    # head | length | chunk_size | chunk_data | chunk_crlf | trailers | done_pending | done
    _state: str = "head"
    _remaining: int = 0
    # The trailer fields of the current request's chunked body (names lower-case),
    # once EndOfMessage was returned; the edge passes them on (headers.py rules).
    trailers: tuple[tuple[bytes, bytes], ...] = ()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_request(self) -> None:
        if self._state != "done":
            raise RuntimeError("next_request() before the current request ended")
        self._state = "head"
        self.trailers = ()

    @property
    def in_head(self) -> bool:
        return self._state == "head"

    @property
    def between_requests(self) -> bool:
        """True when no byte of the next request has arrived yet (idle keep-alive)."""
        return self._state in ("head", "done") and not self.buffer.strip(b"\r\n")

    def probe_body(self) -> bool:
        """Check the body bytes buffered so far without consuming them.

        Raises HttpError if they are malformed; True once at least one body event
        (a chunk, or the end) is complete. Lets the edge refuse a bad chunked body
        that arrived with its head before any machine sees the request.
        """
        probe = RequestParser(bytearray(self.buffer), self._state, self._remaining)
        progressed = False
        while True:
            event = probe.next_event()
            if isinstance(event, NeedData):
                return progressed
            progressed = True
            if isinstance(event, EndOfMessage):
                return True

    def next_event(self) -> Event | NeedData:
        state = self._state
        if state == "head":
            return self._read_head()
        if state == "length":
            return self._read_length_body()
        if state == "chunk_size":
            return self._read_chunk_size()
        if state == "chunk_data":
            return self._read_chunk_data()
        if state == "chunk_crlf":
            return self._read_chunk_crlf()
        if state == "trailers":
            return self._read_trailers()
        if state == "done_pending":
            self._state = "done"
            return END
        return NEED_DATA

    def _read_head(self) -> RequestHead | NeedData:
        # RFC 9112 2.2: ignore empty lines before a request line (robustness).
        while self.buffer.startswith(b"\r\n"):
            del self.buffer[:2]
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            self._check_incomplete_head()
            return NEED_DATA
        if end + 4 > MAX_HEAD:
            raise HttpError(431, "request head too large")
        head = parse_head(bytes(self.buffer[:end]))
        del self.buffer[: end + 4]
        if head.chunked:
            self._state = "chunk_size"
        elif head.content_length:
            self._state = "length"
            self._remaining = head.content_length
        else:
            self._state = "done_pending"
        return head

    def _check_incomplete_head(self) -> None:
        check_incomplete_head(self.buffer)

    def _read_length_body(self) -> Data | EndOfMessage | NeedData:
        if self._remaining == 0:
            self._state = "done"
            return END
        if not self.buffer:
            return NEED_DATA
        take = min(self._remaining, len(self.buffer))
        chunk = bytes(self.buffer[:take])
        del self.buffer[:take]
        self._remaining -= take
        return Data(chunk)

    def _read_chunk_size(self) -> Event | NeedData:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            if b"\n" in self.buffer or len(self.buffer) > MAX_CHUNK_LINE:
                raise HttpError(400, "bad chunk size line")
            return NEED_DATA
        line = bytes(self.buffer[:end])
        if len(line) > MAX_CHUNK_LINE or b"\r" in line or b"\n" in line:
            raise HttpError(400, "bad chunk size line")
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None or len(match.group(1)) > MAX_CHUNK_SIZE_DIGITS:
            raise HttpError(400, "bad chunk size")
        del self.buffer[: end + 2]
        size = int(match.group(1), 16)
        if size == 0:
            self._state = "trailers"
            return self._read_trailers()
        self._remaining = size
        self._state = "chunk_data"
        return self._read_chunk_data()

    def _read_chunk_data(self) -> Data | NeedData:
        if not self.buffer:
            return NEED_DATA
        take = min(self._remaining, len(self.buffer))
        chunk = bytes(self.buffer[:take])
        del self.buffer[:take]
        self._remaining -= take
        if self._remaining == 0:
            self._state = "chunk_crlf"
        return Data(chunk)

    def _read_chunk_crlf(self) -> Event | NeedData:
        if len(self.buffer) < 2:
            if self.buffer and self.buffer != b"\r":
                raise HttpError(400, "chunk data not followed by CRLF")
            return NEED_DATA
        if self.buffer[:2] != b"\r\n":
            raise HttpError(400, "chunk data not followed by CRLF")
        del self.buffer[:2]
        self._state = "chunk_size"
        return self._read_chunk_size()

    def _read_trailers(self) -> EndOfMessage | NeedData:
        # Trailers are validated like headers and kept; the body is re-framed.
        if self.buffer.startswith(b"\r\n"):
            del self.buffer[:2]
            self._state = "done"
            return END
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if _BARE_LF.search(self.buffer) or len(self.buffer) > MAX_TRAILERS:
                raise HttpError(400, "bad trailer section")
            return NEED_DATA
        if end > MAX_TRAILERS:
            raise HttpError(431, "trailers too large")
        trailer_bytes = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        self.trailers = tuple(parse_header_lines(_split_head_lines(trailer_bytes)))
        self._state = "done"
        return END
