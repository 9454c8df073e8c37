"""The HTTP backhaul: edge → worker over one multiplexed HTTP/2 (h2c) connection
per worker, shared by all apps and requests.

A request travels as one stream. The target machine is named by the internal
``edgeproxy-target: <address>:<port>`` header (``edgeproxy-app`` names the app);
the edge strips client copies of every ``edgeproxy-*`` header, and the worker
delivers only to machines its own routing table places on this host.
WebSocket upgrades travel as RFC 8441 extended CONNECT (``:protocol websocket``);
the Sec-WebSocket-Key is carried through so the machine's accept value reaches
the client unchanged, and the stream then carries the raw WebSocket bytes.
A worker that cannot reach the machine answers 502/504 with
``edgeproxy-upstream-error: connect|reset|timeout`` so the edge applies the same
retry rules as for a machine on its own host.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgeproxy.proxy import headers as h
from edgeproxy.proxy.bodies import BodyReader, ReplayableBody, read_ready, trailers_of
from edgeproxy.proxy.cpushare import CpuMeter
from edgeproxy.proxy.h2session import ErrorCodes, H2Session, H2Stream, StreamReset
from edgeproxy.proxy.machines import MachinePool, MachineRequest
from edgeproxy.proxy.responses import forwarded_informational
from edgeproxy.proxy.routes import RouteMap
from edgeproxy.proxy.upstream import (
    ClientBodyError,
    ConnectFailed,
    Headers,
    Informational,
    UpstreamError,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
    splice,
)
from edgeproxy.routing import Backend, address_text

# Response headers HTTP/2 forbids (RFC 9113 8.2.2), beyond the hop-by-hop set.
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class BackhaulHealth:
    worker: str
    state: str  # "up" | "down" | "idle"
    rtt_seconds: float | None
    open_streams: int
    connects: int
    failures: int


@dataclass(frozen=True, slots=True)
class BackhaulRequest:
    app: str
    method: bytes
    target: bytes
    authority: bytes
    scheme: bytes
    headers: Headers  # forwarded headers, no host, no hop-by-hop
    body: ReplayableBody | None
    websocket: bool = False
    informational: Informational | None = None  # the response's 1xx go here


class _Link:
    """The connection to one worker: connect on demand, PING, reconnect with backoff."""

    def __init__(self, client: BackhaulClient, worker: str) -> None:
        self.client = client
        self.worker = worker
        self.session: H2Session | None = None
        self._lock = asyncio.Lock()
        self.backoff = 0.0
        self.retry_at = 0.0
        self.rtt: float | None = None
        self.connects = 0
        self.failures = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def get(self) -> H2Session:
        session = self.session
        if session is not None and not session.draining:
            return session
        async with self._lock:
            session = self.session
            if session is not None and not session.draining:
                return session
            if time.monotonic() < self.retry_at:
                raise ConnectFailed(f"backhaul to {self.worker} down (backing off)", self.worker)
            return await self._connect()

    async def _connect(self) -> H2Session:
        client = self.client
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.worker,
                    client.port,
                    local_addr=(client.source_address, 0) if client.source_address else None,
                ),
                client.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self._mark_failed()
            raise ConnectFailed(f"backhaul to {self.worker}: {exc!r}", self.worker) from exc
        session = H2Session(
            reader,
            writer,
            client_side=True,
            stream_window=client.stream_window,
        )
        session.start()
        self.session = session
        self.connects += 1
        self.backoff = 0.0
        self.retry_at = 0.0
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(session)), loop.create_task(self._ping(session))]
        return session

    def _mark_failed(self) -> None:
        self.failures += 1
        self.backoff = min(max(self.backoff * 2, self.client.min_backoff), self.client.max_backoff)
        self.retry_at = time.monotonic() + self.backoff

    async def _run(self, session: H2Session) -> None:
        await session.run()
        if self.session is session:
            self.session = None

    async def _ping(self, session: H2Session) -> None:
        # A worker that stops answering PINGs is dead to us: fail its streams now
        # (requests retry elsewhere) instead of waiting for TCP to notice.
        while not session.closed.is_set():
            await asyncio.sleep(self.client.ping_interval)
            try:
                self.rtt = await asyncio.wait_for(session.ping(), self.client.ping_timeout)
            except (TimeoutError, ConnectionError):
                if not session.closed.is_set():
                    self._mark_failed()
                    session.close(ErrorCodes.NO_ERROR)
                return

    def health(self) -> BackhaulHealth:
        session = self.session
        if session is not None and not session.closed.is_set():
            state, streams = "up", session.open_streams
        else:
            state, streams = ("down" if self.retry_at > time.monotonic() else "idle"), 0
        return BackhaulHealth(self.worker, state, self.rtt, streams, self.connects, self.failures)

    async def close(self) -> None:
        if self.session is not None:
            self.session.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task


class BackhaulClient:
    """Edge side: one pooled HTTP/2 connection per worker, a stream cap per app."""

    def __init__(
        self,
        *,
        port: int,
        connect_timeout: float,
        read_timeout: float,
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        per_app_streams: int = 256,
        stream_window: int = 1024 * 1024,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
        source_address: str | None = None,
    ) -> None:
        self.port = port
        # Connect from the edge's host address: workers accept backhaul connections
        # only from edge host addresses (HttpProxy.allow_backhaul_from).
        self.source_address = source_address
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.per_app_streams = per_app_streams
        self.stream_window = stream_window
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._links: dict[str, _Link] = {}
        self._app_streams: dict[str, int] = {}

    def health(self) -> dict[str, BackhaulHealth]:
        return {worker: link.health() for worker, link in self._links.items()}

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()
        self._links.clear()

    def _link(self, worker: str) -> _Link:
        link = self._links.get(worker)
        if link is None:
            link = self._links[worker] = _Link(self, worker)
        return link

    async def exchange(
        self, backend: Backend, request: BackhaulRequest, response_timeout: float
    ) -> UpstreamResponse:
        app = request.app
        # Per-app cap: one app cannot take every stream of a shared connection.
        if self._app_streams.get(app, 0) >= self.per_app_streams:
            raise ConnectFailed(f"app {app} at its backhaul stream cap")
        release = self._take_stream(app)
        try:
            session = await self._link(str(backend.worker_address)).get()
            stream = await session.open_stream(
                _request_headers(backend, request),
                # A tunnel stays open for the client's bytes; otherwise no body, no DATA.
                end_stream=request.body is None and not request.websocket,
                informational=from_h2_informational(request.informational),
            )
        except StreamReset as exc:
            release()
            raise ConnectFailed(str(exc)) from exc
        except BaseException:
            release()
            raise
        # No body: no upload task (the request already ended with its HEADERS frame).
        upload = (
            asyncio.ensure_future(_upload(stream, request.body))
            if request.body is not None
            else None
        )
        try:
            async with asyncio.timeout(response_timeout):
                response = await _response_head(stream, upload)
        except BaseException as exc:
            stream.reset()
            _cancel(upload)
            release()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout("no response head over backhaul") from exc
            raise
        status, headers = response
        error = h.header_value(headers, h.UPSTREAM_ERROR)
        if error is not None:
            stream.reset()
            _cancel(upload)
            release()
            raise {b"connect": ConnectFailed, b"timeout": UpstreamTimeout}.get(
                error, UpstreamReset
            )(f"worker: {error.decode('latin-1')}")
        body = _StreamBody(stream, self.read_timeout)

        async def finish() -> None:
            if not (stream.remote_ended and (upload is None or upload.done())):
                stream.reset()
            _cancel(upload)
            release()

        if request.websocket and 200 <= status < 300:
            return UpstreamResponse(
                101, b"Switching Protocols", headers, body, StreamTunnel(stream), finish
            )
        return UpstreamResponse(status, b"", headers, body, None, finish)


    def _take_stream(self, app: str) -> Callable[[], None]:
        """Count one stream of ``app`` against its cap; the function gives it back
        (once, however often it is called)."""
        self._app_streams[app] = self._app_streams.get(app, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._app_streams[app] - 1
                if left:
                    self._app_streams[app] = left
                else:
                    del self._app_streams[app]

        return release

    def open_now(
        self, backend: Backend, app: str, headers: Headers,
        informational: Callable[[Headers], None] | None,
    ) -> tuple[H2Stream, Callable[[], None]] | None:
        """A bodiless request's stream opened at once, with the function that gives
        its place under the app's stream cap back; None when that needs waiting (no
        connection yet, the app at its cap, the peer's stream limit reached) or the
        connection is draining: the caller then takes the path that waits
        (``exchange``)."""
        if self._app_streams.get(app, 0) >= self.per_app_streams:
            return None
        link = self._links.get(address_text(backend.worker_address))
        session = link.session if link is not None else None
        if session is None or session.draining:
            return None
        try:
            stream = session.open_stream_now(headers, True, informational)
        except StreamReset:
            return None
        if stream is None:
            return None
        return stream, self._take_stream(app)


def request_fields(
    backend: Backend, app: str, method: bytes, scheme: bytes, authority: bytes, target: bytes,
    websocket: bool = False,
) -> Headers:
    """A backhaul stream's pseudo-headers and internal fields (the forwarded header
    list follows them)."""
    pseudo: Headers = [
        (b":method", b"CONNECT" if websocket else method),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", target),
    ]
    if websocket:
        pseudo.append((b":protocol", b"websocket"))
    pseudo.append((h.TARGET, b"%s:%d" % (address_text(backend.address).encode(), backend.port)))
    pseudo.append((h.APP, app.encode()))
    return pseudo


def response_fields(raw: Headers) -> tuple[int, Headers]:
    """A backhaul response head as (status, fields without pseudo-headers)."""
    status = 0
    headers: Headers = []
    for name, value in raw:
        if name == b":status":
            status = int(value)
        elif not name.startswith(b":"):
            headers.append((name, value))
    return status, headers


def from_h2_informational(
    informational: Informational | None,
) -> Callable[[Headers], None] | None:
    """The worker relays a machine's 1xx as an informational HEADERS frame; this turns
    one back into (status, reason, fields) for the edge's client."""
    if informational is None:
        return None

    def relay(raw: Headers) -> None:
        status = 0
        fields: Headers = []
        for name, value in raw:
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif not name.startswith(b":"):
                fields.append((name, value))
        # The worker's parser already bounded and filtered them; check the range anyway.
        if 100 <= status < 200 and forwarded_informational(status):
            informational(status, b"", fields)

    return relay


def _request_headers(backend: Backend, request: BackhaulRequest) -> Headers:
    fields = request_fields(backend, request.app, request.method, request.scheme,
                            request.authority, request.target, request.websocket)
    return fields + request.headers


async def _upload(stream: H2Stream, body: ReplayableBody | None) -> None:
    if body is None:
        return
    cursor = body.cursor()
    while chunk := await cursor.read():
        await stream.write(chunk)
    trailers = h.forwardable_request_trailers(trailers_of(cursor))
    if trailers:  # the client's trailer fields: a trailing HEADERS frame ends the stream
        stream.send_headers(trailers, end_stream=True)
    else:
        stream.end()


def _cancel(upload: asyncio.Future[None] | None) -> None:
    if upload is not None:
        upload.cancel()


async def _response_head(
    stream: H2Stream, upload: asyncio.Future[None] | None
) -> tuple[int, Headers]:
    if upload is None:
        with contextlib.suppress(StreamReset):
            await stream.headers
    both: set[asyncio.Future[object]] = {stream.headers, upload}  # type: ignore[arg-type]
    while upload is not None and not stream.headers.done():
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if upload.done() and not stream.headers.done():
            error = upload.exception()
            if isinstance(error, ClientBodyError):
                raise error
            if error is not None:
                raise UpstreamReset(f"backhaul upload failed: {error!r}")
            both = {stream.headers}  # type: ignore[arg-type]
    try:
        raw = stream.headers.result()
    except StreamReset as exc:
        raise UpstreamReset(str(exc)) from exc
    return response_fields(raw)


class _StreamBody:
    def __init__(self, stream: H2Stream, read_timeout: float) -> None:
        self._stream = stream
        self._timeout = read_timeout

    async def read(self) -> bytes:
        try:
            return await self._stream.read_within(self._timeout)
        except (StreamReset, TimeoutError) as exc:
            raise UpstreamReset(f"backhaul body: {exc!r}") from exc

    def read_ready(self) -> bytes | None:
        try:
            return self._stream.read_ready()
        except StreamReset:
            return None  # read() raises it

    def trailers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._stream.trailers


class StreamTunnel:
    """An HTTP/2 stream used as a raw byte pipe (after extended CONNECT)."""

    def __init__(self, stream: H2Stream) -> None:
        self._stream = stream

    async def read(self) -> bytes:
        try:
            return await self._stream.read()
        except StreamReset:
            return b""

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    def close_write(self) -> None:
        with contextlib.suppress(StreamReset):
            self._stream.end()

    def close(self) -> None:
        if not (self._stream.remote_ended):
            self._stream.reset()


# --------------------------------------------------------------------------- worker side


@dataclass(slots=True)
class WorkerContext:
    machines: MachinePool
    routes: Callable[[], RouteMap]
    host_addresses: frozenset[str]
    response_timeout: float
    tunnel_idle_timeout: float
    cpu: CpuMeter | None = None  # per-app CPU measurement (edges bound it, workers report it)


async def serve_backhaul_stream(stream: H2Stream, ctx: WorkerContext) -> None:
    """Deliver one backhauled request to a machine on this host and stream it back."""
    prepared = prepare_delivery(stream, ctx)
    if prepared is None:
        return
    backend, request = prepared
    try:
        response = await ctx.machines.exchange(
            str(backend.address), backend.port, request, ctx.response_timeout
        )
    except ConnectFailed:
        answer_error(stream, 502, b"connect")
        return
    except UpstreamTimeout:
        answer_error(stream, 504, b"timeout")
        return
    except (UpstreamError, ClientBodyError):
        answer_error(stream, 502, b"reset")
        return
    try:
        await _relay_response(stream, response, request.method, request.websocket, ctx)
    except (StreamReset, UpstreamError, ConnectionError, OSError):
        stream.reset()
    finally:
        await response.aclose()


def prepare_delivery(
    stream: H2Stream, ctx: WorkerContext
) -> tuple[Backend, MachineRequest] | None:
    """The machine and the request it gets for a backhaul stream, after every check
    (the task path and the callback path, workerlane.py, share it); None when the
    stream was answered with an error already."""
    pseudo: dict[bytes, bytes] = {}
    fields: Headers = []
    for name, value in stream.headers.result():  # one pass: this runs per request
        if name[:1] == b":":
            pseudo[name] = value
        else:
            fields.append((name, value))
    target = h.header_value(fields, h.TARGET) or b""
    backend = _local_backend(ctx, target)
    if backend is None:
        answer_error(stream, 502, b"connect")
        return None
    if ctx.cpu is not None:
        ctx.cpu.tag(backend.app)
    websocket = pseudo.get(b":method") == b"CONNECT" and pseudo.get(b":protocol") == b"websocket"
    method = b"GET" if websocket else pseudo.get(b":method", b"GET")
    content_length = h.header_value(fields, b"content-length")
    if content_length is not None and not content_length.isdigit():
        answer_error(stream, 400, b"bad-request")
        return None
    # The backhaul session skips h2's inbound header checks (cost); what they guarded
    # is enforced here: names must be tokens, no hop-by-hop or framing field passes
    # (we frame the request ourselves), and machines.serialize_head refuses CR/LF/NUL.
    if not _names_ok(fields):
        answer_error(stream, 400, b"bad-request")
        return None
    delivered = [(b"host", pseudo.get(b":authority", b""))] + [
        (n, v) for n, v in fields if n not in _NOT_DELIVERED and n not in h.HOP_BY_HOP
    ]
    has_body = not websocket and not stream.ended_with_headers
    body = ReplayableBody(_StreamReader(stream), limit=64 * 1024) if has_body else None

    def informational(status: int, reason: bytes, headers: Headers) -> None:
        relay_informational(stream, status, headers)

    request = MachineRequest(
        method=method,
        target=pseudo.get(b":path", b"/"),
        headers=delivered,
        body=body,
        content_length=int(content_length) if content_length is not None else None,
        websocket=websocket,
        informational=informational,
    )
    return backend, request


def relay_informational(stream: H2Stream, status: int, headers: Headers) -> None:
    """The machine's 1xx travels on as an informational HEADERS frame (no
    END_STREAM); the edge decides whether its client gets it."""
    with contextlib.suppress(StreamReset):
        stream.send_headers(status_fields(status, h.strip_hop_by_hop(headers)))


_NOT_DELIVERED = frozenset({h.TARGET, h.APP, b"content-length", b"host"})
_NAMES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9a-z]+\n)*")


def _names_ok(fields: Headers) -> bool:
    """Every field name a lower-case token (one regex over all names)."""
    return _NAMES.fullmatch(b"".join([n + b"\n" for n, _ in fields])) is not None


def _local_backend(ctx: WorkerContext, target: bytes) -> Backend | None:
    address, _, port = target.decode("latin-1").rpartition(":")
    if not port.isdigit():
        return None
    backend = ctx.routes().machines_by_target.get((address, int(port)))
    if backend is None or address_text(backend.worker_address) not in ctx.host_addresses:
        return None
    return backend


async def _relay_response(
    stream: H2Stream, response: UpstreamResponse, method: bytes, websocket: bool, ctx: WorkerContext
) -> None:
    headers = h.strip_hop_by_hop(response.headers)
    if response.tunnel is not None:
        stream.send_headers(status_fields(200, headers))
        await splice(StreamTunnel(stream), response.tunnel, ctx.tunnel_idle_timeout)
        return
    no_body = method == b"HEAD" or response.status in _NO_BODY_STATUSES or response.status < 200
    if no_body:
        stream.send_headers(status_fields(response.status, headers), end_stream=True)
        return
    await send_body(stream, status_fields(response.status, headers), response.body)


def status_fields(status: int, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """An HTTP/2 response header block (final or interim) from already-stripped fields."""
    return [(b":status", b"%d" % status), *[(n.lower(), v) for n, v in headers]]


async def send_body(stream: H2Stream, headers: Headers, body: BodyReader) -> None:
    """HEADERS, then the body, then the body's trailer fields (if any, after
    ``forwardable_trailers``) as a trailing HEADERS frame with END_STREAM; a body
    already buffered whole leaves in the same batch with END_STREAM on its one DATA
    frame (or on HEADERS when empty)."""
    first = read_ready(body)
    if first is not None:
        second = read_ready(body) if first else b""
        if second == b"":
            trailers = _trailers(body)
            stream.send_headers(headers, end_stream=not first and not trailers)
            if first:
                await stream.write(first, end=not trailers)
            if trailers:
                stream.send_headers(trailers, end_stream=True)
            return
        stream.send_headers(headers)
        await stream.write(first)
        if second:
            await stream.write(second)
    else:
        stream.send_headers(headers)
    while chunk := await body.read():
        await stream.write(chunk)
    trailers = _trailers(body)
    if trailers:
        stream.send_headers(trailers, end_stream=True)
    else:
        stream.end()


def _trailers(body: BodyReader) -> Headers | None:
    """The body's trailer fields to send on, None when there are none (no list)."""
    return h.forwardable_trailers(trailers_of(body)) or None


def answer_error(stream: H2Stream, status: int, kind: bytes) -> None:
    with contextlib.suppress(StreamReset):
        stream.send_headers(
            [
                (b":status", str(status).encode()),
                (h.UPSTREAM_ERROR, kind),
                (b"content-length", b"0"),
            ],
            end_stream=True,
        )
    # The request body (if any) will never be read: stop the edge sending it.
    if not stream.remote_ended:
        stream.reset(ErrorCodes.NO_ERROR)


class _StreamReader:
    def __init__(self, stream: H2Stream) -> None:
        self._stream = stream

    async def read(self) -> bytes:
        try:
            return await self._stream.read()
        except StreamReset as exc:
            raise ClientBodyError(400, "backhaul stream reset") from exc

    def trailers(self) -> Headers:
        return self._stream.trailers
