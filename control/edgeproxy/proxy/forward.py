"""The edge's request path, independent of the client protocol: route by Host,
apply client routing headers, take a concurrency slot, send to a machine (directly
or over the backhaul), retry, replay, and turn failures into error responses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from edgeproxy.proxy import headers as h
from edgeproxy.proxy.admission import Admission, QueueFull
from edgeproxy.proxy.backhaul import BackhaulClient, BackhaulRequest
from edgeproxy.proxy.bodies import BodyReader, BytesBody, ReplayableBody
from edgeproxy.proxy.cpushare import CpuMeter
from edgeproxy.proxy.machines import MachinePool, MachineRequest
from edgeproxy.proxy.messages import HttpError
from edgeproxy.proxy.routes import RouteMap
from edgeproxy.proxy.stats import ProxyCounters
from edgeproxy.proxy.targeting import (
    ReplayDirective,
    candidate_tables,
    parse_replay,
    parse_routing_hints,
)
from edgeproxy.proxy.upstream import (
    ClientBodyError,
    ConnectFailed,
    Headers,
    Informational,
    Tunnel,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
)
from edgeproxy.routing import Backend, ServiceTable, address_text

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(frozen=True, slots=True)
class PriorAttempt:
    """An attempt the fast lane (proxy/fastlane.py) already made for a request it
    hands to the general path: the machine it went to, and the replay that machine
    asked for (None: the attempt failed before a response head), and the request id
    that attempt carried, which the request keeps (one id in every log it touched)."""

    machine_id: str
    replay: ReplayDirective | None = None
    request_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    method: bytes
    target: bytes
    authority: bytes | None  # Host / :authority
    headers: Headers  # as the client sent them (lower-case names), without host
    client: h.ClientInfo
    local_address: str
    local_port: int
    body: BodyReader | None  # None: no body
    content_length: int | None = None
    websocket: bool = False
    prior: PriorAttempt | None = None
    # Sends an interim (1xx) response to the client, already stripped like a final
    # head; None when the client must not get one (HTTP/1.0).
    informational: Informational | None = None


@dataclass(slots=True)
class ProxyResponse:
    status: int
    reason: bytes
    headers: Headers
    body: BodyReader
    tunnel: Tunnel | None = None
    # The client must close after this response (error, or a body we could not read).
    close: bool = False
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def aclose(self) -> None:
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            await callback()


@dataclass(slots=True)
class ConnectionLeases:
    """Slots held by one client connection, for services that count connections."""

    by_app: dict[str, Backend] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    region: str
    host_addresses: frozenset[str]
    connect_timeout: float
    response_timeout: float
    queue_timeout: float
    max_attempts: int


def error_response(
    status: int, request_id: bytes, detail: str = "", retry_after: int | None = None
) -> ProxyResponse:
    phrase = HTTPStatus(status).phrase
    text = f"{status} {phrase}{': ' + detail if detail else ''}\n".encode()
    headers: Headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(text)).encode()),
        (h.REQUEST_ID, request_id),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return ProxyResponse(
        status, phrase.encode(), headers, BytesBody(text), close=status in (400, 431, 414)
    )


class Forwarder:
    def __init__(
        self,
        settings: ForwardSettings,
        routes: Callable[[], RouteMap],
        admission: Admission[asyncio.Future[Backend]],
        machines: MachinePool,
        backhaul: BackhaulClient,
        counters: ProxyCounters,
        cpu: CpuMeter,
    ) -> None:
        self.settings = settings
        self.cpu = cpu
        self._routes = routes
        self.admission = admission
        self.machines = machines
        self.backhaul = backhaul
        self.counters = counters

    # -- concurrency slots -----------------------------------------------------
    async def _wait_for_slot(self, app: str, tables: list[ServiceTable]) -> Backend | None:
        """Queue for a slot (try_acquire found none); None when the queue is full or
        the wait times out."""
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        try:
            self.admission.enqueue(app, future, tables)
        except QueueFull:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.queue_timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # granted right at the deadline
            return None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(app, future.result().machine_id)  # granted as the client left
            raise
        finally:
            self.admission.cancel(app, future)
            if not future.done():
                future.cancel()

    def release(self, app: str, machine_id: str) -> None:
        for future, backend in self.admission.release(app, machine_id):
            if future.done():  # the waiter left: pass the slot on
                self.release(app, backend.machine_id)
            else:
                future.set_result(backend)

    def retry_waiters(self) -> None:
        for app in self.admission.apps():
            for future, backend in self.admission.retry_waiters(app):
                if future.done():
                    self.release(app, backend.machine_id)
                else:
                    future.set_result(backend)

    def release_connection(self, leases: ConnectionLeases) -> None:
        for app, backend in leases.by_app.items():
            self.release(app, backend.machine_id)
        leases.by_app.clear()

    # -- the request path --------------------------------------------------------
    async def handle(self, request: ProxyRequest, leases: ConnectionLeases) -> ProxyResponse:
        started = time.monotonic()
        prior = request.prior
        request_id = (prior.request_id if prior is not None else None) or h.new_request_id()
        table = self._routes().resolve(request.authority, request.local_address, request.local_port)
        app = table.app if table is not None else ""
        try:
            if table is None:
                response = error_response(404, request_id, "no app for this host")
            elif not await self._cpu_turn(app):
                response = error_response(
                    503, request_id, "app over its CPU budget", retry_after=1
                )
            else:
                response = await self._forward(request, request_id, table, leases)
        except HttpError as exc:
            response = error_response(exc.status, request_id, exc.reason)
            response.close = True
        counters = self.counters

        async def count() -> None:
            counters.response(app, response.status, time.monotonic() - started)

        response.on_close.append(count)
        return response

    async def _cpu_turn(self, app: str) -> bool:
        """Charge this task's CPU to ``app``; wait while the app is over its budget."""
        self.cpu.tag(app)
        return await self.cpu.wait_turn(app, self.settings.queue_timeout)

    async def _forward(
        self,
        request: ProxyRequest,
        request_id: bytes,
        table: ServiceTable,
        leases: ConnectionLeases,
    ) -> ProxyResponse:
        hints = parse_routing_hints(request.headers)
        fwd_headers = h.forward_request_headers(
            request.headers, request.client, self.settings.region, request_id
        )
        body = ReplayableBody(request.body) if request.body is not None else None
        informational = _informational_to_client(request.informational, request_id)
        exclude: frozenset[str] = frozenset()
        replayed = False
        attempts = 0
        last_error = "no machine answered"
        prior = request.prior
        if prior is not None and prior.replay is not None:
            self.counters.replays[table.app] += 1
            hints, exclude = prior.replay.hints(prior.machine_id)
            fwd_headers = [*fwd_headers, (h.REPLAY_SOURCE, prior.machine_id.encode())]
            replayed = True
        elif prior is not None:
            self.counters.retries[table.app] += 1
            attempts = 1
            last_error = "the machine failed before answering"
            exclude = frozenset({prior.machine_id})
        while True:
            tables = candidate_tables(table, hints, exclude)
            if not any(t.tiers for t in tables):
                if attempts:
                    return error_response(502, request_id, last_error)
                return error_response(503, request_id, "no machine available")
            backend = await self._slot(table, tables, leases)
            if backend is None:
                return error_response(503, request_id, "app over capacity", retry_after=1)
            attempts += 1
            try:
                upstream = await self._send(
                    backend, table, request, fwd_headers, body, informational
                )
            except ConnectFailed as exc:
                retry = True
                last_error = f"cannot connect: {exc}"
                if exc.host is not None:
                    exclude = exclude | _machines_behind(table, exc.host)
            except UpstreamReset as exc:
                retry = request.method in IDEMPOTENT
                last_error = f"connection reset: {exc}"
            except UpstreamTimeout:
                self.drop_slot(table, backend, leases)
                return error_response(504, request_id, "machine did not answer in time")
            except ClientBodyError as exc:
                self.drop_slot(table, backend, leases)
                response = error_response(exc.status, request_id, exc.reason)
                response.close = True
                return response
            except BaseException:
                self.drop_slot(table, backend, leases)
                raise
            else:
                directive = self._replay_directive(upstream, body, replayed)
                if directive is None:
                    return self._respond(upstream, request_id, table, backend, leases)
                # Replay: drop this answer, send the same request where the machine said.
                await upstream.aclose()
                self.drop_slot(table, backend, leases)
                self.counters.replays[table.app] += 1
                hints, exclude = directive.hints(backend.machine_id)
                fwd_headers = [*fwd_headers, (h.REPLAY_SOURCE, backend.machine_id.encode())]
                replayed = True
                continue
            self.drop_slot(table, backend, leases)
            replayable = body is None or body.replayable
            if not (retry and replayable and attempts < self.settings.max_attempts):
                return error_response(502, request_id, last_error)
            self.counters.retries[table.app] += 1
            exclude = exclude | {backend.machine_id}

    def _replay_directive(
        self, upstream: UpstreamResponse, body: ReplayableBody | None, replayed: bool
    ) -> ReplayDirective | None:
        value = h.header_value(upstream.headers, h.REPLAY)
        if value is None or replayed or upstream.tunnel is not None:
            return None
        if body is not None and not body.replayable:
            return None  # over the 1 MiB replay buffer: the machine's answer stands
        return parse_replay(value)

    async def _slot(
        self, table: ServiceTable, tables: list[ServiceTable], leases: ConnectionLeases
    ) -> Backend | None:
        backend = self.try_slot(table, tables, leases)
        if backend is not None:
            return backend
        backend = await self._wait_for_slot(table.app, tables)
        if backend is not None and table.concurrency_type == "connections":
            self._lease(table.app, backend, leases.by_app.get(table.app), leases)
        return backend

    def try_slot(
        self, table: ServiceTable, tables: list[ServiceTable], leases: ConnectionLeases
    ) -> Backend | None:
        """A machine with a slot taken now, or None when the request must queue (the
        general path then waits; the fast lane hands the request to it)."""
        if table.concurrency_type != "connections":
            return self.admission.try_acquire(table.app, tables)
        held = leases.by_app.get(table.app)
        if held is not None and any(held in tier for t in tables for tier in t.tiers):
            return held  # this connection already counts against that machine
        backend = self.admission.try_acquire(table.app, tables)
        if backend is not None:
            self._lease(table.app, backend, held, leases)
        return backend

    def _lease(
        self, app: str, backend: Backend, held: Backend | None, leases: ConnectionLeases
    ) -> None:
        if held is not None:
            self.release(app, held.machine_id)
        leases.by_app[app] = backend

    def end_slot(self, table: ServiceTable, backend: Backend) -> None:
        """A request finished: give its slot back (a connection's lease stays)."""
        if table.concurrency_type != "connections":
            self.release(table.app, backend.machine_id)

    def is_local(self, backend: Backend) -> bool:
        """The machine is on this host: reached directly, not over the backhaul."""
        return address_text(backend.worker_address) in self.settings.host_addresses

    def drop_slot(self, table: ServiceTable, backend: Backend, leases: ConnectionLeases) -> None:
        """End this request's claim on ``backend`` (a failed or replayed attempt)."""
        if table.concurrency_type == "connections":
            if leases.by_app.get(table.app) == backend:
                del leases.by_app[table.app]
                self.release(table.app, backend.machine_id)
        else:
            self.release(table.app, backend.machine_id)

    async def _send(
        self,
        backend: Backend,
        table: ServiceTable,
        request: ProxyRequest,
        fwd_headers: Headers,
        body: ReplayableBody | None,
        informational: Informational | None,
    ) -> UpstreamResponse:
        timeout = self.settings.response_timeout
        if self.is_local(backend):
            host = [(b"host", request.authority)] if request.authority else []
            machine_request = MachineRequest(
                request.method,
                request.target,
                host + fwd_headers,
                body,
                request.content_length,
                request.websocket,
                informational,
            )
            return await self.machines.exchange(
                address_text(backend.address), backend.port, machine_request, timeout
            )
        backhaul_request = BackhaulRequest(
            app=table.app,
            method=request.method,
            target=request.target,
            authority=request.authority or b"",
            scheme=request.client.scheme.encode(),
            headers=[*fwd_headers, *_length_header(request)],
            body=body,
            websocket=request.websocket,
            informational=informational,
        )
        return await self.backhaul.exchange(backend, backhaul_request, timeout)

    def _respond(
        self,
        upstream: UpstreamResponse,
        request_id: bytes,
        table: ServiceTable,
        backend: Backend,
        leases: ConnectionLeases,
    ) -> ProxyResponse:
        response = ProxyResponse(
            upstream.status,
            upstream.reason,
            h.client_response_headers(upstream.headers, request_id),
            upstream.body,
            upstream.tunnel,
        )
        response.on_close.append(upstream.aclose)

        async def release() -> None:
            self.end_slot(table, backend)

        response.on_close.append(release)
        return response


def _informational_to_client(
    send: Informational | None, request_id: bytes
) -> Informational | None:
    """A machine's 1xx as its client gets it: the fields stripped exactly as a final
    response's are (``client_response_headers``), then handed to the frontend."""
    if send is None:
        return None

    def relay(status: int, reason: bytes, headers: Headers) -> None:
        send(status, reason, h.client_response_headers(headers, request_id))

    return relay


def _machines_behind(table: ServiceTable, worker: str) -> frozenset[str]:
    return frozenset(
        b.machine_id for tier in table.tiers for b in tier if str(b.worker_address) == worker
    )


def _length_header(request: ProxyRequest) -> Headers:
    if request.content_length is not None and request.body is not None:
        return [(b"content-length", str(request.content_length).encode())]
    return []


async def drain_quietly(body: BodyReader, limit: int) -> bool:
    """Read and drop up to ``limit`` bytes; True if the body ended within it."""
    seen = 0
    with contextlib.suppress(Exception):
        while seen <= limit:
            chunk = await body.read()
            if not chunk:
                return True
            seen += len(chunk)
    return False
