"""What every upstream transport (a local machine, or the backhaul) hands back:
a response head with a streaming body or a tunnel, and the failure kinds the
forwarder's retry rules are written against."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from edgeproxy.proxy.bodies import BodyReader
from edgeproxy.proxy.messages import HttpError
from edgeproxy.proxy.streams import ByteReader, ByteWriter

Headers = list[tuple[bytes, bytes]]
# Called with each interim (1xx) response to pass on, as it arrives, before the final
# head: (status, reason, header fields). Must not raise.
Informational = Callable[[int, bytes, Headers], None]


class UpstreamError(Exception):
    """Base of the failures that end an attempt before a response head arrived."""


class ConnectFailed(UpstreamError):
    """Nothing of the request reached the machine: always safe to try another.

    ``host`` is set when a whole worker is unreachable (its backhaul is down), so
    the retry skips every machine behind it, not just this one.
    """

    def __init__(self, message: str, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class UpstreamReset(UpstreamError):
    """The request may have reached the machine; only idempotent ones are retried."""


class UpstreamTimeout(UpstreamError):
    """No response head in time: 504."""


class ClientBodyError(HttpError):
    """The client's request body was malformed, too slow, or cut short."""


class Tunnel(Protocol):
    """A bidirectional byte stream after a protocol switch (WebSocket)."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def close_write(self) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: bytes
    headers: Headers
    body: BodyReader
    tunnel: Tunnel | None = None
    # Called once when the consumer is finished: returns a connection to its pool,
    # or resets a stream whose body was not read to the end.
    on_close: Callable[[], Awaitable[None]] | None = None
    closed: bool = field(default=False)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.on_close is not None:
            await self.on_close()


class SocketTunnel:
    def __init__(
        self, reader: ByteReader, writer: ByteWriter, leftover: bytes
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._leftover = leftover

    async def read(self) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover, b""
            return data
        return await self._reader.read(64 * 1024)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close_write(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer.can_write_eof():
                self._writer.write_eof()

    def close(self) -> None:
        self._writer.close()


async def splice(a: Tunnel, b: Tunnel, idle_timeout: float) -> None:
    """Copy both ways until both sides end (half-close honoured) or one fails or idles."""

    async def pump(src: Tunnel, dst: Tunnel) -> None:
        while True:
            data = await asyncio.wait_for(src.read(), idle_timeout)
            if not data:
                dst.close_write()
                return
            await dst.write(data)

    tasks = [asyncio.ensure_future(pump(a, b)), asyncio.ensure_future(pump(b, a))]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() is not None for t in done):
                break
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        a.close()
        b.close()
