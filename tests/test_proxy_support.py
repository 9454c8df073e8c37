"""Shared helpers for the proxy tests: small asyncio HTTP/1.1 machines (real sockets,
not mocks of the proxy), loopback topologies, and raw clients. No tests here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage

from edgeproxy.proxy import HttpProxy, ProxySettings
from edgeproxy.routing import Backend, ServiceTable

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@dataclass
class Machine:
    """An HTTP/1.1 machine: echoes what it saw as JSON, streams, replays, WebSockets."""

    machine_id: str
    address: str
    port: int
    region: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    delay: float = 0.0
    replay: str | None = None  # answer with Edgeproxy-Replay unless the request is a replay

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.address, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.server.wait_closed(), 1)
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                event = await self._next(conn, reader)
                if not isinstance(event, h11.Request):
                    return
                if await self._handle(conn, event, reader, writer):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            return event

    async def _handle(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        headers = [(n.decode(), v.decode("latin-1")) for n, v in request.headers]
        url = urlsplit(request.target.decode())
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        seen: dict[str, Any] = {
            "machine": self.machine_id,
            "region": self.region,
            "method": request.method.decode(),
            "path": url.path,
            "headers": headers,
        }
        self.requests.append(seen)
        lower = {n: v for n, v in headers}
        if lower.get("upgrade", "").lower() == "websocket":
            await self._websocket(conn, lower, reader, writer)
            return True
        digest, size = hashlib.sha256(), 0
        while True:
            event = await self._next(conn, reader)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                seen["trailers"] = [(n.decode(), v.decode("latin-1")) for n, v in event.headers]
                break
        seen["body_size"], seen["body_sha256"] = size, digest.hexdigest()
        if self.delay:
            await asyncio.sleep(self.delay)
        extra: list[tuple[str, str]] = []
        if self.replay and "edgeproxy-replay-source" not in lower:
            extra.append(("edgeproxy-replay", self.replay))
        if url.path == "/download":
            total = int(query.get("n", "0"))
            writer.write(
                conn.send(
                    h11.Response(status_code=200, headers=[("content-length", str(total)), *extra])
                )
                or b""
            )
            block = b"x" * 65536
            sent = 0
            while sent < total:
                piece = block[: min(len(block), total - sent)]
                writer.write(conn.send(h11.Data(data=piece)) or b"")
                sent += len(piece)
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return False
        payload = json.dumps(seen).encode()
        writer.write(
            conn.send(
                h11.Response(
                    status_code=200,
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(payload))),
                        ("x-machine", self.machine_id),
                        *extra,
                    ],
                )
            )
            or b""
        )
        writer.write(conn.send(h11.Data(data=payload)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        return False

    async def _websocket(
        self,
        conn: h11.Connection,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        key = headers["sec-websocket-key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        await self._next(conn, reader)  # EndOfMessage of the GET
        ws = Connection(ConnectionType.SERVER)
        leftover = conn.trailing_data[0]
        if leftover:
            ws.receive_data(leftover)
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    writer.write(ws.send(type(event)(data=event.data)))  # type: ignore[call-arg]
                elif isinstance(event, CloseConnection):
                    writer.write(ws.send(event.response()))
                    await writer.drain()
                    return
            await writer.drain()
            data = await reader.read(65536)
            if not data:
                return
            ws.receive_data(data)


def backend(machine: Machine, app: str, worker: str) -> Backend:
    return Backend(
        machine.machine_id,
        app,
        machine.region,
        IPv4Address(machine.address),
        machine.port,
        IPv4Address(worker),
    )


def table(
    app: str,
    vip: str,
    port: int,
    tiers: list[list[Backend]],
    *,
    concurrency: str = "requests",
    soft: int = 50,
    hard: int = 100,
) -> ServiceTable:
    return ServiceTable(
        f"{app}-http",
        app,
        (IPv4Address(vip),),
        (port,),
        ("http",),
        concurrency,
        soft,
        hard,
        tuple(tuple(t) for t in tiers),
    )


FAST = ProxySettings(
    header_timeout=1.0,
    idle_timeout=5.0,
    body_timeout=5.0,
    connect_timeout=0.5,
    response_timeout=5.0,
    upstream_read_timeout=5.0,
    queue_timeout=0.3,
    queue_limit=5,
    backhaul_ping_interval=0.5,
    backhaul_ping_timeout=0.5,
)

EDGE = "127.0.0.2"  # the edge host (ord); machines with this worker address are local
WORKER_AMS = "127.0.0.3"
WORKER_SYD = "127.0.0.4"
VIP = "127.0.0.10"


@dataclass
class Lab:
    edge: HttpProxy
    workers: list[HttpProxy]
    machines: dict[str, Machine]
    port: int  # the web app's HTTP port on VIP

    async def stop(self) -> None:
        for proxy in [self.edge, *self.workers]:
            await proxy.stop()
        for machine in self.machines.values():
            await machine.stop()


async def make_lab(settings: ProxySettings = FAST, *, extra_apps: bool = False) -> Lab:
    """edge (ord, 127.0.0.2) + workers ams (127.0.0.3) and syd (127.0.0.4);
    app `web`: ord-1 on the edge's own host, ams-1/ams-2 behind ams, syd-1 behind syd."""
    port = free_port(VIP)
    backhaul = free_port(WORKER_AMS)
    machines = {
        "web-ord-1": Machine("web-ord-1", "127.0.0.20", free_port("127.0.0.20"), "ord"),
        "web-ams-1": Machine("web-ams-1", "127.0.0.30", free_port("127.0.0.30"), "ams"),
        "web-ams-2": Machine("web-ams-2", "127.0.0.31", free_port("127.0.0.31"), "ams"),
        "web-syd-1": Machine("web-syd-1", "127.0.0.40", free_port("127.0.0.40"), "syd"),
    }
    tables = [
        table(
            "web",
            VIP,
            port,
            [
                [backend(machines["web-ord-1"], "web", EDGE)],
                [
                    backend(machines["web-ams-1"], "web", WORKER_AMS),
                    backend(machines["web-ams-2"], "web", WORKER_AMS),
                ],
                [backend(machines["web-syd-1"], "web", WORKER_SYD)],
            ],
        )
    ]
    hostnames = {"web.test": "web"}
    if extra_apps:
        machines["flood-ams-1"] = Machine(
            "flood-ams-1", "127.0.0.32", free_port("127.0.0.32"), "ams"
        )
        machines["flood-ams-1"].delay = 0.5
        tables.append(
            table(
                "flood",
                VIP,
                port,
                [[backend(machines["flood-ams-1"], "flood", WORKER_AMS)]],
                soft=2,
                hard=3,
            )
        )
        hostnames["flood.test"] = "flood"
    for machine in machines.values():
        await machine.start()
    edge = HttpProxy(
        role="edge", region="ord", host_addresses=[EDGE], backhaul_port=backhaul, settings=settings
    )
    workers = [
        HttpProxy(
            role="worker", region=r, host_addresses=[a], backhaul_port=backhaul, settings=settings
        )
        for r, a in (("ams", WORKER_AMS), ("syd", WORKER_SYD))
    ]
    for worker in workers:
        worker.allow_backhaul_from([EDGE])  # as the daemon does: edges' host addresses only
    for proxy in [edge, *workers]:
        proxy.update(tables, hostnames)
        await proxy.start()
    return Lab(edge, workers, machines, port)


@contextlib.asynccontextmanager
async def lab(settings: ProxySettings = FAST, **kwargs: Any) -> AsyncIterator[Lab]:
    the_lab = await make_lab(settings, **kwargs)
    try:
        yield the_lab
    finally:
        await the_lab.stop()


def run(coro_fn: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    """Run one async test with a hard time bound."""

    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), timeout)

    asyncio.run(bounded())


async def raw_exchange(data: bytes, port: int, *, host: str = VIP, timeout: float = 3.0) -> bytes:
    """Send raw bytes, read until the proxy closes (or timeout); returns everything read."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        chunks.append(b"<timeout>")
    finally:
        writer.close()
    return b"".join(chunks)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(
    method: str,
    path: str,
    port: int,
    *,
    host_header: str = "web.test",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> Response:
    """One HTTP/1.1 request on a fresh connection, parsed with h11."""
    reader, writer = await asyncio.open_connection(VIP, port)
    try:
        return await asyncio.wait_for(
            exchange_on(
                reader, writer, method, path, host_header=host_header, headers=headers, body=body
            ),
            timeout,
        )
    finally:
        writer.close()


async def exchange_on(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    path: str,
    *,
    host_header: str = "web.test",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    conn: h11.Connection | None = None,
) -> Response:
    conn = conn or h11.Connection(h11.CLIENT)
    hdrs = [("host", host_header), *(headers or {}).items()]
    if body:
        hdrs.append(("content-length", str(len(body))))
    writer.write(conn.send(h11.Request(method=method, target=path, headers=hdrs)) or b"")
    if body:
        writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()
    status, got, out = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            got = {n.decode(): v.decode("latin-1") for n, v in event.headers}
        elif isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return Response(status, got, bytes(out))


# Shapes checked end to end (the sans-IO tests cover more): raw request → status.
SMUGGLE_SHAPES = {
    "cl_and_te": (
        b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        400,
    ),
    "duplicate_cl": (
        b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    "conflicting_cl": (
        b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
        400,
    ),
    "bad_chunk_size": (
        b"POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"-1\r\nab\r\n0\r\n\r\n",
        400,
    ),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: web.test\r\nX-A: 1\r\n\tfolded\r\n\r\n", 400),
    "bare_lf": (b"GET / HTTP/1.1\nHost: web.test\n\n", 400),
    "oversized_headers": (
        b"GET / HTTP/1.1\r\nHost: web.test\r\nX: " + b"a" * 40000 + b"\r\n\r\n",
        431,
    ),
    "te_obfuscated": (
        b"POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: xchunked\r\n\r\n",
        501,
    ),
}
