"""HTTP/1.1 from clients: one request at a time per connection, responses in order,
keep-alive, chunked both ways, 100-continue, WebSocket upgrades, and timeouts for
slow clients (idle between requests, the whole head, each body read)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

from edgeproxy.proxy import headers as h
from edgeproxy.proxy.bodies import read_ready, trailers_of
from edgeproxy.proxy.forward import (
    ConnectionLeases,
    Forwarder,
    PriorAttempt,
    ProxyRequest,
    ProxyResponse,
    error_response,
)
from edgeproxy.proxy.framing import RequestParser
from edgeproxy.proxy.messages import Data, EndOfMessage, HttpError, RequestHead
from edgeproxy.proxy.streams import ByteReader, ByteWriter
from edgeproxy.proxy.upstream import ClientBodyError, SocketTunnel, UpstreamError, splice

READ_SIZE = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    header: float  # first byte of a request → end of its head
    idle: float  # keep-alive wait for the next request
    body: float  # each read of a request body
    tunnel_idle: float  # a WebSocket with no bytes either way


class _ClientBody:
    """The request body as the parser frames it, read from the socket on demand."""

    def __init__(self, parser: RequestParser, reader: ByteReader, timeout: float) -> None:
        self._parser = parser
        self._reader = reader
        self._timeout = timeout
        self.ended = False
        self.error: HttpError | None = None

    async def read(self) -> bytes:
        while not self.ended:
            try:
                event = self._parser.next_event()
            except HttpError as exc:
                self.error = exc
                raise ClientBodyError(exc.status, exc.reason) from exc
            if isinstance(event, Data):
                return event.data
            if isinstance(event, EndOfMessage):
                self.ended = True
                break
            try:
                async with asyncio.timeout(self._timeout):
                    data = await self._reader.read(READ_SIZE)
            except (TimeoutError, ConnectionError, OSError) as exc:
                self.error = ClientBodyError(408, "request body timed out")
                raise self.error from exc
            if not data:
                self.error = ClientBodyError(400, "client closed during the body")
                raise self.error
            self._parser.feed(data)
        return b""

    def trailers(self) -> Sequence[tuple[bytes, bytes]]:
        """The client's trailer fields, once the body was read to its end."""
        return self._parser.trailers if self.ended else ()


def is_websocket_upgrade(head: RequestHead) -> bool:
    upgrade = head.header(b"upgrade")
    connection = [
        t.strip().lower() for k, v in head.headers if k == b"connection" for t in v.split(b",")
    ]
    return (
        head.method == b"GET"
        and upgrade is not None
        and upgrade.lower() == b"websocket"
        and b"upgrade" in connection
        and not head.has_body
    )


class H1Connection:
    """The general HTTP/1.1 path: any request, on coroutines. Serves a whole
    connection (``serve``), or single requests of a connection the fast lane owns
    (``serve_one``)."""

    def __init__(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        forwarder: Forwarder,
        client: h.ClientInfo,
        local_address: str,
        timeouts: ClientTimeouts,
        first_bytes: bytes = b"",
        leases: ConnectionLeases | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.forwarder = forwarder
        self.client = client
        self.local_address = local_address
        self.timeouts = timeouts
        self.parser = RequestParser()
        self.parser.feed(first_bytes)
        self._owns_leases = leases is None
        self.leases = ConnectionLeases() if leases is None else leases

    async def serve(self) -> None:
        try:
            while await self._serve_one():
                self.parser.next_request()
        except (ConnectionError, OSError, UpstreamError, TimeoutError):
            pass  # the client or the machine went away mid-response: just close
        finally:
            if self._owns_leases:
                self.forwarder.release_connection(self.leases)
            self.writer.close()

    async def serve_one(
        self, head: RequestHead | None = None, prior: PriorAttempt | None = None
    ) -> bool:
        """One request of a connection owned by the caller, read from ``reader``
        unless its bodiless ``head`` was parsed already. True when the connection may
        carry the next request (then ``parser.buffer`` holds bytes read beyond this
        one). Never closes the writer."""
        try:
            if head is not None:
                return await self._serve_parsed(head, None, prior)
            keep = await self._serve_one(prior)
            if keep:
                self.parser.next_request()
            return keep
        except (ConnectionError, OSError, UpstreamError, TimeoutError):
            return False

    async def _read_head(self) -> RequestHead | None:
        """The next request head; None when the client is gone or idle too long."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            event = self.parser.next_event()  # HttpError propagates
            if isinstance(event, RequestHead):
                return event
            if self.parser.between_requests:
                timeout = self.timeouts.idle
            else:
                # Slowloris: the whole head must arrive within the header timeout.
                deadline = deadline or loop.time() + self.timeouts.header
                timeout = deadline - loop.time()
            try:
                # One timer per read (asyncio.timeout), not a task per read (wait_for).
                async with asyncio.timeout(max(timeout, 0)):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                if not self.parser.between_requests:
                    await self._write_error(
                        error_response(408, h.new_request_id(), "request head timed out")
                    )
                return None
            if not data:
                return None
            self.parser.feed(data)

    async def _serve_one(self, prior: PriorAttempt | None = None) -> bool:
        """Serve one request; True to keep the connection for the next one.
        ``prior``: the fast lane's attempt at this request (it hands a request with a
        body back as bytes, to be read again here)."""
        try:
            head = await self._read_head()
        except HttpError as exc:
            await self._write_error(error_response(exc.status, h.new_request_id(), exc.reason))
            return False
        if head is None:
            return False
        body: _ClientBody | None = None
        if head.has_body:
            body = _ClientBody(self.parser, self.reader, self.timeouts.body)
            if head.expect_continue:
                self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif head.chunked:
                try:
                    await self._first_chunk()
                except HttpError as exc:
                    await self._write_error(
                        error_response(exc.status, h.new_request_id(), exc.reason)
                    )
                    return False
        else:
            end = self.parser.next_event()
            assert isinstance(end, EndOfMessage)
        return await self._serve_parsed(head, body, prior)

    async def _serve_parsed(
        self, head: RequestHead, body: _ClientBody | None, prior: PriorAttempt | None = None
    ) -> bool:
        websocket = is_websocket_upgrade(head)
        request = ProxyRequest(
            method=head.method,
            target=_origin_form(head.target),
            authority=_authority_from_target(head.target) or head.header(b"host"),
            headers=[(n, v) for n, v in head.headers if n != b"host"],
            client=self.client,
            local_address=self.local_address,
            local_port=self.client.local_port,
            body=body,
            content_length=head.content_length,
            websocket=websocket,
            prior=prior,
            # RFC 9110 15.2: no 1xx to an HTTP/1.0 client.
            informational=self._informational if head.http_version == b"1.1" else None,
        )
        response = await self.forwarder.handle(request, self.leases)
        try:
            if response.tunnel is not None and websocket and response.status == 101:
                await self._tunnel(response)
                return False
            keep = await self._write_response(head, response)
        finally:
            await response.aclose()
        if body is not None and not body.ended:
            return (
                False  # part of the body is still unread: its bytes cannot be trusted as a request
            )
        return keep

    def _informational(self, status: int, reason: bytes, headers: h.Headers) -> None:
        """A machine's 1xx, passed on before the final head (which follows it on the
        same writer, so the order holds); small and bounded in number: no drain."""
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            self.writer.write(head_bytes(status, reason, headers))

    async def _first_chunk(self) -> None:
        """Wait (bounded) for the first chunk header, so a malformed chunked body sent
        with its head is refused before any machine sees the request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.body
        while not self.parser.probe_body() and len(self.parser.buffer) < READ_SIZE:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HttpError(408, "request body timed out")
            try:
                async with asyncio.timeout(remaining):
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError as exc:
                raise HttpError(408, "request body timed out") from exc
            if not data:
                raise HttpError(400, "client closed during the body")
            self.parser.feed(data)

    async def _write_error(self, response: ProxyResponse) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            self.writer.write(
                head_bytes(
                    response.status, response.reason, [*response.headers, (b"connection", b"close")]
                )
            )
            self.writer.write(await response.body.read())
            await asyncio.wait_for(self.writer.drain(), self.timeouts.body)
        await response.aclose()

    async def _write_response(self, head: RequestHead, response: ProxyResponse) -> bool:
        framing = response_framing(head, response.status, response.headers, response.close)
        chunked, keep = framing.chunked, framing.keep
        out = head_bytes(response.status, response.reason, framing.headers)
        if not framing.no_body:
            # A body already buffered (the usual small response) leaves with its head
            # in one write; otherwise the head goes first and the body streams after.
            chunk = read_ready(response.body)
            if chunk is not None:
                if chunk:
                    out += b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                    more = read_ready(response.body)  # usually b"": the end, already seen
                    if more is None or more:
                        self.writer.write(out)
                        out = b""
                        if more:
                            self.writer.write(
                                b"%x\r\n%b\r\n" % (len(more), more) if chunked else more
                            )
                        await self._stream_body(response, chunked)
                        return keep
                if chunked:
                    out += response_end_chunk(trailers_of(response.body))
                self.writer.write(out)
            else:
                self.writer.write(out)
                await self._stream_body(response, chunked)
                return keep
        else:
            self.writer.write(out)
        await self.writer.drain()
        return keep

    async def _stream_body(self, response: ProxyResponse, chunked: bool) -> None:
        while chunk := await response.body.read():
            self.writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await self.writer.drain()
        if chunked:
            self.writer.write(response_end_chunk(trailers_of(response.body)))
        await self.writer.drain()

    async def _tunnel(self, response: ProxyResponse) -> None:
        assert response.tunnel is not None
        headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), *response.headers]
        self.writer.write(head_bytes(101, b"Switching Protocols", headers))
        await self.writer.drain()
        # Bytes the client sent right after its handshake belong to the tunnel.
        leftover = bytes(self.parser.buffer)
        self.parser.buffer.clear()
        client = SocketTunnel(self.reader, self.writer, leftover)
        await splice(client, response.tunnel, self.timeouts.tunnel_idle)


def _authority_from_target(target: bytes) -> bytes | None:
    for scheme in (b"http://", b"https://"):
        if target.startswith(scheme):
            return target[len(scheme) :].split(b"/", 1)[0] or None
    return None


def _origin_form(target: bytes) -> bytes:
    """Absolute-form → origin-form: machines get the path, the authority goes to Host."""
    if target.startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        return rest[slash:] if slash >= 0 else b"/"
    return target


@dataclass(frozen=True, slots=True)
class ResponseFraming:
    headers: h.Headers  # the response's headers plus ours for framing and keep-alive
    no_body: bool  # HEAD, 1xx, 204, 304
    chunked: bool  # we chunk the body (no Content-Length, an HTTP/1.1 client)
    keep: bool  # the connection carries the next request afterwards


def response_framing(
    head: RequestHead, status: int, headers: h.Headers, close: bool
) -> ResponseFraming:
    """How a response to ``head`` goes out on HTTP/1.x (RFC 9112 6.3, 9.3)."""
    out = list(headers)
    no_body = head.method == b"HEAD" or status in _NO_BODY_STATUSES or status < 200
    has_length = h.header_value(out, b"content-length") is not None
    chunked = not no_body and not has_length and head.http_version == b"1.1"
    keep = head.keep_alive and not close and (no_body or has_length or chunked)
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if not keep:
        out.append((b"connection", b"close"))
    elif head.http_version == b"1.0":
        out.append((b"connection", b"keep-alive"))
    return ResponseFraming(out, no_body, chunked, keep)


def response_end_chunk(trailers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The end of a chunked body, carrying the machine's trailer fields after
    ``forwardable_trailers``. Only a chunked response can carry them: to a client
    that gets Content-Length (or close-delimited, HTTP/1.0) framing they are dropped,
    as RFC 9110 6.5.1 allows a recipient to."""
    return h.last_chunk(h.forwardable_trailers(trailers)) if trailers else b"0\r\n\r\n"


def head_bytes(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
    lines = [b"HTTP/1.1 %d %b" % (status, reason)]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"
