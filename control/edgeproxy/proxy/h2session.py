"""An asyncio shell around one HTTP/2 connection (libnghttp2, through the sans-IO
``_nghttp2.Session``), shared by the backhaul (both ends) and HTTP/2 clients at
the edge.

Flow control is honoured both ways. Outbound: a stream's bytes go to its own
buffer in the session, and nghttp2 frames only as much as its window and the
connection window allow; a writer with more than ``SEND_BUFFER`` buffered waits
until the peer opens a window (for clients, at most ``H2Limits.send_stall`` seconds
without progress: a zero-window stall is abuse). Inbound: the connection window is
credited as soon as data arrives, a stream's window only as its consumer reads —
so a slow stream stalls itself, never its neighbours, and each stream buffers at
most its window.

The peer's abuse (rapid reset, CONTINUATION floods, SETTINGS and PING floods,
zero-window stalls) ends the connection with GOAWAY ENHANCE_YOUR_CALM and is
reported through ``on_abuse(kind)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from edgeproxy.proxy import _nghttp2 as ng
from edgeproxy.proxy.streams import ByteReader, ByteWriter

Headers = list[tuple[bytes, bytes]]
READ_SIZE = 64 * 1024
SEND_BUFFER = 64 * 1024  # bytes a stream may have buffered beyond its window
_NO_TRAILERS: Headers = []  # never mutated: a stream without trailers shares it

log = logging.getLogger(__name__)


class ErrorCodes(IntEnum):
    """RFC 9113 section 7 error codes."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Bounds on what the peer may do (0 or None: unbounded). Each broken bound
    ends the connection with GOAWAY ENHANCE_YOUR_CALM, counted by its kind."""

    max_header_list: int = 64 * 1024  # decoded fields (+32 each); beyond: that stream reset
    max_header_block: int = 64 * 1024  # "continuation_flood": HEADERS+CONTINUATION bytes
    max_header_frames: int = 16  # "continuation_flood": frames in one header block
    reset_burst: float = 0  # "rapid_reset": the peer's RST_STREAMs, token bucket
    reset_rate: float = 0  # tokens per second
    ping_burst: float = 0  # "ping_flood"
    ping_rate: float = 0
    settings_burst: float = 0  # "settings_flood"
    settings_rate: float = 0
    max_outbound_ack: int = 1000  # nghttp2's own flood bound ("flood")
    send_stall: float | None = None  # "zero_window": seconds a writer waits for a window


# Clients at the edge: anyone on the internet.
CLIENT_LIMITS = H2Limits(
    reset_burst=200,
    reset_rate=50,
    ping_burst=30,
    ping_rate=5,
    settings_burst=30,
    settings_rate=5,
    send_stall=30.0,
)
# The backhaul: peers we allowed by address. Its resets are many clients' resets and
# its stalls are slow clients behind the edge, so neither is bounded there.
BACKHAUL_LIMITS = H2Limits(
    max_header_list=1024 * 1024,
    max_header_block=1024 * 1024,
    max_header_frames=128,
    ping_burst=1000,
    ping_rate=100,
    settings_burst=1000,
    settings_rate=100,
)


class StreamReset(Exception):
    """The stream was reset, or its connection went away."""


class _Signal:
    """Wake the one task waiting on it; a set() with no waiter is not remembered
    (callers re-check their condition before waiting)."""

    __slots__ = ("_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None


class StreamWatcher(Protocol):
    """A callback-driven consumer of a stream (no task): told when the stream can take
    more after ``write_nowait`` said it was full, and when the stream fails."""

    def stream_writable(self) -> None: ...

    def stream_failed(self) -> None: ...


class H2Stream:
    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.headers: asyncio.Future[Headers] = session._loop.create_future()
        self._chunks: deque[bytes] = deque()
        # One waiter each for the consumer and the writer (cheaper than asyncio.Event,
        # whose every wait looks the running loop up again).
        self._readable = _Signal(session._loop)
        self._writable = _Signal(session._loop)
        self._remote_ended = False
        self._local_ended = False
        self._final_sent = False  # server: the final response head went out
        self._error: StreamReset | None = None
        self.ended_with_headers = False  # a request/response without a body
        # Client side: called with each interim (1xx) header block as it arrives.
        self.on_informational: Callable[[Headers], None] | None = None
        self.trailers = _NO_TRAILERS  # the peer's trailing HEADERS, once received
        self.watcher: StreamWatcher | None = None  # a callback consumer, if any
        # Client side, a callback reader: called after the response head, each DATA
        # and the end arrive (``headers``, ``read_ready`` and ``trailers`` hold them).
        self.on_event: Callable[[], None] | None = None

    # -- reading -------------------------------------------------------------
    async def read(self) -> bytes:
        """Next DATA payload, b"" at END_STREAM; raises StreamReset."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                return b""
            await self._readable.wait()
        data = self._chunks.popleft()
        self._credit(len(data))
        return data

    def read_ready(self) -> bytes | None:
        """The next DATA payload if already here (b"" at END_STREAM), else None."""
        if self._chunks:
            data = self._chunks.popleft()
            self._credit(len(data))
            return data
        if self._error is not None:
            raise self._error
        return b"" if self._remote_ended else None

    async def read_within(self, timeout: float) -> bytes:
        """``read()`` bounded by ``timeout`` (TimeoutError), with no timer at all
        when the next payload is already here (the common case under load)."""
        ready = self.read_ready()
        if ready is not None:
            return ready
        async with asyncio.timeout(timeout):
            return await self.read()

    def _credit(self, size: int) -> None:
        # nghttp2 batches the WINDOW_UPDATE (at half a window consumed).
        if (
            size
            and self._error is None
            and not self._remote_ended
            and self.session.engine.consume(self.stream_id, size)
        ):
            self.session.flush()

    # -- writing -------------------------------------------------------------
    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        """Server: an interim (1xx) head, the final head, or trailers (with
        ``end_stream``); client: trailers (the request head is ``open_stream``'s)."""
        self._check()
        engine = self.session.engine
        try:
            if self.session.client_side or self._final_sent:
                if self._local_ended:
                    raise StreamReset("stream already ended")
                engine.submit_trailers(self.stream_id, headers)
                end_stream = True
            elif headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
                engine.submit_headers(self.stream_id, headers, False)  # interim
                end_stream = False
            else:
                engine.submit_response(self.stream_id, headers, end_stream)
                self._final_sent = True
        except ng.Error as exc:
            raise StreamReset(str(exc)) from exc
        self._local_ended = self._local_ended or end_stream
        self.session.flush()
        self._maybe_forget()

    async def write(self, data: bytes, end: bool = False) -> None:
        """Send ``data`` within the flow-control windows; ``end`` closes our side with
        the last DATA frame (no separate empty frame)."""
        self._check()
        if self._local_ended:
            return
        session = self.session
        engine = session.engine
        try:
            engine.send_data(self.stream_id, data if type(data) is bytes else bytes(data), end)
        except ng.Error as exc:
            raise StreamReset(str(exc)) from exc
        if end:
            self._local_ended = True
            self._maybe_forget()
        session.flush()
        if not engine.over(self.stream_id, SEND_BUFFER):
            if end:
                return
        else:
            await self._wait_window()
        await session.drain()

    def write_nowait(self, data: bytes, end: bool = False) -> bool:
        """``write`` for callback writers: queue ``data`` (nghttp2 frames it within the
        windows) and return at once; True when the stream has more than ``SEND_BUFFER``
        queued: produce no more until ``watcher.stream_writable()``."""
        self._check()
        if self._local_ended:
            return False
        engine = self.session.engine
        try:
            engine.send_data(self.stream_id, data, end)
        except ng.Error as exc:
            raise StreamReset(str(exc)) from exc
        if end:
            self._local_ended = True
            self._maybe_forget()
        self.session.flush()
        return not end and engine.over(self.stream_id, SEND_BUFFER)

    def window_open(self) -> bool:
        """After ``stream_writable()``: at or below ``SEND_BUFFER`` queued again."""
        return not self.session.engine.over(self.stream_id, SEND_BUFFER)

    async def _wait_window(self) -> None:
        engine = self.session.engine
        stall = self.session.limits.send_stall
        while engine.over(self.stream_id, SEND_BUFFER):
            self._check()
            if stall is None:
                await self._writable.wait()
                continue
            try:
                async with asyncio.timeout(stall):
                    await self._writable.wait()
            except TimeoutError:
                # The peer kept its window shut for a whole stall timeout.
                self.session.abused("zero_window")
                raise StreamReset("peer never opened its window") from None
        self._check()

    def end(self) -> None:
        if self._local_ended or self._error is not None:
            return
        try:
            self.session.engine.send_data(self.stream_id, b"", True)
        except ng.Error as exc:
            raise StreamReset(str(exc)) from exc
        self._local_ended = True
        self.session.flush()
        self._maybe_forget()

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        if self._error is not None or (self._local_ended and self._remote_ended):
            return
        with contextlib.suppress(ng.Error):
            self.session.engine.reset(self.stream_id, int(code))
        self.session.flush()
        self._fail(StreamReset("reset locally"))

    @property
    def remote_ended(self) -> bool:
        return self._remote_ended

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    # -- events from the session ---------------------------------------------
    def _fail(self, error: StreamReset) -> None:
        if self._error is None:
            self._error = error
        if not self.headers.done():
            self.headers.set_exception(error)
            self.headers.exception()  # mark retrieved: a reset before headers is normal
        self._readable.set()
        self._writable.set()
        self.session._forget(self)
        watcher = self.watcher
        if watcher is not None:
            self.watcher = None
            watcher.stream_failed()

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        self._readable.set()
        self._maybe_forget()

    def _maybe_forget(self) -> None:
        if self._remote_ended and self._local_ended:
            self.session._forget(self)


class H2Session:
    """One HTTP/2 connection over an asyncio stream pair."""

    def __init__(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        *,
        client_side: bool,
        on_stream: Callable[[H2Stream], Coroutine[Any, Any, None]] | None = None,
        stream_window: int = 1024 * 1024,
        connection_window: int = 16 * 1024 * 1024,
        max_concurrent_streams: int = 1000,
        enable_connect_protocol: bool = False,
        preface_already_read: bytes = b"",
        limits: H2Limits = BACKHAUL_LIMITS,
        on_abuse: Callable[[str], None] | None = None,
        on_request: Callable[[H2Stream], bool] | None = None,
    ) -> None:
        # nghttp2's HTTP messaging checks are always off (they reset the stream;
        # RFC 9113 8.1.1 wants a 400 there): requests are checked per stream above
        # (frontend_h2.malformed_request, serve_backhaul_stream).
        self.reader = reader
        self.writer = writer
        self.client_side = client_side
        self.stream_window = stream_window
        self.limits = limits
        self._on_stream = on_stream
        self._on_abuse = on_abuse
        # Server side: offered each new stream first; True: served on callbacks, no task.
        self._serve_stream = on_request
        # SETTINGS (applied by nghttp2 when acknowledged) and the connection window
        # are queued now and leave with the first flush.
        self.engine = ng.Session(
            client_side,
            stream_window=stream_window,
            connection_window=connection_window,
            max_concurrent_streams=max_concurrent_streams,
            max_frame_size=64 * 1024,
            enable_connect_protocol=enable_connect_protocol,
            max_header_list=limits.max_header_list,
            max_header_block=limits.max_header_block,
            max_header_frames=limits.max_header_frames,
            reset_burst=limits.reset_burst,
            reset_rate=limits.reset_rate,
            ping_burst=limits.ping_burst,
            ping_rate=limits.ping_rate,
            settings_burst=limits.settings_burst,
            settings_rate=limits.settings_rate,
            max_outbound_ack=limits.max_outbound_ack,
        )
        self._streams: dict[int, H2Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._stream_slot = asyncio.Event()
        self.closed = asyncio.Event()
        self.draining = False  # GOAWAY seen or sent: no new streams
        self.abuse: str | None = None  # the bound the peer broke, if it did
        self._preface = preface_already_read
        self._loop = asyncio.get_running_loop()
        self._flush_pending = False
        self._down = False

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self.flush()

    async def run(self) -> None:
        """Read frames until the connection ends; then fail every open stream."""
        try:
            if self._preface:
                self._receive(self._preface)
            while not self.closed.is_set():
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                self._receive(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self._shutdown()

    def _receive(self, data: bytes) -> None:
        streams = self._streams
        for kind, stream_id, value, flag in self.engine.receive(data):
            if kind == ng.EV_DATA:
                stream = streams.get(stream_id)
                if stream is not None:
                    if value:
                        stream._chunks.append(value)
                        stream._readable.set()
                    if flag:
                        stream._on_remote_end()
                    if stream.on_event is not None:
                        _notify(stream.on_event)
            elif kind == ng.EV_REQUEST:
                self._on_request(stream_id, value, flag)
            elif kind == ng.EV_HEADERS:
                self._on_headers(stream_id, value, flag)
            elif kind == ng.EV_CLOSED:
                stream = streams.get(stream_id)
                if stream is not None:
                    if value:
                        stream._fail(StreamReset(f"stream closed: {_code(value)!r}"))
                    else:
                        self._forget(stream)
            elif kind == ng.EV_RESET:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream._fail(StreamReset(f"reset by peer: {_code(value)!r}"))
            elif kind == ng.EV_SETTINGS:
                if not value:  # the peer's limits may have grown
                    self._stream_slot.set()
            elif kind == ng.EV_PING_ACK:
                future = self._pings.pop(value, None)
                if future is not None and not future.done():
                    future.set_result(0.0)
            elif kind == ng.EV_GOAWAY:
                self.draining = True
                for other_id, stream in list(streams.items()):
                    if other_id > stream_id and other_id % 2 == int(self.client_side):
                        stream._fail(StreamReset("refused by GOAWAY"))
                if not streams:
                    self.closed.set()
            elif kind == ng.EV_FATAL:
                if value is not None:
                    self.abused(value)
                    return
                self.draining = True
        self.flush()

    def abused(self, kind: str) -> None:
        """The peer broke a bound: count it, GOAWAY ENHANCE_YOUR_CALM, close."""
        if self.abuse is None:
            self.abuse = kind
            log.warning("HTTP/2 peer closed for abuse: %s", kind)
            if self._on_abuse is not None:
                try:
                    self._on_abuse(kind)
                except Exception:  # counting must not keep the connection up
                    log.exception("abuse counter failed")
        self.engine.terminate(int(ErrorCodes.ENHANCE_YOUR_CALM))
        self._shutdown()

    def close(self, error_code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        if self.closed.is_set() or self._down:
            return
        with contextlib.suppress(ng.Error):
            self.engine.goaway(int(error_code))
        self._shutdown()

    def _shutdown(self) -> None:
        if self._down:
            return
        self._down = True
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):  # the transport is going away anyway
                self._flush_now()
        self.closed.set()
        self.draining = True
        for stream in list(self._streams.values()):
            stream._fail(StreamReset("connection closed"))
        for future in self._pings.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))
        self._pings.clear()
        for task in list(self._tasks):
            task.cancel()
        self._stream_slot.set()
        self.writer.close()

    def flush(self) -> None:
        """Send what nghttp2 has queued — once per loop iteration, so the frames every
        stream produced in one batch of events leave in one write."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        engine = self.engine
        data = engine.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
        for stream_id in engine.drained():
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._writable.set()
                if stream.watcher is not None:
                    stream.watcher.stream_writable()
        if not self._down and engine.finished():
            # GOAWAY both ways with no stream left, or a connection error sent.
            self._shutdown()

    async def drain(self) -> None:
        self._flush_now()
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self._shutdown()
            raise StreamReset("connection lost") from exc

    # -- streams -------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def open_stream(
        self,
        headers: Headers,
        end_stream: bool,
        informational: Callable[[Headers], None] | None = None,
    ) -> H2Stream:
        """Client side: start a request; waits while the peer's stream limit is reached.
        ``informational`` gets the response's interim (1xx) header blocks."""
        while True:
            stream = self.open_stream_now(headers, end_stream, informational)
            if stream is not None:
                return stream
            self._stream_slot.clear()
            await self._stream_slot.wait()

    def open_stream_now(
        self,
        headers: Headers,
        end_stream: bool,
        informational: Callable[[Headers], None] | None = None,
    ) -> H2Stream | None:
        """``open_stream`` for callback callers: None while the peer's stream limit is
        reached (they take the path that waits)."""
        if self.draining:
            raise StreamReset("connection draining")
        # Our own map holds every stream we opened that is not yet closed both ways.
        if len(self._streams) >= self.engine.remote_max_streams():
            return None
        try:
            stream_id = self.engine.submit_request(headers, end_stream)
        except ng.Error as exc:
            raise StreamReset(str(exc)) from exc
        stream = H2Stream(self, stream_id)
        stream.on_informational = informational
        stream._local_ended = end_stream
        self._streams[stream_id] = stream
        self.flush()
        return stream

    def _forget(self, stream: H2Stream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            self._stream_slot.set()

    async def ping(self) -> float:
        """Round-trip time of one PING, in seconds."""
        opaque = os.urandom(8)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[opaque] = future
        started = time.monotonic()
        try:
            self.engine.ping(opaque)
        except ng.Error as exc:
            self._pings.pop(opaque, None)
            raise ConnectionError(str(exc)) from exc
        self.flush()
        await future
        return time.monotonic() - started

    # -- events --------------------------------------------------------------
    def _on_headers(self, stream_id: int, headers: Headers, end: bool) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not self.client_side or stream.headers.done():
            stream.trailers = headers  # trailing HEADERS
        elif headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
            if stream.on_informational is not None:
                try:
                    stream.on_informational(headers)
                except Exception:  # a consumer's bug must not end the shared connection
                    log.exception("interim response handler failed")
        else:
            stream.headers.set_result(headers)
        if end:
            stream._on_remote_end()
        if stream.on_event is not None:
            _notify(stream.on_event)

    def _on_request(self, stream_id: int, headers: Headers, end: bool) -> None:
        stream = H2Stream(self, stream_id)
        self._streams[stream_id] = stream
        stream.headers.set_result(headers)
        if end:
            stream.ended_with_headers = True
            stream._on_remote_end()
        if self._on_stream is None or self.draining:
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        if self._serve_stream is not None:
            try:
                if self._serve_stream(stream):
                    return
            except Exception:  # a consumer's bug must not end the shared connection
                log.exception("stream callback failed")
                stream.reset(ErrorCodes.INTERNAL_ERROR)
                return
        task = self._loop.create_task(self._on_stream(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _notify(on_event: Callable[[], None]) -> None:
    try:
        on_event()
    except Exception:  # a consumer's bug must not end the shared connection
        log.exception("stream event handler failed")


def _code(value: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(value)
    except ValueError:
        return value
