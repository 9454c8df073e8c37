"""HTTP/1.1 to machines on this host's network, with a small keep-alive pool per
machine. Used by the worker for backhauled requests and by the edge for machines
on its own host. h11 frames the machine's responses (it is strict where we need
it: the machine side is not where smuggling comes from, but framing must be right).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import h11

from edgeproxy.proxy.bodies import BodyReader, ReplayableBody
from edgeproxy.proxy.upstream import (
    ClientBodyError,
    ConnectFailed,
    Headers,
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


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection
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


class MachinePool:
    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        idle_per_machine: int = 16,
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
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if conn.usable(now, self.idle_timeout):
                conn.reused = True
                return conn
            conn.writer.close()
        return None

    def _put_idle(self, key: tuple[str, int], conn: _Conn) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) >= self.idle_per_machine:
            conn.writer.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _connect(self, address: str, port: int) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address, port, limit=READ_SIZE), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"{address}:{port}: {exc!r}") from exc
        return _Conn(
            reader, writer, h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        )

    async def exchange(
        self, address: str, port: int, request: MachineRequest, response_timeout: float
    ) -> UpstreamResponse:
        """Send one request; return once the response head is in."""
        key = (address, port)
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return await self._exchange_on(key, conn, request, response_timeout)
            except _StaleConnection:
                # Keep-alive race: the machine closed as we reused. Safe to resend
                # on a fresh connection only if we can resend the body.
                if request.body is not None and not request.body.replayable:
                    raise UpstreamReset("pooled connection closed") from None
        conn = await self._connect(address, port)
        try:
            return await self._exchange_on(key, conn, request, response_timeout)
        except _StaleConnection as exc:
            raise UpstreamReset(f"{address}:{port} closed the connection") from exc

    async def _exchange_on(
        self, key: tuple[str, int], conn: _Conn, request: MachineRequest, response_timeout: float
    ) -> UpstreamResponse:
        headers = list(request.headers)
        if request.websocket:
            headers += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
        elif request.body is not None:
            if request.content_length is not None:
                headers.append((b"content-length", str(request.content_length).encode()))
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        try:
            head = conn.h11.send(
                h11.Request(method=request.method, target=request.target, headers=headers)
            )
        except h11.LocalProtocolError as exc:
            conn.writer.close()
            raise ConnectFailed(f"cannot send request: {exc}") from exc
        body = request.body.cursor() if request.body is not None else None
        upload = asyncio.ensure_future(self._upload(conn, head or b"", body))
        try:
            response = await asyncio.wait_for(self._read_head(conn, upload), response_timeout)
        except TimeoutError as exc:
            await _cancel(upload)
            conn.writer.close()
            raise UpstreamTimeout("no response head in time") from exc
        except BaseException:
            await _cancel(upload)
            conn.writer.close()
            raise
        if isinstance(response, h11.InformationalResponse):  # 101 Switching Protocols
            await _cancel(upload)
            leftover = conn.h11.trailing_data[0]
            tunnel = SocketTunnel(conn.reader, conn.writer, leftover)
            return UpstreamResponse(101, response.reason, list(response.headers), _NoBody(), tunnel)
        reader = _ResponseBody(self, key, conn, upload)
        return UpstreamResponse(
            response.status_code,
            response.reason,
            list(response.headers),
            reader,
            None,
            reader.finish,
        )

    async def _upload(self, conn: _Conn, head: bytes, body: BodyReader | None) -> None:
        writer = conn.writer
        writer.write(head)
        if body is not None:
            while chunk := await body.read():
                writer.write(conn.h11.send(h11.Data(data=chunk)) or b"")
                await writer.drain()
        if conn.h11.our_state is h11.SEND_BODY or body is None:
            writer.write(conn.h11.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    async def _read_head(
        self, conn: _Conn, upload: asyncio.Future[None]
    ) -> h11.Response | h11.InformationalResponse:
        received_any = False
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamReset(f"bad response from machine: {exc}") from exc
            if event is h11.NEED_DATA:
                if upload.done() and upload.exception() is not None:
                    _raise_upload_error(upload, conn.reused and not received_any)
                data = await self._recv(conn, upload)
                if not data:
                    if conn.reused and not received_any:
                        raise _StaleConnection()
                    raise UpstreamReset("machine closed before answering")
                received_any = True
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    return event
                continue  # 100 Continue etc.: the edge already answered the client
            if isinstance(event, h11.Response):
                return event
            raise UpstreamReset(f"unexpected event {event!r}")

    async def _recv(self, conn: _Conn, upload: asyncio.Future[None]) -> bytes:
        """Read from the machine, but notice a failed upload (client body error) at once."""
        read = asyncio.ensure_future(conn.reader.read(READ_SIZE))
        try:
            if not upload.done():
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


def _raise_upload_error(upload: asyncio.Future[None], stale: bool) -> None:
    error = upload.exception()
    if isinstance(error, ClientBodyError):
        raise error
    if stale:
        raise _StaleConnection()
    raise UpstreamReset(f"sending the request failed: {error!r}")


async def _cancel(task: asyncio.Future[None]) -> None:
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

    def __init__(
        self, pool: MachinePool, key: tuple[str, int], conn: _Conn, upload: asyncio.Future[None]
    ) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self._upload = upload
        self._done = False

    async def read(self) -> bytes:
        conn = self._conn
        while not self._done:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamReset(f"bad response body: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(
                        conn.reader.read(READ_SIZE), self._pool.read_timeout
                    )
                except (ConnectionError, OSError, TimeoutError) as exc:
                    raise UpstreamReset(f"reading response body: {exc!r}") from exc
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self._done = True
        return b""

    async def finish(self) -> None:
        conn = self._conn
        reusable = False
        if self._done and self._upload.done() and not self._upload.cancelled():
            reusable = self._upload.exception() is None and conn.h11.our_state is h11.DONE
            reusable = reusable and conn.h11.their_state is h11.DONE
        else:
            await _cancel(self._upload)
        if reusable:
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                reusable = False
        if reusable:
            conn.reused = False
            self._pool._put_idle(self._key, conn)
        else:
            conn.writer.close()
