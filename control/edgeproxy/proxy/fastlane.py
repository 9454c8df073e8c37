"""The HTTP/1.1 fast lane: the common request served on protocol callbacks.

Every client connection is a compiled ``_lane.ClientConnection``. When a whole
request head is buffered, the lane parses it with the strict parser and serves the
request itself when it is *plain*: origin form, no Upgrade or Expect, no body or a
small Content-Length body buffered whole, routed to an app that is within its CPU
budget, with a slot free right now on a machine on this host. Such a request costs
one callback for its head, one Python call here for the decision (``route``), one
write to a pooled machine connection, a callback per response read, a write to the
client and one Python call when it ends (``finished``): no task, no coroutine
chain, no timer per request (one sweeper per proxy checks every deadline).

Everything else runs the general path (``frontend_h1``/``frontend_h2`` and
``forward.py``) as a task that reads and writes through the same connection
(``ConnectionStreams``): chunked or large bodies, WebSockets, h2c, malformed heads
(their 4xx come from the general path, byte for byte as before), queueing for a
slot, machines behind the backhaul, retries after a failed attempt and replays
(handed over with the attempt made, ``PriorAttempt``). After such a request the
connection comes back to the lane. The rules exist once: head parsing, header
rules, the balancing rule (through ``Admission``), response framing and counters
are the general path's functions, called from here and from ``_lane``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgeproxy.proxy import headers as h
from edgeproxy.proxy._lane import (
    CLOSED,
    LANE_BODY,
    ClientConnection,
    UpstreamConnection,
    UpstreamPool,
)
from edgeproxy.proxy.cpushare import CpuMeter
from edgeproxy.proxy.edgelane import EdgeBackhaulLane
from edgeproxy.proxy.forward import ConnectionLeases, Forwarder, PriorAttempt
from edgeproxy.proxy.frontend_h1 import ClientTimeouts, H1Connection
from edgeproxy.proxy.frontend_h2 import H2ClientConnection
from edgeproxy.proxy.messages import HttpError, RequestHead
from edgeproxy.proxy.responses import ResponseParser
from edgeproxy.proxy.routes import RouteMap
from edgeproxy.proxy.targeting import candidate_tables, parse_routing_hints
from edgeproxy.routing import Backend, ServiceTable, address_text

__all__ = ["LANE_BODY", "ConnectionStreams", "FastLane", "LaneSettings", "PooledExchange"]

log = logging.getLogger(__name__)

# Sweeper period bounds: deadlines are checked this often (a quarter of the shortest
# timeout), so each fires at most one period late.
MIN_TICK = 0.01
MAX_TICK = 0.5
# Resolved (Host, address, port) triples kept per routes object.
RESOLVED_MOST = 4096


@dataclass(frozen=True, slots=True)
class LaneSettings:
    region: str
    timeouts: ClientTimeouts
    connect_timeout: float
    response_timeout: float  # request sent → response head (then 504)
    read_timeout: float  # between reads of a response body
    pool_idle: int  # idle connections kept per machine
    pool_idle_timeout: float


class FastLane:
    """The listeners' protocol factory, the lane's policy, and everything its
    connections share."""

    def __init__(
        self,
        settings: LaneSettings,
        forwarder: Forwarder,
        routes: Callable[[], RouteMap],
        cpu: CpuMeter,
    ) -> None:
        self.settings = settings
        self.forwarder = forwarder
        self.routes = routes
        self.counters = forwarder.counters  # the one set the general path counts in
        self.cpu = cpu
        self.pool = UpstreamPool(self)
        # The lane's requests to machines behind the backhaul.
        self.remote = EdgeBackhaulLane(self, forwarder.backhaul)
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        # Other callback-driven exchanges whose deadlines the sweeper checks (the
        # worker's backhaul streams, workerlane.py): anything with check_deadline(now).
        self.watched: set[Any] = set()
        # Requests served by the lane itself, and handed to the general path.
        self.lane_requests = 0
        self.general_requests = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._targets: dict[str, tuple[str, int] | None] = {}
        self._targets_for: RouteMap | None = None
        # What routes.resolve said for a (Host, local address, port), for as long as
        # the routes stay the same object (it showed in profiles: a host's
        # normalisation and three lookups per request).
        self._tables: dict[tuple[bytes | None, str, int], ServiceTable | None] = {}
        t = settings.timeouts
        shortest = min(t.header, t.idle, settings.response_timeout, settings.read_timeout)
        self.tick = min(max(shortest / 4, MIN_TICK), MAX_TICK)

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    # -- the policy the compiled connections ask for ---------------------------------
    def route(
        self, head: RequestHead, local_address: str, local_port: int, leases: ConnectionLeases
    ) -> tuple[ServiceTable, Backend, tuple[str, int] | None] | None:
        """The service, the machine (its slot taken) and its (address, port) for a
        plain request, or None as the address of a machine behind the backhaul (for
        ``remote``); None when the general path must take it: no route (404), the
        app waits for its CPU turn or its queue, or bad routing hints."""
        routes = self.routes()
        if routes is not self._targets_for:
            self._new_routes(routes)
        key = (head.header(b"host"), local_address, local_port)
        try:
            table = self._tables[key]
        except KeyError:
            if len(self._tables) >= RESOLVED_MOST:
                self._tables.clear()  # many Host spellings: start over, stay bounded
            table = self._tables[key] = routes.resolve(*key)
        if table is None or not self.cpu.admit(table.app):
            return None
        try:
            hints = parse_routing_hints(head.headers)
        except HttpError:
            return None
        backend = self.forwarder.try_slot(table, candidate_tables(table, hints), leases)
        if backend is None:
            return None
        return table, backend, self.target(routes, backend)

    def finished(self, table: ServiceTable, backend: Backend, status: int, seconds: float) -> None:
        """A lane request got its whole response: its slot back, and counted."""
        self.forwarder.end_slot(table, backend)
        self.counters.response(table.app, status, seconds)

    def target(self, routes: RouteMap, backend: Backend) -> tuple[str, int] | None:
        """The machine's (address, port) if it is on this host, else None; cached per
        machine for as long as the routes stay the same object."""
        if routes is not self._targets_for:
            self._new_routes(routes)
        try:
            return self._targets[backend.machine_id]
        except KeyError:
            local = self.forwarder.is_local(backend)
            found = (address_text(backend.address), backend.port) if local else None
            self._targets[backend.machine_id] = found
            return found

    def _new_routes(self, routes: RouteMap) -> None:
        self._targets_for = routes
        self._targets.clear()
        self._tables.clear()

    async def run_general(
        self,
        conn: ClientConnection,
        head: RequestHead | None,
        prior: PriorAttempt | None,
        h2: bool,
    ) -> None:
        """One request of ``conn`` (``head``: already taken from its buffer) on the
        general path, or for h2c the rest of the connection; then back to the lane."""
        streams = ConnectionStreams(conn)
        keep = False
        try:
            if h2:
                first = bytes(conn.buffer)
                conn.buffer.clear()
                client = h.ClientInfo(conn.client.ip, "http", conn.client.local_port, b"2")
                await H2ClientConnection(
                    streams,
                    streams,
                    self.forwarder,
                    client,
                    conn.local_address,
                    self.settings.timeouts,
                    first,
                ).serve()
            else:
                h1 = H1Connection(
                    streams,
                    streams,
                    self.forwarder,
                    conn.client,
                    conn.local_address,
                    self.settings.timeouts,
                    leases=conn.leases,
                )
                keep = await h1.serve_one(head, prior)
                if keep:
                    conn.buffer[:0] = h1.parser.buffer
        except (ConnectionError, OSError):
            keep = False
        except Exception:
            log.exception("request failed on the general path")
            keep = False
        if conn.state == CLOSED:
            return
        if not keep:
            conn.close()
            return
        conn.first = False
        conn.back_to_lane()

    # -- life -------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self.tick, self._sweep)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            conn.abort()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.pool.close()

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            for conn in list(self.connections):
                conn.check_deadlines(now)
            for watched in list(self.watched):
                watched.check_deadline(now)
            self.pool.prune(now)
        finally:
            self._sweeper = loop.call_later(self.tick, self._sweep)


class ConnectionStreams:
    """A ClientConnection as the reader and writer the general path expects."""

    __slots__ = ("_conn",)

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn

    async def read(self, n: int = -1) -> bytes:
        return await self._conn.read(n)

    def write(self, data: bytes) -> None:
        self._conn.write(data)

    async def drain(self) -> None:
        await self._conn.drain()

    def close(self) -> None:
        self._conn.close()

    def is_closing(self) -> bool:
        transport = self._conn.transport
        return transport is None or transport.is_closing()

    def can_write_eof(self) -> bool:
        return self._conn.transport is not None

    def write_eof(self) -> None:
        if self._conn.transport is not None:
            self._conn.transport.write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._conn.transport
        return default if transport is None else transport.get_extra_info(name, default)


class PooledExchange(Protocol):
    """What an ``UpstreamConnection`` serves: the lane's ``Exchange`` (to a client
    connection) and the worker's ``workerlane.StreamExchange`` (to a backhaul stream)."""

    key: tuple[str, int]  # the machine's (address, port)
    wire: bytes  # the whole request
    method: bytes  # frames the response (HEAD has no body)
    app: str  # CPU time is charged to it
    upstream: UpstreamConnection | None
    reused: bool
    sent: bool

    def active(self) -> bool:
        """Still wants a connection (its client or stream did not go away)."""
        ...

    def paused_out(self) -> bool:
        """Whoever takes the response cannot take more now (machine not read)."""
        ...

    def pump(self, parser: ResponseParser) -> None: ...

    def fail(self, reason: str, stale: bool = False) -> None: ...

    def connect_failed(self, reason: str) -> None: ...


