# cython: language_level=3
"""The fast lane's connections, compiled: the per-request mechanics of a plain
request, on protocol callbacks (``fastlane.py`` holds the policy and says what a
plain request is served with).

- ``ClientConnection``: one client TCP connection, requests served one at a time.
  A whole buffered head is parsed (``_http1.parse_head``); a *plain* one (origin
  form, no Expect/Upgrade, no body or a small Content-Length body here whole) asks
  the lane's policy for a machine in one call (``FastLane.route``) and is sent as
  one write; anything else, and anything the policy declines, goes to the general
  path (``FastLane.run_general``), which reads and writes through this connection.
- ``Exchange``: that request on a pooled machine connection, and its response on
  the way back (framed by ``_http1.ResponseParser``, head by ``_http1.client_head``).
  A machine behind the backhaul gets an ``edgelane.RemoteExchange`` instead.
- ``UpstreamConnection`` / ``UpstreamPool``: keep-alive connections to machines,
  serving the lane's exchanges and the worker's backhaul streams
  (``workerlane.StreamExchange``), anything with the ``PooledExchange`` interface.

The module holds no rule of its own beyond byte handling: framing, header rules,
the balancing rule, replay and retry decisions are the shared functions it calls,
so the lane and the general path answer alike.
"""

import asyncio
import contextlib
import logging
import socket
import time

from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.string cimport memcmp

from edgeproxy.proxy._http1 cimport ResponseParser

from edgeproxy.proxy import headers as h
from edgeproxy.proxy._http1 import MAX_HEAD, UnsendableRequest, client_head, forward_head, parse_head
from edgeproxy.proxy.bodies import read_ready
from edgeproxy.proxy.forward import IDEMPOTENT, ConnectionLeases, PriorAttempt, error_response
from edgeproxy.proxy.framing import check_incomplete_head
from edgeproxy.proxy.frontend_h1 import head_bytes, response_end_chunk
from edgeproxy.proxy.frontend_h2 import PREFACE
from edgeproxy.proxy.messages import END, NEED_DATA, Data, HttpError, ResponseError, ResponseHead
from edgeproxy.proxy.responses import forwarded_informational
from edgeproxy.proxy.targeting import parse_replay

log = logging.getLogger("edgeproxy.proxy.fastlane")

# Client bytes buffered before the socket stops being read (pipelined requests, or
# a body the general path has not consumed yet): the kernel's buffers hold the rest.
HIGH_WATER = 256 * 1024
# A Content-Length body up to this size that is buffered whole with its head rides
# the lane with it (one write to the machine); a larger one, a chunked one, or one
# still arriving is the general path's (it streams bodies, with its own timeouts).
LANE_BODY = 64 * 1024
# Fields that make a request the general path's: it answers Expect and tunnels Upgrade.
_GENERAL_FIELDS = frozenset({b"expect", b"upgrade", b"http2-settings"})

cdef Py_ssize_t _HIGH_WATER = HIGH_WATER
cdef Py_ssize_t _LANE_BODY = LANE_BODY
cdef Py_ssize_t _MAX_HEAD = MAX_HEAD
cdef bytes _PREFACE = PREFACE
cdef Py_ssize_t _PREFACE_LEN = len(PREFACE)
cdef object _perf_counter = time.perf_counter
cdef object _monotonic = time.monotonic

# Connection states (``state``); ``fastlane`` reads them by these names.
IDLE, EXCHANGE, GENERAL, CLOSED = range(4)
cdef enum:
    _IDLE, _EXCHANGE, _GENERAL, _CLOSED


cdef inline Py_ssize_t _head_end(bytearray buf) noexcept:
    """Index of the CRLFCRLF that ends a head in ``buf``, or -1."""
    cdef const unsigned char* b = <const unsigned char*>PyByteArray_AS_STRING(buf)
    cdef Py_ssize_t i, n = len(buf)
    for i in range(n - 3):
        if b[i] == 13 and b[i + 1] == 10 and b[i + 2] == 13 and b[i + 3] == 10:
            return i
    return -1


cdef bint _plain(head):
    """A request the lane may serve itself, if its body (if any) is small and here:
    origin form, nothing that asks for an answer of ours (Expect) or a tunnel."""
    cdef bytes target = head.target
    if not target or target[0] != 47:  # "/"
        return False
    for name, _ in head.headers:
        if name in _GENERAL_FIELDS:
            return False
    return True


def error_bytes(int status, bytes request_id, str detail, bint close=True):
    """A whole error response (the general path's ``error_response``) as bytes."""
    response = error_response(status, request_id, detail)
    fields = list(response.headers)
    if close:
        fields.append((b"connection", b"close"))
    return head_bytes(status, response.reason, fields) + (read_ready(response.body) or b"")


cdef class ClientConnection:
    """One client TCP connection; requests are served one at a time, in order."""

    cdef public object lane
    cdef public object loop
    cdef public object transport
    cdef public bytearray buffer
    cdef public int state
    cdef public bint eof
    cdef public bint first  # nothing served yet: an HTTP/2 preface may still come
    cdef public double since  # idle since / head started
    cdef bint head_started
    cdef public object exchange  # an Exchange, or an edgelane.RemoteExchange
    cdef public object leases
    cdef public object client
    cdef public str local_address
    # What forward_head adds for this connection, as bytes, made once:
    # (client ip, scheme, local port, protocol for Via, edge region).
    cdef bytes f_ip, f_scheme, f_port, f_protocol, f_region
    cdef bint read_paused
    cdef public bint write_paused
    cdef object reader_waiter
    cdef list drain_waiters
    cdef object settings

    def __init__(self, lane):
        self.lane = lane
        self.settings = lane.settings
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.buffer = bytearray()
        self.state = _IDLE
        self.eof = False
        self.first = True
        self.since = self.loop.time()
        self.head_started = False
        self.exchange = None
        self.leases = ConnectionLeases()
        self.client = h.ClientInfo(ip="", scheme="http", local_port=0, protocol=b"1.1")
        self.local_address = ""
        self.f_ip = self.f_scheme = self.f_port = self.f_protocol = self.f_region = b""
        self.read_paused = False
        self.write_paused = False
        self.reader_waiter = None
        self.drain_waiters = []

    # -- asyncio callbacks ----------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
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
        self.f_ip = c.ip.encode()
        self.f_scheme = c.scheme.encode()
        self.f_port = str(c.local_port).encode()
        self.f_protocol = c.protocol
        self.f_region = self.settings.region.encode()
        self.lane.connections.add(self)

    def connection_lost(self, exc):
        self.state = _CLOSED
        self.lane.connections.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.abort()
        self.lane.forwarder.release_connection(self.leases)
        self._wake_reader()
        for waiter in self.drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("client connection lost"))
        self.drain_waiters.clear()

    def data_received(self, bytes data):
        self.buffer += data
        if self.state == _IDLE:
            self.serve_next()
            return
        self._wake_reader()
        if len(self.buffer) > _HIGH_WATER and not self.read_paused and self.transport:
            self.read_paused = True
            self.transport.pause_reading()

    def eof_received(self):
        self.eof = True
        self._wake_reader()
        if self.state == _IDLE:
            self.serve_next()
            if self.state == _IDLE:
                self.close()
        return True  # half-closed: the answer to a request already sent still goes out

    def pause_writing(self):
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause_upstream()

    def resume_writing(self):
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume_upstream()
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the lane ---------------------------------------------------------------------
    cpdef serve_next(self):
        """Serve the buffered request, if its head is complete (state IDLE)."""
        cdef bytearray buf = self.buffer
        cdef Py_ssize_t n = len(buf), end, total, m
        if not n:
            return
        if not self.head_started:
            self.head_started = True
            self.since = self.loop.time()
        if self.first:
            m = min(n, _PREFACE_LEN)
            if memcmp(PyByteArray_AS_STRING(buf), <const char*>_PREFACE, m) == 0:
                if m == _PREFACE_LEN:
                    self.general(h2=True)
                return  # HTTP/2 prior knowledge, or a prefix of it so far
        end = _head_end(buf)
        if end < 0:
            # Incomplete. What the strict parser refuses before the head ends
            # (bare LF, too long) goes to it now, not after the header timeout.
            try:
                check_incomplete_head(buf)
            except HttpError:
                self.general()
            return
        if end + 4 > _MAX_HEAD or (n >= 2 and buf[0] == 13 and buf[1] == 10):
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
        raw = None
        if head.chunked or head.content_length:
            total = end + 4 + (head.content_length or 0)
            if head.chunked or total - end - 4 > _LANE_BODY or n < total:
                self.general()
                return
            raw = bytes(buf[:total])
            del buf[:total]
        else:
            del buf[: end + 4]
        self.first = False
        self.head_started = False
        self._start(head, raw, end + 4)

    cdef _handover(self, head, raw, prior):
        """The general path takes this request: a bodiless head as parsed, a request
        with a body as its bytes again (the general path reads and replays bodies)."""
        if raw is None:
            self.general(head, prior)
        else:
            self.buffer[:0] = raw
            self.general(None, prior)

    cdef _start(self, head, raw, Py_ssize_t body_at):
        """Route, admit and send one request; ``raw``: the whole request's bytes when
        it carries a body, which starts at ``body_at``."""
        lane = self.lane
        cpu = lane.cpu
        started = _monotonic()
        cdef bint timed = cpu.busy
        cdef double clock = _perf_counter() if timed else 0.0
        routed = lane.route(head, self.local_address, self.client.local_port, self.leases)
        if routed is None:
            self._handover(head, raw, None)  # the general path answers or waits
            return
        table, backend, target = routed
        request_id = h.new_request_id()
        if target is None:  # behind the backhaul
            exchange = None
            if raw is None:
                exchange = lane.remote.start(self, head, table, backend, request_id, started)
            if exchange is None:
                lane.forwarder.drop_slot(table, backend, self.leases)
                self._handover(head, raw, None)  # the general path connects or waits
                return
            lane.lane_requests += 1
            self.exchange = exchange
            self.state = _EXCHANGE
            if timed:
                cpu.charge(table.app, _perf_counter() - clock)
            return
        try:
            if raw is None:
                wire = forward_head(head, self.f_ip, self.f_scheme, self.f_port, self.f_protocol,
                                    self.f_region, request_id)
            else:
                wire = forward_head(head, self.f_ip, self.f_scheme, self.f_port, self.f_protocol,
                                    self.f_region, request_id, len(raw) - body_at)
                wire += raw[body_at:]
        except UnsendableRequest:
            lane.forwarder.drop_slot(table, backend, self.leases)
            self._handover(head, raw, None)
            return
        exchange = Exchange(self, head, raw, table, backend, target, request_id, wire, started)
        lane.lane_requests += 1
        self.exchange = exchange
        self.state = _EXCHANGE
        lane.pool.send(exchange, self.loop.time())
        if timed:
            cpu.charge(table.app, _perf_counter() - clock)

    cpdef exchange_done(self, bint keep):
        self.exchange = None
        if self.state == _CLOSED:
            return
        if not keep:
            self.close()
            return
        self.back_to_lane()

    cpdef back_to_lane(self):
        self.state = _IDLE
        self.since = self.loop.time()
        self.head_started = False
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        self.serve_next()
        if self.state == _IDLE and self.eof and not self.buffer:
            self.close()

    cpdef write(self, bytes data):
        if self.transport is not None and self.state != _CLOSED:
            self.transport.write(data)

    cpdef close(self):
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    cpdef abort(self):
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    def check_deadlines(self, double now):
        settings = self.settings
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
    cpdef general(self, head=None, prior=None, bint h2=False):
        """Serve the next request (or, for h2c, the rest of the connection) on the
        general path; ``head``: already taken from the buffer."""
        self.state = _GENERAL
        self.lane.general_requests += 1
        self.lane.spawn(self.lane.run_general(self, head, prior, h2))

    cdef _wake_reader(self):
        waiter = self.reader_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, Py_ssize_t n):
        """For the general path's streams: buffered bytes, b"" at the end."""
        while not self.buffer:
            if self.eof or self.state == _CLOSED:
                return b""
            waiter = self.loop.create_future()
            self.reader_waiter = waiter
            try:
                await waiter
            finally:
                self.reader_waiter = None
        buf = self.buffer
        if n < 0 or n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        if self.read_paused and len(buf) <= _HIGH_WATER // 2 and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    async def drain(self):
        if self.state == _CLOSED:
            raise ConnectionResetError("client connection lost")
        if not self.write_paused:
            return
        waiter = self.loop.create_future()
        self.drain_waiters.append(waiter)
        await waiter


cdef class Exchange:
    """One plain request on its way to a machine and its response on the way back."""

    cdef ClientConnection client
    cdef object head
    cdef public bytes method
    cdef public str app
    cdef object raw  # the whole request, when it has a body (for a handover)
    cdef object table
    cdef object backend
    cdef public tuple key  # the machine's (address, port)
    cdef bytes request_id
    cdef public bytes wire
    cdef double started
    cdef public UpstreamConnection upstream
    cdef public bint reused
    cdef public bint sent  # the request was written to a machine connection
    cdef bint replied  # the response head went to the client
    cdef int status
    cdef bint chunked
    cdef bint keep
    cdef double deadline

    def __init__(self, ClientConnection client, head, raw, table, backend, tuple key,
                 bytes request_id, bytes wire, double started):
        self.client = client
        self.head = head
        self.method = head.method
        self.app = table.app
        self.raw = raw
        self.table = table
        self.backend = backend
        self.key = key
        self.request_id = request_id
        self.wire = wire
        self.started = started
        self.upstream = None
        self.reused = False
        self.sent = False
        self.replied = False
        self.status = 0
        self.chunked = False
        self.keep = False
        self.deadline = client.loop.time() + client.settings.response_timeout

    # -- PooledExchange ------------------------------------------------------------------
    cpdef bint active(self):
        return self.client.exchange is self

    cpdef bint paused_out(self):
        return self.client.write_paused

    cpdef connect_failed(self, str reason):
        self.fail(reason)

    # -- from the machine -------------------------------------------------------------
    cpdef pump(self, ResponseParser parser):
        """Turn what the machine sent so far into bytes for the client."""
        client = self.client
        cdef list out = []
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is Data:
                    data = (<object>event).data
                    out.append(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
                elif type(event) is ResponseHead:
                    if event.status < 200:  # the only test a plain response pays
                        self._interim(event, out)
                        continue  # the final response follows
                    wire = self._response_head(event, True)
                    if wire is None:  # a replay directive: followed, or ignored
                        if self._replay(event, out):
                            return
                        wire = self._response_head(event, False)
                    out.append(wire)
                else:
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
        self.deadline = client.loop.time() + client.settings.read_timeout

    cdef _response_head(self, event, bint check_replay):
        """The client's head for the machine's final ``event``; None if it carries
        a replay directive (looked at by ``_replay``)."""
        made = client_head(event, self.head, self.request_id, False, check_replay)
        if made is None:
            return None
        wire, self.chunked, self.keep = made
        self.status = event.status
        self.replied = True
        return wire

    cdef _interim(self, event, list out):
        """A 1xx before the final head: passed on to an HTTP/1.1 client with the same
        header stripping as a final head (the parser bounds how many may come)."""
        if event.status == 101:
            raise ResponseError("101 to a request that asked for no upgrade")
        if forwarded_informational(event.status) and self.head.http_version == b"1.1":
            fields = h.client_response_headers(event.headers, self.request_id)
            out.append(head_bytes(event.status, event.reason, fields))

    cdef bint _replay(self, event, list out) except -1:
        """The machine asked for the request elsewhere: hand it to the general path
        (after the 1xx it sent, which the general path would have passed on too)."""
        value = h.header_value(event.headers, h.REPLAY)
        directive = parse_replay(value) if value is not None else None
        if directive is None:
            return False
        if out:
            self.client.write(b"".join(out))
        self._release_upstream(False)
        self._handover(PriorAttempt(self.backend.machine_id, directive, self.request_id))
        return True

    cdef _finish(self, ResponseParser parser):
        up = self.upstream
        self.upstream = None
        client = self.client
        client.lane.finished(self.table, self.backend, self.status, _monotonic() - self.started)
        if up is not None:
            up.exchange = None
            if parser.done and parser.keep_alive and not parser.buffer:
                client.lane.pool.put_idle(up, client.loop.time())
            else:
                up.close()
        client.exchange_done(self.keep)

    # -- failures -----------------------------------------------------------------------
    cpdef fail(self, str reason, bint stale=False):
        """The machine failed (connect, reset, close, garbage)."""
        if self.client.exchange is not self:
            return
        if stale and self.reused and not self.replied:
            # Keep-alive race: the machine closed the pooled connection as we reused
            # it, before a byte of the answer. Resend once on a fresh connection (as
            # the general path does; the lane holds the whole body).
            self._release_upstream(False)
            self.sent = False
            self.client.lane.pool.connect(self)
            return
        if not self.replied:
            self._release_upstream(False)
            if self.sent and self.head.method not in IDEMPOTENT:
                # The machine may have acted on it: never sent twice (duplicate writes).
                self._answer(502, f"machine failed after the request was sent: {reason}")
                return
            self._handover(PriorAttempt(self.backend.machine_id, None, self.request_id))
            return
        # Part of the response is out: the client learns of the failure by the close.
        # Ended here, counted once: the connection's loss then finds no exchange.
        log.debug("machine failed mid-response: %s", reason)
        self.abort()
        self.client.exchange = None
        self.client.close()

    cdef _handover(self, prior):
        client = self.client
        client.lane.forwarder.drop_slot(self.table, self.backend, client.leases)
        client.exchange = None
        client._handover(self.head, self.raw, prior)

    cdef _answer(self, int status, str detail):
        """Answer the client with an error of ours; the connection stays if it may."""
        client = self.client
        lane = client.lane
        lane.forwarder.drop_slot(self.table, self.backend, client.leases)
        lane.counters.response(self.table.app, status, _monotonic() - self.started)
        client.write(error_bytes(status, self.request_id, detail, False))
        client.exchange_done(self.head.keep_alive)

    cpdef check_deadline(self, double now):
        if now <= self.deadline:
            return
        if self.replied:
            self.fail("machine body read timed out")
            return
        # No response head in time: 504, as the general path answers it.
        self._release_upstream(False)
        self._answer(504, "machine did not answer in time")

    cpdef abort(self):
        """The client left, or the exchange is given up: nothing goes back to the pool."""
        self._release_upstream(False)
        lane = self.client.lane
        if self.replied:
            lane.counters.response(self.table.app, self.status, _monotonic() - self.started)
        lane.forwarder.drop_slot(self.table, self.backend, self.client.leases)

    cdef _release_upstream(self, bint reusable):
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.exchange = None
            if reusable:
                self.client.lane.pool.put_idle(up, self.client.loop.time())
            else:
                up.close()

    cpdef pause_upstream(self):
        if self.upstream is not None:
            self.upstream.pause()

    cpdef resume_upstream(self):
        if self.upstream is not None:
            self.upstream.resume()


cdef class UpstreamConnection:
    """A keep-alive HTTP/1.1 connection to one machine, serving one exchange at a time."""

    cdef public UpstreamPool pool
    cdef public tuple key
    cdef public object transport
    cdef public ResponseParser parser
    cdef public object exchange  # a PooledExchange
    cdef public double idle_since
    cdef public bint lost
    cdef public bint paused
    cdef bint received  # bytes arrived for the current exchange

    def __init__(self, UpstreamPool pool, tuple key):
        self.pool = pool
        self.key = key
        self.transport = None
        self.parser = ResponseParser()
        self.exchange = None
        self.idle_since = 0.0
        self.lost = False
        self.paused = False
        self.received = False

    def connection_made(self, transport):
        self.transport = transport

    cpdef start(self, exchange, bint reused):
        self.exchange = exchange
        exchange.upstream = self
        exchange.reused = reused
        exchange.sent = True
        self.received = False
        self.parser.start(exchange.method)
        if exchange.paused_out():
            self.pause()
        self.transport.write(exchange.wire)

    def data_received(self, bytes data):
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: the machine is confused
            return
        self.received = True
        self.parser.feed(data)
        cpu = self.pool.cpu
        cdef double clock
        if cpu.busy:
            clock = _perf_counter()
            exchange.pump(self.parser)
            cpu.charge(exchange.app, _perf_counter() - clock)
        else:
            exchange.pump(self.parser)

    def eof_received(self):
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

    def connection_lost(self, exc):
        self.lost = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None and exchange.upstream is self:
            exchange.upstream = None
            exchange.fail(f"connection lost: {exc!r}", stale=not self.received)

    def pause_writing(self):
        pass  # a request is one write; the kernel buffers it

    def resume_writing(self):
        pass

    cpdef bint usable(self, double now):
        return (
            not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
            and not self.parser.buffer
            and now - self.idle_since < self.pool.idle_timeout
        )

    cpdef pause(self):
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    cpdef resume(self):
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    cpdef close(self):
        self.lost = True
        if self.transport is not None:
            self.transport.close()


cdef class UpstreamPool:
    """Idle keep-alive connections per machine, for the lane's exchanges and the
    worker's backhaul streams (one pool per process, callback-driven)."""

    cdef public object lane
    cdef public object cpu
    cdef dict idle
    cdef Py_ssize_t most_idle
    cdef public double idle_timeout

    def __init__(self, lane):
        self.lane = lane
        self.cpu = lane.cpu
        self.idle = {}
        self.most_idle = lane.settings.pool_idle
        self.idle_timeout = lane.settings.pool_idle_timeout

    cpdef send(self, exchange, double now):
        cdef list conns = self.idle.get(exchange.key)
        cdef UpstreamConnection up
        if conns:
            while conns:
                up = conns.pop()
                if up.usable(now):
                    up.start(exchange, True)
                    return
                up.close()
        self.connect(exchange)

    cpdef connect(self, exchange):
        self.lane.spawn(self._connect(exchange))

    async def _connect(self, exchange):
        loop = asyncio.get_running_loop()
        key = exchange.key
        address, port = key
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
        up.start(exchange, False)

    cpdef put_idle(self, UpstreamConnection up, double now):
        # `now` from the caller's loop: asyncio.get_running_loop() costs a getpid()
        # system call on Python 3.11, and this runs once a request.
        if up.lost:
            return
        up.resume()
        cdef list conns = self.idle.get(up.key)
        if conns is None:
            conns = self.idle[up.key] = []
        if len(conns) >= self.most_idle:
            up.close()
            return
        up.idle_since = now
        conns.append(up)

    cpdef forget(self, UpstreamConnection up):
        cdef list conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def prune(self, double now):
        for key, conns in list(self.idle.items()):
            keep = []
            for up in list(conns):
                if up.usable(now):
                    keep.append(up)
                else:
                    up.close()
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]

    def close(self):
        for conns in self.idle.values():
            for up in conns:
                up.close()
        self.idle.clear()
