"""The floor of any Python HTTP proxy: a bench-only keep-alive forwarder with no
HTTP semantics at all (no header rules, routing, limits, retries or checks).

It relays a bodiless request as bytes to a pooled upstream connection and the
response (Content-Length framed) back, on uvloop protocols: about the least work
per request a Python proxy can do. The http scenario measures it beside nginx so
the gap between edgeproxy and nginx can be split into "Python" and "edgeproxy".
Never used outside the benchmark; it is not a proxy anyone should run.

    python -m edgebench.pyfloor LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.buf = b""
        self.client: Client | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
        total = end + 4 + length
        if len(self.buf) < total:
            return
        response, self.buf = self.buf[:total], self.buf[total:]
        client, self.client = self.client, None
        self.pool.append(self)
        if client is not None:
            client.respond(response)


class Client(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int], pool: list[Upstream]) -> None:
        self.upstream = upstream
        self.pool = pool
        self.buf = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.next()

    def next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if self.busy or end < 0:
            return
        request, self.buf = self.buf[:end + 4], self.buf[end + 4:]
        self.busy = True
        if self.pool:
            up = self.pool.pop()
            up.client = self
            assert up.transport is not None
            up.transport.write(request)
        else:
            self.connecting = asyncio.ensure_future(self.connect(request))

    async def connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, up = await loop.create_connection(
                lambda: Upstream(self.pool), *self.upstream)
        except OSError:
            self.close()
            return
        up.client = self
        transport.write(request)

    def respond(self, response: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(response)
        self.busy = False
        self.next()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(host: str, port: int, upstream: tuple[str, int]) -> None:
    pool: list[Upstream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream, pool), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    host, port, up_host, up_port = sys.argv[1:5]
    uvloop.run(serve(host, int(port), (up_host, int(up_port))))


if __name__ == "__main__":
    main()
