"""The HTTP/1.1 fast lane: the common request served on protocol callbacks.

Every client connection is a ``ClientConnection`` (an asyncio Protocol). When a
whole request head is buffered, the lane parses it with the strict parser
(``framing.parse_head``) and serves the request itself when it is *plain*: a
bodiless GET/HEAD/OPTIONS/DELETE in origin form, no Upgrade or Expect, routed to
an app that is within its CPU budget, with a slot free right now on a machine on
this host. Such a request costs one callback for its head, one write to a pooled
machine connection (``UpstreamConnection``), a callback per response read and a
write to the client: no task, no coroutine chain, no timer per request (one
sweeper per proxy checks every deadline).

Everything else runs the general path (``frontend_h1``/``frontend_h2`` and
``forward.py``) as a task that reads and writes through the same connection
(``ConnectionStreams``): bodies, WebSockets, h2c, malformed heads (their 4xx come
from the general path, byte for byte as before), queueing for a slot, machines
behind the backhaul, retries after a failed attempt and replays (handed over with
the attempt made, ``PriorAttempt``). After such a request the connection comes back
to the lane. The rules exist once: head parsing, header rules, the balancing rule
(through ``Admission``), response framing and counters are the general path's
functions, called from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol, cast

from edgeproxy.proxy import headers as h
from edgeproxy.proxy._http1 import MAX_HEAD, UnsendableRequest, client_head, forward_head
from edgeproxy.proxy.bodies import read_ready
from edgeproxy.proxy.cpushare import CpuMeter
from edgeproxy.proxy.forward import (
    IDEMPOTENT,
    ConnectionLeases,
    Forwarder,
    PriorAttempt,
    address_text,
    error_response,
)
from edgeproxy.proxy.framing import check_incomplete_head, parse_head
from edgeproxy.proxy.frontend_h1 import (
    ClientTimeouts,
    H1Connection,
    head_bytes,
    response_end_chunk,
)
from edgeproxy.proxy.frontend_h2 import PREFACE, H2ClientConnection
from edgeproxy.proxy.messages import (
    END,
    NEED_DATA,
    Data,
    HttpError,
    RequestHead,
    ResponseError,
    ResponseHead,
)
from edgeproxy.proxy.responses import ResponseParser, forwarded_informational
from edgeproxy.proxy.routes import RouteMap
from edgeproxy.proxy.targeting import candidate_tables, parse_replay, parse_routing_hints
from edgeproxy.routing import Backend, ServiceTable

log = logging.getLogger(__name__)

# Client bytes buffered before the socket stops being read (pipelined requests, or
# a body the general path has not consumed yet): the kernel's buffers hold the rest.
HIGH_WATER = 256 * 1024
# A Content-Length body up to this size that is buffered whole with its head rides
# the lane with it (one write to the machine); a larger one, a chunked one, or one
# still arriving is the general path's (it streams bodies, with its own timeouts).
LANE_BODY = 64 * 1024
# Fields that make a request the general path's: it answers Expect and tunnels Upgrade.
_GENERAL_FIELDS = frozenset({b"expect", b"upgrade", b"http2-settings"})
# Sweeper period bounds: deadlines are checked this often (a quarter of the shortest
# timeout), so each fires at most one period late.
MIN_TICK = 0.01
MAX_TICK = 0.5

_IDLE, _EXCHANGE, _GENERAL, _CLOSED = range(4)


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
    """The listeners' protocol factory and everything its connections share."""

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
        t = settings.timeouts
        shortest = min(t.header, t.idle, settings.response_timeout, settings.read_timeout)
        self.tick = min(max(shortest / 4, MIN_TICK), MAX_TICK)

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def target(self, routes: RouteMap, backend: Backend) -> tuple[str, int] | None:
        """The machine's (address, port) if it is on this host, else None; cached per
        machine for as long as the routes stay the same object."""
        if routes is not self._targets_for:
            self._targets_for = routes
            self._targets.clear()
        try:
            return self._targets[backend.machine_id]
        except KeyError:
            local = self.forwarder.is_local(backend)
            found = (address_text(backend.address), backend.port) if local else None
            self._targets[backend.machine_id] = found
            return found

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


class ClientConnection(asyncio.Protocol):
    """One client TCP connection; requests are served one at a time, in order."""

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.state = _IDLE
        self.eof = False
        self.first = True  # nothing served yet: an HTTP/2 preface may still come
        self.since = self.loop.time()  # idle since / head started
        self.head_started = False
        self.exchange: _Exchange | None = None
        self.leases = ConnectionLeases()
        self.client = h.ClientInfo(ip="", scheme="http", local_port=0, protocol=b"1.1")
        self.local_address = ""
        # What forward_head adds for this connection, as bytes, made once:
        # (client ip, scheme, local port, protocol for Via, edge region).
        self.forwarding: tuple[bytes, bytes, bytes, bytes, bytes] = (b"", b"", b"", b"", b"")
        self._read_paused = False
        self.write_paused = False
        self._reader_waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- asyncio callbacks ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = h.ClientInfo(
            ip=str(peer[0]), scheme="http", local_port=int(local[1]), protocol=b"1.1"
        )
        self.local_address = str(local[0])
        c = self.client
        self.forwarding = (
            c.ip.encode(),
            c.scheme.encode(),
            str(c.local_port).encode(),
            c.protocol,
            self.lane.settings.region.encode(),
        )
        self.lane.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        self.lane.connections.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.abort()
        self.lane.forwarder.release_connection(self.leases)
        self._wake_reader()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("client connection lost"))
        self._drain_waiters.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.state == _IDLE:
            self.serve_next()
            return
        self._wake_reader()
        if len(self.buffer) > HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        if self.state == _IDLE:
            self.serve_next()
            if self.state == _IDLE:
                self.close()
        return True  # half-closed: the answer to a request already sent still goes out

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume_upstream()
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the lane ---------------------------------------------------------------------
    def serve_next(self) -> None:
        """Serve the buffered request, if its head is complete (state IDLE)."""
        buf = self.buffer
        if not buf:
            return
        if not self.head_started:
            self.head_started = True
            self.since = self.loop.time()
        if self.first:
            n = min(len(buf), len(PREFACE))
            if buf[:n] == PREFACE[:n]:
                if n == len(PREFACE):
                    self.general(h2=True)
                return  # HTTP/2 prior knowledge, or a prefix of it so far
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            # Incomplete. What the strict parser refuses before the head ends
            # (bare LF, too long) goes to it now, not after the header timeout.
            try:
                check_incomplete_head(buf)
            except HttpError:
                self.general()
            return
        if end + 4 > MAX_HEAD or buf.startswith(b"\r\n"):
            self.general()
            return
        try:
            head = parse_head(bytes(buf[:end]))
        except HttpError:
            self.general()  # the general path answers with the same error
            return
        if not _plain(head):
            self.general()
            return
        raw: bytes | None = None
        if head.has_body:
            total = end + 4 + (head.content_length or 0)
            if head.chunked or total - end - 4 > LANE_BODY or len(buf) < total:
                self.general()
                return
            raw = bytes(buf[:total])
            del buf[:total]
        else:
            del buf[: end + 4]
        self.first = False
        self.head_started = False
        self._start(head, raw, end + 4)

    def _handover(self, head: RequestHead, raw: bytes | None, prior: PriorAttempt | None) -> None:
        """The general path takes this request: a bodiless head as parsed, a request
        with a body as its bytes again (the general path reads and replays bodies)."""
        if raw is None:
            self.general(head, prior)
        else:
            self.buffer[:0] = raw
            self.general(None, prior)

    def _start(self, head: RequestHead, raw: bytes | None, body_at: int) -> None:
        """Route, admit and send one request; ``raw``: the whole request's bytes when
        it carries a body, which starts at ``body_at``."""
        lane = self.lane
        forwarder = lane.forwarder
        started = time.monotonic()
        timed = lane.cpu.busy
        clock = perf_counter() if timed else 0.0
        host = head.header(b"host")
        routes = lane.routes()
        table = routes.resolve(host, self.local_address, self.client.local_port)
        if table is None or not lane.cpu.admit(table.app):
            self._handover(head, raw, None)  # 404, or wait for the app's CPU turn
            return
        try:
            hints = parse_routing_hints(head.headers)
        except HttpError:
            self._handover(head, raw, None)
            return
        tables = candidate_tables(table, hints)
        backend = forwarder.try_slot(table, tables, self.leases)
        if backend is None:
            self._handover(head, raw, None)  # no machine (503) or the app's queue
            return
        target = lane.target(routes, backend)
        if target is None:
            forwarder.drop_slot(table, backend, self.leases)
            self._handover(head, raw, None)  # over the backhaul
            return
        request_id = h.new_request_id()
        try:
            if raw is None:
                wire = forward_head(head, *self.forwarding, request_id)
            else:
                length = len(raw) - body_at
                wire = forward_head(head, *self.forwarding, request_id, length) + raw[body_at:]
        except UnsendableRequest:
            forwarder.drop_slot(table, backend, self.leases)
            self._handover(head, raw, None)
            return
        exchange = _Exchange(self, head, raw, table, backend, target, request_id, wire, started)
        lane.lane_requests += 1
        self.exchange = exchange
        self.state = _EXCHANGE
        lane.pool.send(exchange, self.loop.time())
        if timed:
            lane.cpu.charge(table.app, perf_counter() - clock)

    def exchange_done(self, keep: bool) -> None:
        self.exchange = None
        if self.state == _CLOSED:
            return
        if not keep:
            self.close()
            return
        self._back_to_lane()

    def _back_to_lane(self) -> None:
        self.state = _IDLE
        self.since = self.loop.time()
        self.head_started = False
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        self.serve_next()
        if self.state == _IDLE and self.eof and not self.buffer:
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and self.state != _CLOSED:
            self.transport.write(data)

    def close(self) -> None:
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    def check_deadlines(self, now: float) -> None:
        settings = self.lane.settings
        if self.state == _IDLE:
            if self.buffer and now - self.since > settings.timeouts.header:
                # Slowloris: the head did not arrive in time.
                self.write(error_bytes(408, h.new_request_id(), "request head timed out"))
                self.close()
            elif not self.buffer and now - self.since > settings.timeouts.idle:
                self.close()
        elif self.state == _EXCHANGE and self.exchange is not None:
            self.exchange.check_deadline(now)

    # -- the general path ---------------------------------------------------------------
    def general(
        self, head: RequestHead | None = None, prior: PriorAttempt | None = None, h2: bool = False
    ) -> None:
        """Serve the next request (or, for h2c, the rest of the connection) on the
        general path; ``head``: already taken from the buffer."""
        self.state = _GENERAL
        self.lane.general_requests += 1
        self.lane.spawn(self._run_general(head, prior, h2))

    async def _run_general(
        self, head: RequestHead | None, prior: PriorAttempt | None, h2: bool
    ) -> None:
        lane = self.lane
        streams = ConnectionStreams(self)
        keep = False
        try:
            if h2:
                first = bytes(self.buffer)
                self.buffer.clear()
                client = h.ClientInfo(self.client.ip, "http", self.client.local_port, b"2")
                await H2ClientConnection(
                    streams,
                    streams,
                    lane.forwarder,
                    client,
                    self.local_address,
                    lane.settings.timeouts,
                    first,
                ).serve()
            else:
                conn = H1Connection(
                    streams,
                    streams,
                    lane.forwarder,
                    self.client,
                    self.local_address,
                    lane.settings.timeouts,
                    leases=self.leases,
                )
                keep = await conn.serve_one(head, prior)
                if keep:
                    self.buffer[:0] = conn.parser.buffer
        except (ConnectionError, OSError):
            keep = False
        except Exception:
            log.exception("request failed on the general path")
            keep = False
        if self.state == _CLOSED:
            return
        if not keep:
            self.close()
            return
        self.first = False
        self._back_to_lane()

    def _wake_reader(self) -> None:
        waiter = self._reader_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, n: int) -> bytes:
        """For ``ConnectionStreams``: buffered bytes, b"" at the end."""
        while not self.buffer:
            if self.eof or self.state == _CLOSED:
                return b""
            waiter = self.loop.create_future()
            self._reader_waiter = waiter
            try:
                await waiter
            finally:
                self._reader_waiter = None
        buf = self.buffer
        if n < 0 or n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        if self._read_paused and len(buf) <= HIGH_WATER // 2 and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    async def drain(self) -> None:
        if self.state == _CLOSED:
            raise ConnectionResetError("client connection lost")
        if not self.write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter


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


def _plain(head: RequestHead) -> bool:
    """A request the lane may serve itself, if its body (if any) is small and here:
    origin form, nothing that asks for an answer of ours (Expect) or a tunnel."""
    if head.target[:1] != b"/":
        return False
    # A loop, not all(<genexpr>): a generator per request showed in profiles.
    for name, _ in head.headers:  # noqa: SIM110
        if name in _GENERAL_FIELDS:
            return False
    return True


def error_bytes(status: int, request_id: bytes, detail: str, close: bool = True) -> bytes:
    """A whole error response (the general path's ``error_response``) as bytes."""
    response = error_response(status, request_id, detail)
    fields = list(response.headers)
    if close:
        fields.append((b"connection", b"close"))
    return head_bytes(status, response.reason, fields) + (read_ready(response.body) or b"")


class _Exchange:
    """One plain request on its way to a machine and its response on the way back."""

    __slots__ = (
        "app",
        "backend",
        "chunked",
        "client",
        "deadline",
        "head",
        "keep",
        "key",
        "method",
        "raw",
        "replied",
        "request_id",
        "reused",
        "sent",
        "started",
        "status",
        "table",
        "upstream",
        "wire",
    )

    def __init__(
        self,
        client: ClientConnection,
        head: RequestHead,
        raw: bytes | None,
        table: ServiceTable,
        backend: Backend,
        key: tuple[str, int],
        request_id: bytes,
        wire: bytes,
        started: float,
    ) -> None:
        self.client = client
        self.head = head
        self.method = head.method
        self.app = table.app
        self.raw = raw  # the whole request, when it has a body (for a handover)
        self.table = table
        self.backend = backend
        self.key = key  # the machine's (address, port)
        self.request_id = request_id
        self.wire = wire
        self.started = started
        self.upstream: UpstreamConnection | None = None
        self.reused = False
        self.sent = False  # the request was written to a machine connection
        self.replied = False  # the response head went to the client
        self.status = 0
        self.chunked = False
        self.keep = False
        lane = client.lane
        self.deadline = client.loop.time() + lane.settings.response_timeout

    # -- PooledExchange ------------------------------------------------------------------
    def active(self) -> bool:
        return self.client.exchange is self

    def paused_out(self) -> bool:
        return self.client.write_paused

    def connect_failed(self, reason: str) -> None:
        self.fail(reason)

    # -- from the machine -------------------------------------------------------------
    def pump(self, parser: ResponseParser) -> None:
        """Turn what the machine sent so far into bytes for the client."""
        client = self.client
        out: list[bytes] = []
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Data):
                    data = event.data
                    out.append(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
                elif isinstance(event, ResponseHead):
                    if event.status < 200:  # the only test a plain response pays
                        self._interim(event, out)
                        continue  # the final response follows
                    wire = self._response_head(event)
                    if wire is None:  # a replay directive: followed, or ignored
                        if self._replay(event, out):
                            return
                        wire = self._response_head(event, check_replay=False)
                        assert wire is not None
                    out.append(wire)
                else:
                    assert event is END
                    if self.chunked:
                        out.append(response_end_chunk(parser.trailers))
                    client.write(b"".join(out))
                    self._finish(parser)
                    return
        except ResponseError as exc:
            if out:
                client.write(b"".join(out))
            self.fail(f"bad response from machine: {exc}")
            return
        if out:
            client.write(b"".join(out))
        self.deadline = client.loop.time() + client.lane.settings.read_timeout

    def _response_head(self, event: ResponseHead, check_replay: bool = True) -> bytes | None:
        """The client's head for the machine's final ``event``; None if it carries
        a replay directive (looked at by ``_replay``)."""
        made = client_head(event, self.head, self.request_id, False, check_replay)
        if made is None:
            return None
        wire, self.chunked, self.keep = made
        self.status = event.status
        self.replied = True
        return wire

    def _interim(self, event: ResponseHead, out: list[bytes]) -> None:
        """A 1xx before the final head: passed on to an HTTP/1.1 client with the same
        header stripping as a final head (the parser bounds how many may come)."""
        if event.status == 101:
            raise ResponseError("101 to a request that asked for no upgrade")
        if forwarded_informational(event.status) and self.head.http_version == b"1.1":
            fields = h.client_response_headers(event.headers, self.request_id)
            out.append(head_bytes(event.status, event.reason, fields))

    def _replay(self, event: ResponseHead, out: list[bytes]) -> bool:
        """The machine asked for the request elsewhere: hand it to the general path
        (after the 1xx it sent, which the general path would have passed on too)."""
        value = h.header_value(event.headers, h.REPLAY)
        directive = parse_replay(value) if value is not None else None
        if directive is None:
            return False
        if out:
            self.client.write(b"".join(out))
        self._release_upstream(reusable=False)
        self._handover(PriorAttempt(self.backend.machine_id, directive))
        return True

    def _finish(self, parser: ResponseParser) -> None:
        up = self.upstream
        self.upstream = None
        lane = self.client.lane
        lane.forwarder.end_slot(self.table, self.backend)
        lane.counters.response(self.table.app, self.status, time.monotonic() - self.started)
        if up is not None:
            up.exchange = None
            if parser.done and parser.keep_alive and not parser.buffer:
                lane.pool.put_idle(up, self.client.loop.time())
            else:
                up.close()
        self.client.exchange_done(self.keep)

    # -- failures -----------------------------------------------------------------------
    def fail(self, reason: str, stale: bool = False) -> None:
        """The machine failed (connect, reset, close, garbage)."""
        if self.client.exchange is not self:
            return
        if stale and self.reused and not self.replied:
            # Keep-alive race: the machine closed the pooled connection as we reused
            # it, before a byte of the answer. Resend once on a fresh connection (as
            # the general path does; the lane holds the whole body).
            self._release_upstream(reusable=False)
            self.sent = False
            self.client.lane.pool.connect(self)
            return
        if not self.replied:
            self._release_upstream(reusable=False)
            if self.sent and self.head.method not in IDEMPOTENT:
                # The machine may have acted on it: never sent twice (duplicate writes).
                self._answer(502, f"machine failed after the request was sent: {reason}")
                return
            self._handover(PriorAttempt(self.backend.machine_id))
            return
        # Part of the response is out: the client learns of the failure by the close.
        log.debug("machine failed mid-response: %s", reason)
        self.abort()
        self.client.close()

    def _handover(self, prior: PriorAttempt) -> None:
        client = self.client
        client.lane.forwarder.drop_slot(self.table, self.backend, client.leases)
        client.exchange = None
        client._handover(self.head, self.raw, prior)

    def _answer(self, status: int, detail: str) -> None:
        """Answer the client with an error of ours; the connection stays if it may."""
        client = self.client
        lane = client.lane
        lane.forwarder.drop_slot(self.table, self.backend, client.leases)
        lane.counters.response(self.table.app, status, time.monotonic() - self.started)
        client.write(error_bytes(status, self.request_id, detail, False))
        client.exchange_done(self.head.keep_alive)

    def check_deadline(self, now: float) -> None:
        if now <= self.deadline:
            return
        if self.replied:
            self.fail("machine body read timed out")
            return
        # No response head in time: 504, as the general path answers it.
        self._release_upstream(reusable=False)
        self._answer(504, "machine did not answer in time")

    def abort(self) -> None:
        """The client left, or the exchange is given up: nothing goes back to the pool."""
        self._release_upstream(reusable=False)
        if self.replied:
            lane = self.client.lane
            lane.counters.response(self.table.app, self.status, time.monotonic() - self.started)
        self.client.lane.forwarder.drop_slot(self.table, self.backend, self.client.leases)

    def _release_upstream(self, reusable: bool) -> None:
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.exchange = None
            if reusable:
                self.client.lane.pool.put_idle(up, self.client.loop.time())
            else:
                up.close()

    def pause_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.pause()

    def resume_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.resume()


class PooledExchange(Protocol):
    """What an ``UpstreamConnection`` serves: the lane's ``_Exchange`` (to a client
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


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection to one machine, serving one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.exchange: PooledExchange | None = None
        self.idle_since = 0.0
        self.lost = False
        self.paused = False
        self.received = False  # bytes arrived for the current exchange

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def start(self, exchange: PooledExchange, reused: bool) -> None:
        self.exchange = exchange
        exchange.upstream = self
        exchange.reused = reused
        exchange.sent = True
        self.received = False
        self.parser.start(exchange.method)
        assert self.transport is not None
        if exchange.paused_out():
            self.pause()
        self.transport.write(exchange.wire)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: the machine is confused
            return
        self.received = True
        self.parser.feed(data)
        lane = self.pool.lane
        if lane.cpu.busy:
            clock = perf_counter()
            exchange.pump(self.parser)
            lane.cpu.charge(exchange.app, perf_counter() - clock)
        else:
            exchange.pump(self.parser)

    def eof_received(self) -> bool:
        self.parser.feed(b"")
        exchange = self.exchange
        if exchange is not None:
            if not self.received:  # closed before a byte of the answer: maybe stale
                exchange.fail("machine closed the connection", stale=True)
                return False
            exchange.pump(self.parser)  # a body that ends with the close ends here
            if self.exchange is exchange:
                exchange.fail("machine closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None and exchange.upstream is self:
            exchange.upstream = None
            exchange.fail(f"connection lost: {exc!r}", stale=not self.received)

    def usable(self, now: float) -> bool:
        return (
            not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
            and not self.parser.buffer
            and now - self.idle_since < self.pool.lane.settings.pool_idle_timeout
        )

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per machine, for the lane's exchanges and the
    worker's backhaul streams (one pool per process, callback-driven)."""

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}

    def send(self, exchange: PooledExchange, now: float) -> None:
        key = exchange.key
        conns = self._idle.get(key)
        if conns:
            while conns:
                up = conns.pop()
                if up.usable(now):
                    up.start(exchange, reused=True)
                    return
                up.close()
        self.connect(exchange)

    def connect(self, exchange: PooledExchange) -> None:
        self.lane.spawn(self._connect(exchange))

    async def _connect(self, exchange: PooledExchange) -> None:
        loop = asyncio.get_running_loop()
        address, port = key = exchange.key
        try:
            async with asyncio.timeout(self.lane.settings.connect_timeout):
                _, up = await loop.create_connection(
                    lambda: UpstreamConnection(self, key), address, port
                )
        except (OSError, TimeoutError) as exc:
            exchange.connect_failed(f"cannot connect to {address}:{port}: {exc!r}")
            return
        if not exchange.active():
            self.put_idle(up, loop.time())  # the client left meanwhile
            return
        up.start(exchange, reused=False)

    def put_idle(self, up: UpstreamConnection, now: float) -> None:
        # `now` from the caller's loop: asyncio.get_running_loop() costs a getpid()
        # system call on Python 3.11, and this runs once a request.
        if up.lost:
            return
        up.resume()
        conns = self._idle.setdefault(up.key, [])
        if len(conns) >= self.lane.settings.pool_idle:
            up.close()
            return
        up.idle_since = now
        conns.append(up)

    def forget(self, up: UpstreamConnection) -> None:
        conns = self._idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def prune(self, now: float) -> None:
        for key, conns in list(self._idle.items()):
            keep = []
            for up in list(conns):
                if up.usable(now):
                    keep.append(up)
                else:
                    up.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        for conns in self._idle.values():
            for up in conns:
                up.close()
        self._idle.clear()
