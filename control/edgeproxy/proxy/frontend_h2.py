"""HTTP/2 from clients (h2c with prior knowledge; TLS+ALPN "h2" will hand its
streams here too). Each stream is one request through the same Forwarder."""

from __future__ import annotations

import base64
import contextlib
import re
import secrets

from edgeproxy.proxy import headers as h
from edgeproxy.proxy.backhaul import StreamTunnel, send_body, status_fields
from edgeproxy.proxy.forward import (
    ConnectionLeases,
    Forwarder,
    ProxyRequest,
    ProxyResponse,
    error_response,
)
from edgeproxy.proxy.frontend_h1 import ClientTimeouts
from edgeproxy.proxy.h2session import (
    CLIENT_LIMITS,
    ErrorCodes,
    H2Limits,
    H2Session,
    H2Stream,
    Headers,
    StreamReset,
)
from edgeproxy.proxy.streams import ByteReader, ByteWriter
from edgeproxy.proxy.upstream import ClientBodyError, Informational, UpstreamError, splice

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})


class _StreamBody:
    def __init__(self, stream: H2Stream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout

    async def read(self) -> bytes:
        try:
            return await self._stream.read_within(self._timeout)
        except TimeoutError as exc:
            raise ClientBodyError(408, "request body timed out") from exc
        except StreamReset as exc:
            raise ClientBodyError(400, "client reset the stream") from exc

    def trailers(self) -> Headers:
        """The client's trailing HEADERS, once the body was read to its end."""
        return self._stream.trailers


_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# RFC 9113 8.2.2: connection-specific fields make a request malformed.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_NAMES = re.compile(rb"(?::?[!#$%&'*+\-.^_`|~0-9a-z]+\n)*")


def malformed_request(raw: Headers) -> str | None:
    """Why a client's HTTP/2 request header list is malformed (RFC 9113 8.1.1,
    8.2, 8.3), or None. The h2 library's own inbound checks are off (they make any
    of these a *connection* error, failing every stream; and they cost), so this
    is where they are enforced, per stream."""
    if _NAMES.fullmatch(b"".join([n + b"\n" for n, _ in raw])) is None:
        return "bad header field name (must be a lower-case token)"
    seen: set[bytes] = set()
    regular = False
    lengths: set[bytes] = set()
    for name, value in raw:
        if b"\r" in value or b"\n" in value or b"\0" in value:
            return "CR, LF or NUL in a header field value"
        if name[:1] == b":":
            if regular:
                return "pseudo-header field after a regular field"
            if name not in _PSEUDO or name in seen:
                return "unknown or repeated pseudo-header field"
            seen.add(name)
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC:
            return f"connection-specific header field {name.decode()}"
        if name == b"te" and value.strip().lower() != b"trailers":
            return "TE other than trailers"
        if name == b"content-length":
            if not value.isdigit():
                return "bad content-length"
            lengths.add(value.lstrip(b"0") or b"0")
    if len(lengths) > 1:
        return "conflicting content-length"
    if b":method" not in seen:
        return "missing :method"
    method = next(v for n, v in raw if n == b":method")
    if method != b"CONNECT" and not ({b":scheme", b":path"} <= seen):
        return "missing :scheme or :path"
    if method != b"CONNECT" and not next(v for n, v in raw if n == b":path"):
        return "empty :path"
    return None


def request_authority(authority: bytes | None, headers: Headers) -> tuple[bytes | None, str | None]:
    """The request's authority and, if the request is malformed, why.

    RFC 9113 8.3.1: clients SHOULD send ``:authority`` rather than Host, but a Host
    header field is allowed; without ``:authority`` it names the target. When both
    are present :authority is the one that counts, and a Host that identifies a
    different entity makes the request malformed (the server SHOULD treat it so):
    it is refused with 400 rather than routed by one value while the machine sees
    the other. Same entity means equal after normalisation (case, trailing dot).
    """
    hosts = [v for n, v in headers if n == b"host"]
    if len(hosts) > 1:
        return None, "more than one Host header field"
    if not hosts:
        return authority, None
    host = hosts[0]
    if not authority:
        return host, None
    if normalize_authority(host) != normalize_authority(authority):
        return None, "Host header field differs from :authority (RFC 9113 8.3.1)"
    return authority, None


def normalize_authority(value: bytes) -> bytes:
    host, sep, port = value.strip().lower().rpartition(b":")
    if not sep or b"]" in port:  # no port (or an IPv6 literal without one)
        host, port = value.strip().lower(), b""
    return host.rstrip(b".") + (b":" + port if port else b"")


def _informational(stream: H2Stream) -> Informational:
    """A machine's 1xx on the client's stream: an informational HEADERS frame (no
    END_STREAM) before the final one."""

    def send(status: int, reason: bytes, headers: Headers) -> None:
        with contextlib.suppress(StreamReset):
            stream.send_headers(status_fields(status, headers))

    return send


class H2ClientConnection:
    def __init__(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        forwarder: Forwarder,
        client: h.ClientInfo,
        local_address: str,
        timeouts: ClientTimeouts,
        first_bytes: bytes,
        limits: H2Limits | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.client = client
        self.local_address = local_address
        self.timeouts = timeouts
        self.leases = ConnectionLeases()
        # Smaller windows than the backhaul: many client connections, each buffers its window.
        self.session = H2Session(
            reader,
            writer,
            client_side=False,
            on_stream=self._serve_stream,
            stream_window=256 * 1024,
            connection_window=1024 * 1024,
            max_concurrent_streams=128,
            preface_already_read=first_bytes,
            enable_connect_protocol=True,  # RFC 8441: WebSockets over HTTP/2
            limits=limits or CLIENT_LIMITS,
            on_abuse=forwarder.counters.http2_abuse_seen,
        )

    async def serve(self) -> None:
        self.session.start()
        try:
            await self.session.run()
        finally:
            self.forwarder.release_connection(self.leases)

    async def _serve_stream(self, stream: H2Stream) -> None:
        raw = stream.headers.result()
        problem = malformed_request(raw)
        if problem is not None:
            # RFC 9113 8.1.1: a malformed request is a *stream* error; the other
            # streams on the connection carry on.
            await self._send_simple(stream, 400, problem, reset=True)
            return
        pseudo = {n: v for n, v in raw if n.startswith(b":")}
        headers = [(n, v) for n, v in raw if not n.startswith(b":") and n != b"host"]
        method = pseudo.get(b":method", b"")
        authority, problem = request_authority(pseudo.get(b":authority"), raw)
        if problem is not None:
            await self._send_simple(stream, 400, problem, reset=True)
            return
        websocket = method == b"CONNECT" and pseudo.get(b":protocol") == b"websocket"
        if method == b"CONNECT" and not websocket:
            await self._send_simple(stream, 501, "CONNECT over HTTP/2 is not supported")
            return
        if websocket:
            # RFC 8441: the machine gets an HTTP/1.1 Upgrade; HTTP/2 has no key, so
            # the edge makes one (the answer's accept is checked by nobody: the
            # client's handshake is this stream's :status 200).
            method = b"GET"
            headers = [
                *[(n, v) for n, v in headers if n != b"sec-websocket-key"],
                (b"sec-websocket-key", base64.b64encode(secrets.token_bytes(16))),
            ]
        cookies = h.header_values(headers, b"cookie")
        if len(cookies) > 1:  # RFC 9113 8.2.3: rejoin cookie crumbs for HTTP/1.1 machines
            headers = [(n, v) for n, v in headers if n != b"cookie"] + [
                (b"cookie", b"; ".join(cookies))
            ]
        length = h.header_value(headers, b"content-length")
        request = ProxyRequest(
            method=method,
            target=pseudo.get(b":path", b"/"),
            authority=authority,
            headers=[(n, v) for n, v in headers if n != b"content-length"],
            client=self.client,
            local_address=self.local_address,
            local_port=self.client.local_port,
            body=None
            if stream.ended_with_headers or websocket
            else _StreamBody(stream, self.timeouts.body),
            content_length=int(length) if length is not None and length.isdigit() else None,
            websocket=websocket,
            informational=None if websocket else _informational(stream),
        )
        response = await self.forwarder.handle(request, self.leases)
        if websocket and response.tunnel is not None and response.status == 101:
            await self._tunnel(stream, response)
            return
        try:
            no_body = method == b"HEAD" or response.status in _NO_BODY_STATUSES
            out = status_fields(response.status, response.headers)
            if no_body:
                stream.send_headers(out, end_stream=True)
            else:
                await send_body(stream, out, response.body)
        except (StreamReset, UpstreamError, ConnectionError, OSError):
            stream.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            await response.aclose()

    async def _tunnel(self, stream: H2Stream, response: ProxyResponse) -> None:
        """The machine accepted the upgrade: 200 on the stream, then raw bytes both
        ways (the stream's DATA frames carry the WebSocket frames untouched)."""
        assert response.tunnel is not None
        out = [(b":status", b"200")]
        out += [
            (n.lower(), v)
            for n, v in response.headers
            if n.lower() not in (b"sec-websocket-accept", b"connection", b"upgrade")
        ]
        try:
            stream.send_headers(out)
            await splice(StreamTunnel(stream), response.tunnel, self.timeouts.tunnel_idle)
        except (StreamReset, UpstreamError, ConnectionError, OSError):
            stream.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            await response.aclose()

    async def _send_simple(
        self, stream: H2Stream, status: int, detail: str, reset: bool = False
    ) -> None:
        response = error_response(status, h.new_request_id(), detail)
        with contextlib.suppress(StreamReset):
            stream.send_headers([(b":status", str(status).encode()), *response.headers])
            await stream.write(await response.body.read(), end=True)
            if reset and not stream.remote_ended:
                stream.reset(ErrorCodes.NO_ERROR)  # its body will never be read
