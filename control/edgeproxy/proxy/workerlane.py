"""The worker's fast lane: a plain backhaul stream served on callbacks.

A stream whose request arrived complete (END_STREAM on its HEADERS) and is no
extended CONNECT passes the same checks as on the task path
(``backhaul.prepare_delivery``: names, target, machine on this host), gets the same
HTTP/1.1 head (``machines.serialize_head``) on a pooled, callback-driven machine
connection (the lane's ``UpstreamPool``), and the machine's response, framed by
``ResponseParser``, goes back as HEADERS/DATA from the protocol callbacks: no task,
no timer per request. 1xx leave as informational HEADERS and trailers as trailing
HEADERS (``relay_informational``, ``forwardable_trailers``), as on the task path.

Flow control: DATA is queued with ``H2Stream.write_nowait``; once the stream holds
more than ``SEND_BUFFER`` beyond its window the machine socket is not read until
the session reports the stream writable again. Deadlines (response head, then each
body read; none while the stream is the one holding back) are checked by the lane's
sweeper. Failures answer as the task path does: ``answer_error`` 502 ``connect`` /
``reset``, 504 ``timeout``, and a reset of the stream once its head went out.
Everything else (bodies, WebSockets) keeps the task path (``serve_backhaul_stream``).
"""

from __future__ import annotations

import contextlib
import logging
from time import perf_counter

from edgeproxy.proxy import headers as h
from edgeproxy.proxy._lane import UpstreamConnection
from edgeproxy.proxy.backhaul import (
    WorkerContext,
    answer_error,
    prepare_delivery,
    relay_informational,
    status_fields,
)
from edgeproxy.proxy.fastlane import FastLane
from edgeproxy.proxy.h2session import H2Stream, Headers, StreamReset
from edgeproxy.proxy.machines import MachineRequest, UnsendableRequest, serialize_head
from edgeproxy.proxy.messages import END, NEED_DATA, Data, ResponseError, ResponseHead
from edgeproxy.proxy.responses import ResponseParser, forwarded_informational
from edgeproxy.routing import address_text

log = logging.getLogger(__name__)

_FOREVER = float("inf")


class BackhaulLane:
    """Offered every new backhaul stream by the worker's ``H2Session``."""

    def __init__(self, ctx: WorkerContext, lane: FastLane) -> None:
        self.ctx = ctx
        self.lane = lane
        self.lane_requests = 0  # streams served on callbacks
        self.general_requests = 0  # streams given a task (serve_backhaul_stream)

    def serve(self, stream: H2Stream) -> bool:
        """True: the stream is served (or answered) here, without a task."""
        if not stream.ended_with_headers:
            self.general_requests += 1  # a body follows: the task path streams it
            return False
        for name, value in stream.headers.result():
            if name == b":method":
                if value == b"CONNECT":
                    self.general_requests += 1
                    return False
                break
        cpu = self.lane.cpu
        clock = perf_counter() if cpu.busy else 0.0
        self.lane_requests += 1
        prepared = prepare_delivery(stream, self.ctx)
        if prepared is None:
            return True  # answered with the task path's error
        backend, request = prepared
        try:
            wire = serialize_head(request)
        except UnsendableRequest:
            answer_error(stream, 502, b"connect")  # as MachinePool.exchange refuses it
            return True
        key = (address_text(backend.address), backend.port)
        exchange = StreamExchange(self, stream, request, key, backend.app, wire)
        exchange.start()
        if clock:
            cpu.charge(backend.app, perf_counter() - clock)
        return True


class StreamExchange:
    """One plain backhaul stream and its machine exchange (a ``PooledExchange``)."""

    __slots__ = (
        "app",
        "blocked",
        "deadline",
        "head",
        "key",
        "lane",
        "live",
        "method",
        "replied",
        "request",
        "reused",
        "sent",
        "stream",
        "upstream",
        "wire",
    )

    def __init__(
        self,
        lane: BackhaulLane,
        stream: H2Stream,
        request: MachineRequest,
        key: tuple[str, int],
        app: str,
        wire: bytes,
    ) -> None:
        self.lane = lane
        self.stream = stream
        self.request = request
        self.key = key
        self.app = app
        self.wire = wire
        self.method = request.method
        self.upstream: UpstreamConnection | None = None
        self.reused = False
        self.sent = False
        self.live = True
        self.replied = False  # the final response head was parsed
        self.blocked = False  # the stream holds more than it may: machine not read
        self.head: Headers | None = None  # the final head, not yet sent
        self.deadline = 0.0

    def start(self) -> None:
        fast = self.lane.lane
        now = self.stream.session._loop.time()
        self.deadline = now + self.lane.ctx.response_timeout
        fast.watched.add(self)
        self.stream.watcher = self
        fast.pool.send(self, now)

    # -- PooledExchange ----------------------------------------------------------------
    def active(self) -> bool:
        return self.live

    def paused_out(self) -> bool:
        return self.blocked

    def pump(self, parser: ResponseParser) -> None:
        """Turn what the machine sent so far into frames on the stream."""
        if not self.live:
            return
        out: list[bytes] = []
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Data):
                    out.append(event.data)
                elif isinstance(event, ResponseHead):
                    status = event.status
                    if status < 200:
                        if status == 101:
                            raise ResponseError("101 to a request that asked for no upgrade")
                        if forwarded_informational(status):
                            relay_informational(self.stream, status, event.headers)
                        continue
                    self.replied = True
                    self.head = status_fields(status, h.strip_hop_by_hop(event.headers))
                else:
                    assert event is END
                    trailers = h.forwardable_trailers(parser.trailers) or None
                    self._send(out, end=trailers is None)
                    if trailers is not None:
                        self.stream.send_headers(trailers, end_stream=True)
                    self._finish(parser)
                    return
            self._send(out, end=False)
        except ResponseError as exc:
            if self.replied:
                self._send_quietly(out)
            self.fail(f"bad response from machine: {exc}")
            return
        except StreamReset:
            self.stream_failed()
            return
        if self.live and self.replied and not self.blocked:
            # The head's deadline runs from the send; after it, one per read.
            self.deadline = self.stream.session._loop.time() + self._read_timeout()

    def _read_timeout(self) -> float:
        return self.lane.lane.settings.read_timeout

    def _send(self, out: list[bytes], end: bool) -> None:
        """The pending head (if any) and this read's DATA, END_STREAM on the last frame."""
        stream = self.stream
        data = out[0] if len(out) == 1 else b"".join(out)
        head = self.head
        if head is not None:
            self.head = None
            stream.send_headers(head, end_stream=end and not data)
            if not data:
                return
        elif not data and not end:
            return
        if stream.write_nowait(data, end):
            self.blocked = True
            self.deadline = _FOREVER  # the edge holds back, not the machine
            if self.upstream is not None:
                self.upstream.pause()

    def _send_quietly(self, out: list[bytes]) -> None:
        with contextlib.suppress(StreamReset):
            self._send(out, end=False)

    def _finish(self, parser: ResponseParser) -> None:
        self._end()
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.exchange = None
            if parser.done and parser.keep_alive and not parser.buffer:
                self.lane.lane.pool.put_idle(up, self.stream.session._loop.time())
            else:
                up.close()

    def _end(self) -> None:
        self.live = False
        self.lane.lane.watched.discard(self)
        if self.stream.watcher is self:
            self.stream.watcher = None

    def _release(self) -> None:
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.exchange = None
            up.close()

    # -- failures ------------------------------------------------------------------------
    def connect_failed(self, reason: str) -> None:
        if not self.live:
            return
        log.debug("backhaul stream: %s", reason)
        self._release()
        self._end()
        answer_error(self.stream, 502, b"connect")

    def fail(self, reason: str, stale: bool = False) -> None:
        """The machine failed (reset, close, garbage)."""
        if not self.live:
            return
        if stale and self.reused and not self.replied:
            # Keep-alive race, as MachinePool handles it: resend once on a fresh one.
            self._release()
            self.sent = False
            self.lane.lane.pool.connect(self)
            return
        log.debug("backhaul stream: %s", reason)
        self._release()
        self._end()
        if not self.replied:
            answer_error(self.stream, 502, b"reset")
        else:
            self.stream.reset()  # part of the response is out: the edge sees a reset

    def check_deadline(self, now: float) -> None:
        if now <= self.deadline or not self.live:
            return
        if self.replied:
            self.fail("machine body read timed out")
            return
        self._release()
        self._end()
        answer_error(self.stream, 504, b"timeout")

    # -- StreamWatcher -----------------------------------------------------------------
    def stream_writable(self) -> None:
        if self.live and self.blocked and self.stream.window_open():
            self.blocked = False
            self.deadline = self.stream.session._loop.time() + self._read_timeout()
            if self.upstream is not None:
                self.upstream.resume()

    def stream_failed(self) -> None:
        """The edge reset the stream, or the backhaul connection went away."""
        if not self.live:
            return
        self._release()
        self._end()
