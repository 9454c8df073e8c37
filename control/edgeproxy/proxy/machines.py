"""HTTP/1.1 to machines on this host's network, with a keep-alive pool per
machine. Used by the worker for backhauled requests and by the edge for machines
on its own host. ``responses.ResponseParser`` frames the machine's responses (the
machine side is not where smuggling comes from, but framing must be right).

Hot-path rules: a request without a body is one ``write`` and no extra task; the
response-head deadline is one timer (``asyncio.timeout``), not a task per read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeproxy.proxy import headers as h
from edgeproxy.proxy._http1 import UnsendableRequest as UnsendableRequest
from edgeproxy.proxy.bodies import BodyReader, ReplayableBody, trailers_of
from edgeproxy.proxy.messages import END, NEED_DATA, Data, ResponseError, ResponseHead
from edgeproxy.proxy.responses import NO_TRAILERS, ResponseParser, forwarded_informational
from edgeproxy.proxy.upstream import (
    ClientBodyError,
    ConnectFailed,
    Headers,
    Informational,
    SocketTunnel,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
)

READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class MachineRequest:
    method: bytes
    target: bytes
    headers: Headers  # includes host; no framing headers (added here)
    body: ReplayableBody | None  # None: the request has no body
    content_length: int | None = None
    websocket: bool = False
    # Where the machine's interim (1xx) responses go (None: dropped, e.g. HTTP/1.0).
    informational: Informational | None = None


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: ResponseParser = field(default_factory=ResponseParser)
    idle_since: float = 0.0
    reused: bool = False

    def usable(self, now: float, idle_timeout: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and not self.reader._buffer  # type: ignore[attr-defined]  # unexpected bytes: the peer is confused
            and now - self.idle_since < idle_timeout
        )


class _StaleConnection(Exception):
    """A pooled connection was closed by the machine before it answered."""


def serialize_head(request: MachineRequest) -> bytes:
    """The request head bytes, with our framing headers; refuses header injection."""
    headers = request.headers
    parts = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if request.websocket:
        parts.append(b"connection: Upgrade\r\nupgrade: websocket\r\n")
        lines = len(headers) + 3
    elif request.body is not None:
        if request.content_length is not None:
            parts += (b"content-length: ", b"%d" % request.content_length, b"\r\n")
        else:
            parts.append(b"transfer-encoding: chunked\r\n")
        lines = len(headers) + 2
    else:
        lines = len(headers) + 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Every CR and LF must be one of ours: a field carrying one would split the head.
    if head.count(b"\n") != lines + 1 or head.count(b"\r") != lines + 1 or b"\0" in head:
        raise UnsendableRequest("CR, LF or NUL in the request line or a header field")
    if b" " in request.target or b" " in request.method:
        raise UnsendableRequest("space in the request line")
    return head


class MachinePool:
    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        idle_per_machine: int = 256,
        idle_timeout: float = 4.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_per_machine = idle_per_machine
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.writer.close()
        self._idle.clear()

    def _take_idle(self, key: tuple[str, int]) -> _Conn | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if conn.usable(now, self.idle_timeout):
                conn.reused = True
                return conn
            conn.writer.close()
        return None

    def _put_idle(self, key: tuple[str, int], conn: _Conn) -> None:
        conns = self._idle.get(key)
        if conns is None:
            conns = self._idle[key] = []
        if len(conns) >= self.idle_per_machine:
            conn.writer.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _connect(self, address: str, port: int) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(address, port, limit=READ_SIZE)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"{address}:{port}: {exc!r}") from exc
        return _Conn(reader, writer)

    async def exchange(
        self, address: str, port: int, request: MachineRequest, response_timeout: float
    ) -> UpstreamResponse:
        """Send one request; return once the response head is in."""
        try:
            head = serialize_head(request)
        except UnsendableRequest as exc:
            raise ConnectFailed(f"cannot send request: {exc}") from exc
        key = (address, port)
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return await self._exchange_on(key, conn, head, request, response_timeout)
            except _StaleConnection:
                # Keep-alive race: the machine closed as we reused. Safe to resend
                # on a fresh connection only if we can resend the body.
                if request.body is not None and not request.body.replayable:
                    raise UpstreamReset("pooled connection closed") from None
        conn = await self._connect(address, port)
        try:
            return await self._exchange_on(key, conn, head, request, response_timeout)
        except _StaleConnection as exc:
            raise UpstreamReset(f"{address}:{port} closed the connection") from exc

    async def _exchange_on(
        self,
        key: tuple[str, int],
        conn: _Conn,
        head: bytes,
        request: MachineRequest,
        response_timeout: float,
    ) -> UpstreamResponse:
        conn.parser.start(b"GET" if request.websocket else request.method)
        upload: asyncio.Future[None] | None = None
        if request.body is None:
            conn.writer.write(head)
        else:
            chunked = request.content_length is None and not request.websocket
            upload = asyncio.ensure_future(
                _upload(conn, head, request.body.cursor(), chunked, request.content_length)
            )
        try:
            async with asyncio.timeout(response_timeout):
                response = await self._read_head(conn, upload, request.informational)
        except TimeoutError as exc:
            await _cancel(upload)
            conn.writer.close()
            raise UpstreamTimeout("no response head in time") from exc
        except BaseException:
            await _cancel(upload)
            conn.writer.close()
            raise
        if response.status == 101:
            await _cancel(upload)
            leftover = bytes(conn.parser.buffer)
            conn.parser.buffer.clear()
            tunnel = SocketTunnel(conn.reader, conn.writer, leftover)
            return UpstreamResponse(101, response.reason, response.headers, _NoBody(), tunnel)
        reader = _ResponseBody(self, key, conn, upload)
        return UpstreamResponse(
            response.status,
            response.reason,
            response.headers,
            reader,
            None,
            reader.finish,
        )

    async def _read_head(
        self,
        conn: _Conn,
        upload: asyncio.Future[None] | None,
        informational: Informational | None,
    ) -> ResponseHead:
        received_any = False
        parser = conn.parser
        while True:
            try:
                event = parser.next_event()
            except ResponseError as exc:
                if not received_any and conn.reused and parser.eof and not parser.buffer:
                    raise _StaleConnection() from exc
                raise UpstreamReset(f"bad response from machine: {exc}") from exc
            if event is NEED_DATA:
                if upload is not None and upload.done() and upload.exception() is not None:
                    _raise_upload_error(upload, conn.reused and not received_any)
                data = await self._recv(conn, upload)
                if not data:
                    if conn.reused and not received_any:
                        raise _StaleConnection()
                    raise UpstreamReset("machine closed before answering")
                received_any = True
                parser.feed(data)
                continue
            if isinstance(event, ResponseHead):
                status = event.status
                if status < 200 and status != 101:
                    # Interim: passed on as it comes (the parser bounds how many);
                    # the final head follows.
                    if informational is not None and forwarded_informational(status):
                        informational(status, event.reason, event.headers)
                    continue
                return event
            raise UpstreamReset(f"unexpected event {event!r}")

    async def _recv(self, conn: _Conn, upload: asyncio.Future[None] | None) -> bytes:
        """Read from the machine, but notice a failed upload (client body error) at once."""
        if upload is None or upload.done():
            try:
                return await conn.reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                if conn.reused:
                    raise _StaleConnection() from exc
                raise UpstreamReset(repr(exc)) from exc
        read = asyncio.ensure_future(conn.reader.read(READ_SIZE))
        try:
            both: set[asyncio.Future[Any]] = {read, upload}
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if upload.done() and upload.exception() is not None and not read.done():
                _raise_upload_error(upload, False)
            return await read
        except (ConnectionError, OSError) as exc:
            if conn.reused:
                raise _StaleConnection() from exc
            raise UpstreamReset(repr(exc)) from exc
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read


async def _upload(
    conn: _Conn, head: bytes, body: BodyReader, chunked: bool, length: int | None
) -> None:
    writer = conn.writer
    writer.write(head)
    sent = 0
    while chunk := await body.read():
        sent += len(chunk)
        if length is not None and sent > length:
            raise UpstreamReset("request body longer than its Content-Length")
        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        await writer.drain()
    if chunked:
        # The client's trailer fields ride in the last chunk; with Content-Length
        # framing toward the machine there is no place for them (dropped, 9110 6.5.1).
        writer.write(h.last_chunk(h.forwardable_request_trailers(trailers_of(body))))
    elif length is not None and sent != length:
        raise UpstreamReset("request body shorter than its Content-Length")
    await writer.drain()


def _raise_upload_error(upload: asyncio.Future[None], stale: bool) -> None:
    error = upload.exception()
    if isinstance(error, ClientBodyError):
        raise error
    if stale:
        raise _StaleConnection()
    raise UpstreamReset(f"sending the request failed: {error!r}")


async def _cancel(task: asyncio.Future[None] | None) -> None:
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


class _NoBody:
    async def read(self) -> bytes:
        return b""


class _ResponseBody:
    """Streams the machine's response body; returns the connection to the pool when
    both directions finished cleanly."""

    __slots__ = ("_conn", "_done", "_key", "_pool", "_trailers", "_upload")

    def __init__(
        self,
        pool: MachinePool,
        key: tuple[str, int],
        conn: _Conn,
        upload: asyncio.Future[None] | None,
    ) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self._upload = upload
        self._done = False
        self._trailers = NO_TRAILERS

    def trailers(self) -> Sequence[tuple[bytes, bytes]]:
        """The machine's trailer fields, once the body was read to its end."""
        return self._trailers

    async def read(self) -> bytes:
        conn = self._conn
        parser = conn.parser
        while not self._done:
            try:
                event = parser.next_event()
            except ResponseError as exc:
                raise UpstreamReset(f"bad response body: {exc}") from exc
            if event is NEED_DATA:
                try:
                    async with asyncio.timeout(self._pool.read_timeout):
                        data = await conn.reader.read(READ_SIZE)
                except (ConnectionError, OSError, TimeoutError) as exc:
                    raise UpstreamReset(f"reading response body: {exc!r}") from exc
                parser.feed(data)
                continue
            if isinstance(event, Data):
                return event.data
            if event is END:
                self._done = True
                self._trailers = parser.trailers  # before the parser serves another
        return b""

    def read_ready(self) -> bytes | None:
        """The next chunk if it is already buffered (b"" at the end), else None: no I/O."""
        if self._done:
            return b""
        parser = self._conn.parser
        while True:
            try:
                event = parser.next_event()
            except ResponseError:
                return None  # let read() raise it
            if event is NEED_DATA:
                return None
            if isinstance(event, Data):
                return event.data
            if event is END:
                self._done = True
                self._trailers = parser.trailers
                return b""

    async def finish(self) -> None:
        conn = self._conn
        upload = self._upload
        reusable = False
        if not self._done:
            self.read_ready()  # a bodiless response (HEAD, 204, 304) ends without I/O
        if self._done and (upload is None or (upload.done() and not upload.cancelled())):
            reusable = (
                (upload is None or upload.exception() is None)
                and conn.parser.done
                and conn.parser.keep_alive
                and not conn.parser.buffer
            )
        else:
            await _cancel(upload)
        if reusable:
            conn.reused = False
            self._pool._put_idle(self._key, conn)
        else:
            conn.writer.close()
