"""The lab's machines: small servers that say who they are.

- whoami (raw-TCP services): on connect sends `<machine-id> <region>\\n`, then
  echoes everything back until EOF.
- http (services with the `http` handler): 200 on any path with `X-Machine-Id` and
  `X-Machine-Region`; echoes POST/PUT bodies; `GET /healthz` is 200; a WebSocket
  echo on `/ws`. Each request except `/healthz` is logged as one line
  `request <method> <target> id=<Edgeproxy-Request-Id> replay-source=<...>` (`-`
  when absent) on stdout, i.e. the machine's lab log.
  Test hooks (request headers):
  - `X-Lab-Reply-Header: Name: value` makes the response carry `Name: value` (so
    a test can make a machine ask for a replay).
  - `X-Lab-Delay-Ms: N` holds the response back N ms (at most 30 s).
  - `X-Lab-Echo-Headers: 1` on a GET makes the body the request's headers as a
    JSON list of [name, value] pairs (what the machine saw).

Run as `python -m edgelab.machines {whoami|http} --id ID --region R --address A --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import h11
import wsproto
import wsproto.events as ws_events
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

READ_SIZE = 65536
MAX_BODY = 8 * 1024 * 1024
IDLE_TIMEOUT_S = 120.0  # a silent client cannot hold a connection forever
REPLY_HEADER_HOOK = "x-lab-reply-header"
DELAY_HOOK = b"x-lab-delay-ms"
ECHO_HEADERS_HOOK = b"x-lab-echo-headers"
MAX_DELAY_MS = 30_000
IN_FLIGHT_HEADER = b"x-lab-in-flight"  # requests this machine had open when this one arrived
BODY_ECHO_METHODS = (b"POST", b"PUT", b"PATCH")


@dataclass(frozen=True, slots=True)
class Identity:
    machine_id: str
    region: str
    app: str

    @property
    def greeting(self) -> bytes:
        return f"{self.machine_id} {self.region}\n".encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-machine-id", self.machine_id.encode()),
            (b"x-machine-region", self.region.encode()),
        ]


# ---------------------------------------------------------------- whoami


async def serve_whoami(identity: Identity, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(identity.greeting)
        await writer.drain()
        while True:
            data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT_S)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# ---------------------------------------------------------------- http


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key.lower() == name:
            return bytes(value)
    return None


def _is_websocket_upgrade(request: h11.Request) -> bool:
    upgrade = _header(request, b"upgrade") or b""
    return request.target.split(b"?")[0] == b"/ws" and upgrade.lower() == b"websocket"


def hooked_headers(request: h11.Request) -> list[tuple[bytes, bytes]]:
    """Headers a test asked this machine to answer with (X-Lab-Reply-Header)."""
    extra = []
    for key, value in request.headers:
        if key.lower() == REPLY_HEADER_HOOK.encode() and b":" in value:
            name, _, text = bytes(value).partition(b":")
            extra.append((name.strip(), text.strip()))
    return extra


def delay_of(request: h11.Request) -> float:
    """Seconds the X-Lab-Delay-Ms hook asks this machine to wait (0 without it)."""
    value = _header(request, DELAY_HOOK)
    if value is None or not value.strip().isdigit():
        return 0.0
    return min(int(value), MAX_DELAY_MS) / 1000


def request_log_line(request: h11.Request) -> str | None:
    """The log line for one request; None for health checks (too many to log)."""
    if request.target.split(b"?")[0] == b"/healthz":
        return None
    request_id = _header(request, b"edgeproxy-request-id") or b"-"
    source = _header(request, b"edgeproxy-replay-source") or b"-"
    return (f"request {request.method.decode(errors='replace')} "
            f"{request.target.decode(errors='replace')} id={request_id.decode(errors='replace')} "
            f"replay-source={source.decode(errors='replace')}")


def http_response(identity: Identity, request: h11.Request,
                  body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body for one request (pure: no sockets)."""
    path = request.target.split(b"?")[0]
    if request.method == b"GET" and path == b"/healthz":
        payload = b"ok\n"
    elif request.method in BODY_ECHO_METHODS:
        payload = body
    elif _header(request, ECHO_HEADERS_HOOK) is not None:
        seen = [[bytes(k).decode("latin-1"), bytes(v).decode("latin-1")]
                for k, v in request.headers]
        payload = json.dumps(seen).encode() + b"\n"
    else:
        payload = (
            f"machine {identity.machine_id} region {identity.region} app {identity.app} "
            f"{request.method.decode()} {request.target.decode(errors='replace')}\n"
        ).encode()
    headers = [
        *identity.headers(),
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(payload)).encode()),
        *hooked_headers(request),
    ]
    return 200, headers, payload


class HttpConnection:
    """One client connection: h11 for HTTP/1.1 keep-alive, wsproto after an upgrade."""

    in_flight = 0  # this machine process's requests being answered (health checks aside)

    def __init__(self, identity: Identity, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.identity = identity
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER)

    async def _receive(self) -> None:
        data = await asyncio.wait_for(self.reader.read(READ_SIZE), IDLE_TIMEOUT_S)
        self.conn.receive_data(data)

    async def _next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._receive()

    async def _send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                self.writer.write(data)
        await self.writer.drain()

    async def _read_body(self) -> bytes | None:
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def run(self) -> None:
        while True:
            event = await self._next_event()
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed, or a PAUSED left over from an upgrade
            line = request_log_line(event)
            if line is None:
                if not await self._answer(event, None):
                    return
                continue
            print(line, file=sys.stdout, flush=True)
            HttpConnection.in_flight += 1
            try:
                if not await self._answer(event, HttpConnection.in_flight):
                    return
            finally:
                HttpConnection.in_flight -= 1

    async def _answer(self, event: h11.Request, in_flight: int | None) -> bool:
        """Answer one request; False when the connection is over."""
        body = await self._read_body()
        if body is None:
            too_big = h11.Response(status_code=413, headers=[(b"content-length", b"0")],
                                   reason=b"Payload Too Large")
            await self._send(too_big, h11.EndOfMessage())
            return False
        if _is_websocket_upgrade(event):
            await self._websocket(event)
            return False
        status, headers, payload = http_response(self.identity, event, body)
        if in_flight is not None:
            headers.append((IN_FLIGHT_HEADER, str(in_flight).encode()))
        delay = delay_of(event)
        if delay:
            await asyncio.sleep(delay)
        await self._send(h11.Response(status_code=status, headers=headers, reason=b"OK"),
                         h11.Data(data=payload), h11.EndOfMessage())
        if self.conn.our_state is h11.MUST_CLOSE:
            return False
        self.conn.start_next_cycle()
        return True

    async def _websocket(self, request: h11.Request) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        headers = [(bytes(k), bytes(v)) for k, v in request.headers]
        ws.initiate_upgrade_connection(headers, request.target)
        trailing, _ = self.conn.trailing_data
        if trailing:  # bytes the client sent right after its handshake
            ws.receive_data(bytes(trailing))
        self.writer.write(ws.send(ws_events.AcceptConnection(extra_headers=self.identity.headers())))
        await self.writer.drain()
        await WebSocketEcho(ws, self.reader, self.writer).run()


class WebSocketEcho:
    def __init__(self, ws: wsproto.WSConnection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.ws, self.reader, self.writer = ws, reader, writer

    def _answer(self, event: ws_events.Event) -> bool:
        """Queue the reply to one event; False once the conversation is over."""
        if isinstance(event, ws_events.Message):  # text or bytes: echo it as it came
            echo = ws_events.Message(data=event.data, message_finished=event.message_finished)
            self.writer.write(self.ws.send(echo))
        elif isinstance(event, ws_events.Ping):
            self.writer.write(self.ws.send(event.response()))
        elif isinstance(event, ws_events.CloseConnection):
            self.writer.write(self.ws.send(event.response()))
            return False
        return True

    async def run(self) -> None:
        while True:
            for event in self.ws.events():
                if not self._answer(event):
                    await self.writer.drain()
                    return
            await self.writer.drain()
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), IDLE_TIMEOUT_S)
            if not data:
                return
            self.ws.receive_data(data)


async def serve_http(identity: Identity, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    try:
        await HttpConnection(identity, reader, writer).run()
    except (OSError, TimeoutError, h11.ProtocolError, LocalProtocolError, RemoteProtocolError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# ---------------------------------------------------------------- entry


async def serve(kind: str, identity: Identity, address: str, port: int,
                ready_file: Path | None) -> None:
    handler = serve_whoami if kind == "whoami" else serve_http

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handler(identity, reader, writer)

    server = await asyncio.start_server(on_connect, address, port, backlog=1024,
                                        reuse_address=True)
    if ready_file is not None:
        ready_file.write_text("ready\n")
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgelab.machines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("whoami", "http"))
    parser.add_argument("--id", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--app", default="")
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    identity = Identity(args.id, args.region, args.app)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.kind, identity, args.address, args.port, args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
