"""HTTP/2 from clients (h2c with prior knowledge; TLS+ALPN "h2" will hand its
streams here too). Each stream is one request through the same Forwarder."""

from __future__ import annotations

import asyncio
import contextlib

from h2.errors import ErrorCodes

from edgeproxy.proxy import headers as h
from edgeproxy.proxy.forward import ConnectionLeases, Forwarder, ProxyRequest, error_response
from edgeproxy.proxy.frontend_h1 import ClientTimeouts
from edgeproxy.proxy.h2session import H2Session, H2Stream, StreamReset
from edgeproxy.proxy.upstream import ClientBodyError, UpstreamError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})


class _StreamBody:
    def __init__(self, stream: H2Stream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout

    async def read(self) -> bytes:
        try:
            return await asyncio.wait_for(self._stream.read(), self._timeout)
        except TimeoutError as exc:
            raise ClientBodyError(408, "request body timed out") from exc
        except StreamReset as exc:
            raise ClientBodyError(400, "client reset the stream") from exc


class H2ClientConnection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        forwarder: Forwarder,
        client: h.ClientInfo,
        local_address: str,
        timeouts: ClientTimeouts,
        first_bytes: bytes,
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
        )

    async def serve(self) -> None:
        self.session.start()
        try:
            await self.session.run()
        finally:
            self.forwarder.release_connection(self.leases)

    async def _serve_stream(self, stream: H2Stream) -> None:
        raw = stream.headers.result()
        pseudo = {n: v for n, v in raw if n.startswith(b":")}
        headers = [(n, v) for n, v in raw if not n.startswith(b":") and n != b"host"]
        method = pseudo.get(b":method", b"")
        authority = pseudo.get(b":authority") or h.header_value(raw, b"host")
        if method == b"CONNECT":
            await self._send_simple(stream, 501, "CONNECT over HTTP/2 is not supported")
            return
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
            body=None if stream.ended_with_headers else _StreamBody(stream, self.timeouts.body),
            content_length=int(length) if length is not None and length.isdigit() else None,
        )
        response = await self.forwarder.handle(request, self.leases)
        try:
            no_body = method == b"HEAD" or response.status in _NO_BODY_STATUSES
            out = [(n.lower(), v) for n, v in response.headers]
            stream.send_headers(
                [(b":status", str(response.status).encode()), *out], end_stream=no_body
            )
            if not no_body:
                while chunk := await response.body.read():
                    await stream.write(chunk)
                stream.end()
        except (StreamReset, UpstreamError, ConnectionError, OSError):
            stream.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            await response.aclose()

    async def _send_simple(self, stream: H2Stream, status: int, detail: str) -> None:
        response = error_response(status, h.new_request_id(), detail)
        with contextlib.suppress(StreamReset):
            stream.send_headers([(b":status", str(status).encode()), *response.headers])
            await stream.write(await response.body.read())
            stream.end()
