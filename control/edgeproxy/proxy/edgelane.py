"""The edge's fast lane over the backhaul: a plain bodiless request to a machine on
another host, served on callbacks.

The client connection's lane (``_lane.ClientConnection``) routes the request as
for a machine on this host (``FastLane.route``: the same admission and balancing
rule). When the machine is behind the backhaul and the worker's connection is up,
the request leaves at once as one HEADERS frame with END_STREAM
(``BackhaulClient.open_now``: within the app's stream cap and the peer's stream
limit), with the fields the general path sends (``request_fields`` then
``headers.forward_request_headers``). The response comes back from the session's
frame callbacks (``H2Stream.on_event``): the head becomes the client's HTTP/1.1 head
(``_http1.client_head``, the local lane's framing), DATA goes out as it arrives,
chunk-framed when the client gets chunked, trailers close a chunked body. No task,
no future, no timer per request: the lane's sweeper checks the deadlines.

Failures take the general path's rules: a worker that could not reach the machine
(``edgeproxy-upstream-error: connect``) or a reset before the answer, for an
idempotent request, goes to the general path as a failed attempt (``PriorAttempt``,
which retries on another machine); a replay directive goes to it as a replay; a
worker timeout is 504; a non-idempotent request the worker may have acted on is
502, never sent twice. Anything else (bodies, WebSockets, no connection yet, the
app at its cap) keeps the general path.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from edgeproxy.proxy import headers as h
from edgeproxy.proxy._http1 import client_head
from edgeproxy.proxy._lane import ClientConnection, error_bytes
from edgeproxy.proxy.backhaul import (
    BackhaulClient,
    from_h2_informational,
    request_fields,
    response_fields,
)
from edgeproxy.proxy.forward import IDEMPOTENT, PriorAttempt
from edgeproxy.proxy.frontend_h1 import head_bytes, response_end_chunk
from edgeproxy.proxy.h2session import H2Stream, StreamReset
from edgeproxy.proxy.messages import RequestHead, ResponseHead
from edgeproxy.proxy.targeting import parse_replay
from edgeproxy.routing import Backend, ServiceTable

if TYPE_CHECKING:
    from edgeproxy.proxy.fastlane import FastLane

log = logging.getLogger(__name__)

_FOREVER = float("inf")


class EdgeBackhaulLane:
    """Starts the lane's requests for machines behind the backhaul."""

    def __init__(self, lane: FastLane, client: BackhaulClient) -> None:
        self.lane = lane
        self.client = client
        self.region = lane.settings.region

    def start(
        self,
        conn: ClientConnection,
        head: RequestHead,
        table: ServiceTable,
        backend: Backend,
        request_id: bytes,
        started: float,
    ) -> RemoteExchange | None:
        """The request on its way, or None: the general path takes it (the caller
        gives the slot back first)."""
        host = head.header(b"host") or b""
        fields = request_fields(backend, table.app, head.method, conn.client.scheme.encode(),
                                host, head.target)
        fields += h.forward_request_headers(
            [(n, v) for n, v in head.headers if n != b"host"], conn.client, self.region,
            request_id,
        )
        exchange = RemoteExchange(self, conn, head, table, backend, request_id, started)
        relay = exchange.interim if head.http_version == b"1.1" else None
        opened = self.client.open_now(backend, table.app, fields, from_h2_informational(relay))
        if opened is None:
            return None
        exchange.stream, exchange.release = opened
        exchange.stream.on_event = exchange.on_event
        exchange.stream.watcher = exchange
        return exchange


class RemoteExchange:
    """One plain request on a backhaul stream, and its response on the way back."""

    __slots__ = (
        "backend",
        "chunked",
        "conn",
        "deadline",
        "head",
        "keep",
        "lane",
        "release",
        "replied",
        "request_id",
        "started",
        "status",
        "stream",
        "table",
    )

    def __init__(
        self,
        lane: EdgeBackhaulLane,
        conn: ClientConnection,
        head: RequestHead,
        table: ServiceTable,
        backend: Backend,
        request_id: bytes,
        started: float,
    ) -> None:
        self.lane = lane
        self.conn = conn
        self.head = head
        self.table = table
        self.backend = backend
        self.request_id = request_id
        self.started = started
        self.stream: H2Stream | None = None
        self.release = _nothing
        self.replied = False  # the response head went to the client
        self.status = 0
        self.chunked = False
        self.keep = False
        self.deadline = conn.loop.time() + lane.lane.settings.response_timeout

    # -- from the worker -------------------------------------------------------------
    def interim(self, status: int, reason: bytes, fields: list[tuple[bytes, bytes]]) -> None:
        """A machine's 1xx, relayed by the worker, on to an HTTP/1.1 client."""
        if self.conn.exchange is self and not self.replied:
            self.conn.write(head_bytes(status, reason,
                                       h.client_response_headers(fields, self.request_id)))

    def on_event(self) -> None:
        """The stream's head, DATA or end arrived: pass on what the client can take."""
        stream = self.stream
        if stream is None or self.conn.exchange is not self:
            return
        cpu = self.lane.lane.cpu
        clock = time.perf_counter() if cpu.busy else 0.0
        try:
            if not self.replied and (not stream.headers.done() or not self._head(stream)):
                return
            self._relay(stream)
        except StreamReset:
            self.stream_failed()
        if clock:
            cpu.charge(self.table.app, time.perf_counter() - clock)

    def _head(self, stream: H2Stream) -> bool:
        """The response head to the client; False if the exchange ended instead."""
        status, fields = response_fields(stream.headers.result())
        error = h.header_value(fields, h.UPSTREAM_ERROR)
        if error is not None:  # the worker could not get an answer from the machine
            self._close_stream()
            if error == b"timeout":
                self._answer(504, "machine did not answer in time")
            else:
                self._failed(f"worker: {error.decode('latin-1')}", error == b"connect")
            return False
        value = h.header_value(fields, h.REPLAY)
        directive = parse_replay(value) if value is not None else None
        if directive is not None:
            self._close_stream()
            self._handover(PriorAttempt(self.backend.machine_id, directive, self.request_id))
            return False
        response = ResponseHead(status, b"", fields, b"1.1")
        made = client_head(response, self.head, self.request_id, False, False)
        assert made is not None  # no replay check asked for
        wire, self.chunked, self.keep = made
        self.status = status
        self.replied = True
        self.conn.write(wire)
        return True

    def _relay(self, stream: H2Stream) -> None:
        conn = self.conn
        out: list[bytes] = []
        while not conn.write_paused:
            data = stream.read_ready()
            if data is None:
                break
            if not data:  # END_STREAM
                if self.chunked:
                    out.append(response_end_chunk(stream.trailers))
                if out:
                    conn.write(b"".join(out))
                self._finish()
                return
            out.append(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if out:
            conn.write(b"".join(out))
        self.deadline = (
            _FOREVER if conn.write_paused
            else conn.loop.time() + self.lane.lane.settings.read_timeout
        )

    def _finish(self) -> None:
        self._close_stream()
        self.lane.lane.finished(self.table, self.backend, self.status,
                                time.monotonic() - self.started)
        self.conn.exchange_done(self.keep)

    # -- the client's side -------------------------------------------------------------
    def pause_upstream(self) -> None:
        self.deadline = _FOREVER  # the client holds back, not the worker

    def resume_upstream(self) -> None:
        # The stream's window stays shut while DATA sits unread: reading on opens it.
        self.on_event()

    def stream_writable(self) -> None:
        pass  # the request went whole with its HEADERS

    # -- failures -----------------------------------------------------------------------
    def stream_failed(self) -> None:
        """The stream was reset or the backhaul connection went away."""
        if self.conn.exchange is not self:
            return
        if self.replied:
            log.debug("backhaul stream failed mid-response")
            self._give_up()
            return
        self._close_stream()
        self._failed("backhaul stream reset", False)

    def _failed(self, reason: str, connect: bool) -> None:
        """No answer: retried by the general path where it may be, else 502."""
        if connect or self.head.method in IDEMPOTENT:
            self._handover(PriorAttempt(self.backend.machine_id, None, self.request_id))
        else:  # the machine may have acted on it: never sent twice
            self._answer(502, f"machine failed after the request was sent: {reason}")

    def _handover(self, prior: PriorAttempt) -> None:
        conn = self.conn
        self.lane.lane.forwarder.drop_slot(self.table, self.backend, conn.leases)
        conn.exchange = None
        conn.general(self.head, prior)

    def _answer(self, status: int, detail: str) -> None:
        conn = self.conn
        lane = self.lane.lane
        lane.forwarder.drop_slot(self.table, self.backend, conn.leases)
        lane.counters.response(self.table.app, status, time.monotonic() - self.started)
        conn.write(error_bytes(status, self.request_id, detail, False))
        conn.exchange_done(self.head.keep_alive)

    def check_deadline(self, now: float) -> None:
        if now <= self.deadline or self.conn.exchange is not self:
            return
        if self.replied:
            self._give_up()  # the body stalled: the client learns by the close
            return
        self._close_stream()
        self._answer(504, "machine did not answer in time")

    def abort(self) -> None:
        """The client left: the stream is reset, nothing more is read."""
        self._close_stream()
        if self.replied:
            self._end_counted()
        else:
            self.lane.lane.forwarder.drop_slot(self.table, self.backend, self.conn.leases)

    def _give_up(self) -> None:
        """Part of the response is out: end here and close the client connection
        (counted once: the connection's loss finds no exchange)."""
        self._close_stream()
        self._end_counted()
        self.conn.exchange = None
        self.conn.close()

    def _end_counted(self) -> None:
        lane = self.lane.lane
        lane.forwarder.drop_slot(self.table, self.backend, self.conn.leases)
        lane.counters.response(self.table.app, self.status, time.monotonic() - self.started)

    def _close_stream(self) -> None:
        """Done with the stream: reset unless it ended both ways, place freed."""
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.on_event = None
            if stream.watcher is self:
                stream.watcher = None
            if not stream.remote_ended:
                stream.reset()
        self.release()


def _nothing() -> None:
    pass
