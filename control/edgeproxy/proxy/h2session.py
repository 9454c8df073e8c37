"""An asyncio shell around one h2 connection, shared by the backhaul (both ends)
and HTTP/2 clients at the edge.

Flow control is honoured both ways. Outbound: a stream writes only as much as its
window and the connection window allow, and waits for WINDOW_UPDATE. Inbound: the
connection window is credited as soon as data arrives, a stream's window only as
its consumer reads — so a slow stream stalls itself, never its neighbours, and
each stream buffers at most its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from edgeproxy.proxy.hpackfast import FastDecoder, StatelessEncoder
from edgeproxy.proxy.streams import ByteReader, ByteWriter

Headers = list[tuple[bytes, bytes]]
READ_SIZE = 64 * 1024
_NO_TRAILERS: Headers = []  # never mutated: a stream without trailers shares it

log = logging.getLogger(__name__)


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


class H2Stream:
    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.headers: asyncio.Future[Headers] = session._loop.create_future()
        self._chunks: deque[tuple[bytes, int]] = deque()
        # One waiter each for the consumer and the writer (cheaper than asyncio.Event,
        # whose every wait looks the running loop up again).
        self._readable = _Signal(session._loop)
        self._writable = _Signal(session._loop)
        self._remote_ended = False
        self._local_ended = False
        self._error: StreamReset | None = None
        self._unacked = 0
        self.ended_with_headers = False  # a request/response without a body
        # Client side: called with each interim (1xx) header block as it arrives.
        self.on_informational: Callable[[Headers], None] | None = None
        self.trailers = _NO_TRAILERS  # the peer's trailing HEADERS, once received

    # -- reading -------------------------------------------------------------
    async def read(self) -> bytes:
        """Next DATA payload, b"" at END_STREAM; raises StreamReset."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                return b""
            await self._readable.wait()
        data, flow = self._chunks.popleft()
        self._credit(flow)
        return data

    def read_ready(self) -> bytes | None:
        """The next DATA payload if already here (b"" at END_STREAM), else None."""
        if self._chunks:
            data, flow = self._chunks.popleft()
            self._credit(flow)
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

    def _credit(self, flow: int) -> None:
        # Batch WINDOW_UPDATEs: a frame per DATA frame would double the frame count.
        self._unacked += flow
        if self._remote_ended or self._error is not None:
            return
        if self._unacked >= self.session.stream_window // 4:
            amount, self._unacked = self._unacked, 0
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.session.conn.increment_flow_control_window(amount, stream_id=self.stream_id)
                self.session.flush()

    # -- writing -------------------------------------------------------------
    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        self._check()
        try:
            self.session.conn.send_headers(self.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(str(exc)) from exc
        self._local_ended = self._local_ended or end_stream
        self.session.flush()
        self._maybe_forget()

    async def write(self, data: bytes, end: bool = False) -> None:
        """Send ``data`` within the flow-control windows; ``end`` closes our side with
        the last DATA frame (no separate empty frame)."""
        view = memoryview(data)
        conn = self.session.conn
        if end and len(view) <= min(conn.max_outbound_frame_size, self._window_or_zero(conn)):
            self._check()
            if self._local_ended:
                return
            try:
                conn.send_data(self.stream_id, data, end_stream=True)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamReset(str(exc)) from exc
            self._local_ended = True
            self.session.flush()
            self._maybe_forget()
            return
        while view:
            self._check()
            try:
                window = conn.local_flow_control_window(self.stream_id)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamReset(str(exc)) from exc
            size = min(window, conn.max_outbound_frame_size, len(view))
            if size <= 0:
                await self._writable.wait()
                continue
            conn.send_data(self.stream_id, view[:size].tobytes())
            self.session.flush()
            view = view[size:]
        await self.session.drain()
        if end:
            self.end()

    def _window_or_zero(self, conn: h2.connection.H2Connection) -> int:
        try:
            return int(conn.local_flow_control_window(self.stream_id))
        except h2.exceptions.StreamClosedError:
            return 0

    def end(self) -> None:
        if self._local_ended or self._error is not None:
            return
        try:
            self.session.conn.end_stream(self.stream_id)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(str(exc)) from exc
        self._local_ended = True
        self.session.flush()
        self._maybe_forget()

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        if self._error is not None or (self._local_ended and self._remote_ended):
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.session.conn.reset_stream(self.stream_id, error_code=code)
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
        validate_inbound: bool = True,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.stream_window = stream_window
        self._connection_window = connection_window
        self._on_stream = on_stream
        # Outbound headers are ours (lower-case names, values already checked by our
        # parsers), so h2's per-header validation/normalisation is pure cost. h2's
        # inbound checks turn a malformed request into a *connection* error; callers
        # that check each request themselves (per stream) turn them off.
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=validate_inbound,
            normalize_inbound_headers=validate_inbound,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.encoder = StatelessEncoder()  # type: ignore[assignment]  # see hpackfast
        decoder = FastDecoder()
        decoder.max_header_list_size = self.conn.decoder.max_header_list_size
        self.conn.decoder = decoder
        # Sent with update_settings() after the preface, so h2 applies them (frame
        # size, windows) when the peer acknowledges, as RFC 9113 requires.
        self._settings: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: 64 * 1024,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: int(enable_connect_protocol),
        }
        self._streams: dict[int, H2Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._conn_unacked = 0
        self._stream_slot = asyncio.Event()
        self.closed = asyncio.Event()
        self.draining = False  # GOAWAY seen or sent: no new streams
        self._preface = preface_already_read
        self._loop = asyncio.get_running_loop()
        self._flush_pending = False

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings(self._settings)
        extra = self._connection_window - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
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
        except (ConnectionError, h2.exceptions.ProtocolError, OSError):
            pass
        finally:
            self._shutdown()

    def _receive(self, data: bytes) -> None:
        events = self.conn.receive_data(data)
        for event in events:
            self._dispatch(event)
        self.flush()

    def close(self, error_code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        if self.closed.is_set():
            return
        with contextlib.suppress(Exception):
            self.conn.close_connection(error_code=error_code)
            self._flush_now()
        self._shutdown()

    def _shutdown(self) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):
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
        """Send what h2 has queued — once per loop iteration, so the frames every
        stream produced in one batch of events leave in one write."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

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
            if self.draining:
                raise StreamReset("connection draining")
            limit = self.conn.remote_settings.max_concurrent_streams
            # Our own map first (h2's count walks every stream); it holds every
            # stream we opened that is not yet closed both ways, so it is never low.
            if len(self._streams) < limit or self.conn.open_outbound_streams < limit:
                break
            self._stream_slot.clear()
            await self._stream_slot.wait()
        stream_id = self.conn.get_next_available_stream_id()
        stream = H2Stream(self, stream_id)
        stream.on_informational = informational
        self._streams[stream_id] = stream
        try:
            stream.send_headers(headers, end_stream=end_stream)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamIDTooLowError) as exc:
            stream._fail(StreamReset(str(exc)))
            raise StreamReset(str(exc)) from exc
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
        self.conn.ping(opaque)
        self.flush()
        await future
        return time.monotonic() - started

    # -- events --------------------------------------------------------------
    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None and not stream.headers.done():
                stream.headers.set_result(list(event.headers or []))
            if event.stream_ended is not None and stream is not None:
                stream._on_remote_end()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream._on_remote_end()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = list(event.headers or [])
                if event.stream_ended is not None:
                    stream._on_remote_end()
        elif isinstance(event, h2.events.InformationalResponseReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None and stream.on_informational is not None:
                try:
                    stream.on_informational(list(event.headers or []))
                except Exception:  # a consumer's bug must not end the shared connection
                    log.exception("interim response handler failed")
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream._fail(StreamReset(f"reset by peer: {event.error_code!r}"))
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_writers(getattr(event, "stream_id", 0) or 0)
        elif isinstance(event, h2.events.PingAckReceived):
            future = self._pings.pop(event.ping_data or b"", None)
            if future is not None and not future.done():
                future.set_result(0.0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.draining = True
            last = event.last_stream_id or 0
            for stream_id, stream in list(self._streams.items()):
                if stream_id > last:
                    stream._fail(StreamReset("refused by GOAWAY"))
            if not self._streams:
                self.closed.set()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        flow = event.flow_controlled_length or 0
        self._conn_unacked += flow
        if self._conn_unacked >= self._connection_window // 4:
            self.conn.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        stream = self._streams.get(event.stream_id or 0)
        if stream is None:
            return
        stream._chunks.append((event.data or b"", flow))
        stream._readable.set()
        if event.stream_ended is not None:
            stream._on_remote_end()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id or 0
        stream = H2Stream(self, stream_id)
        self._streams[stream_id] = stream
        stream.headers.set_result(list(event.headers or []))
        if event.stream_ended is not None:
            stream.ended_with_headers = True
            stream._on_remote_end()
        if self._on_stream is None or self.draining:
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        task = self._loop.create_task(self._on_stream(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake_writers(self, stream_id: int) -> None:
        if stream_id:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._writable.set()
            return
        for stream in self._streams.values():
            stream._writable.set()
