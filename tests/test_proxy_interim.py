"""Interim (1xx) responses and response trailers, end to end: a machine's 102/103
reach HTTP/1.1 and HTTP/2 clients (fast lane, general path, over the backhaul),
never an HTTP/1.0 client; a machine's 100 is not forwarded (the edge answers
Expect itself); too many 1xx is a bad response; chunked responses' trailer fields
reach clients that can take them, hop-by-hop ones stripped, and clients' request
trailers reach machines, forged internal fields stripped. Real sockets on
loopback, machines answering with literal bytes (test_proxy_fastlane.RawMachine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import pytest

from edgeproxy.proxy.responses import (
    END,
    MAX_INFORMATIONAL,
    MAX_TRAILERS,
    NEED_DATA,
    Data,
    ResponseError,
    ResponseHead,
    ResponseParser,
)
from test_proxy_fastlane import RawMachine, in_place_of, lane_counts, settle
from test_proxy_support import VIP, Lab, lab, raw_exchange, run

EARLY_HINTS = (
    b"HTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
    b"Connection: x-hop\r\nX-Hop: 1\r\nEdgeproxy-Replay: region=syd\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_WITH_TRAILERS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\nConnection: x-drop\r\nX-Drop: 1\r\n"
    b"Keep-Alive: timeout=5\r\nContent-Length: 99\r\n\r\n"
)
FORCE_AMS = b"Edgeproxy-Force-Machine: web-ams-1\r\n"
FORCE_ORD = b"Edgeproxy-Force-Machine: web-ord-1\r\n"


@contextlib.asynccontextmanager
async def raw_lab(answer: bytes, *machines: str) -> AsyncIterator[Lab]:
    """The test lab with ``machines`` answering every request with ``answer``."""
    async with lab() as L, contextlib.AsyncExitStack() as stack:
        for machine in machines:
            await stack.enter_async_context(
                in_place_of(L.machines[machine], RawMachine(answer, False))
            )
        yield L


def _get(path: str, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/%b\r\nHost: web.test\r\n%bConnection: close\r\n\r\n" % (
        path.encode(),
        version,
        extra,
    )


def _post(path: str, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST %b HTTP/%b\r\nHost: web.test\r\n%bContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        % (path.encode(), version, extra)
    )


def _chunked_post(path: str) -> bytes:
    """A POST the fast lane hands to the general path (a chunked body)."""
    return (
        b"POST %b HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n" % path.encode()
    )


def _heads(raw: bytes) -> list[bytes]:
    """The status lines in a raw answer, in order."""
    return [line for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def _block(raw: bytes, status: bytes) -> bytes:
    """The head (lower-cased) whose status line starts with HTTP/1.1 <status>."""
    start = raw.index(b"HTTP/1.1 " + status)
    return raw[start : raw.index(b"\r\n\r\n", start)].lower()


def _check_early_hints(raw: bytes) -> None:
    assert _heads(raw) == [
        b"HTTP/1.1 102 Processing",
        b"HTTP/1.1 103 Early Hints",
        b"HTTP/1.1 200 OK",
    ], raw[:600]
    hints = _block(raw, b"103")
    assert b"link: </style.css>; rel=preload" in hints
    # The same stripping as a final head: hop-by-hop fields, the fields Connection
    # names and proxy directives are gone; the request id is ours.
    assert b"x-hop" not in hints and b"connection" not in hints
    assert b"edgeproxy-replay" not in hints and b"edgeproxy-request-id: " in hints
    assert raw.endswith(b"\r\n\r\nok")


# --- HTTP/1.1 clients ------------------------------------------------------------------


def test_103_reaches_an_http11_client_on_the_lane_and_on_the_general_path() -> None:
    async def main() -> None:
        async with raw_lab(EARLY_HINTS + OK, "web-ord-1") as L:
            _check_early_hints(await raw_exchange(_get("/lane"), L.port))
            assert lane_counts(L.edge) == (1, 0)
            _check_early_hints(await raw_exchange(_chunked_post("/general"), L.port))
            assert lane_counts(L.edge) == (1, 1)
            await settle(L.edge)
            assert L.edge.snapshot().responses[("web", 200)] == 2

    run(main)


def test_103_crosses_the_backhaul_to_an_http11_client() -> None:
    async def main() -> None:
        async with raw_lab(EARLY_HINTS + OK, "web-ams-1") as L:
            _check_early_hints(await raw_exchange(_get("/bh", extra=FORCE_AMS), L.port))
            _check_early_hints(await raw_exchange(_post("/bh", extra=FORCE_AMS), L.port))
            await settle(L.edge)

    run(main)


def test_http10_client_gets_no_1xx() -> None:
    async def main() -> None:
        async with raw_lab(EARLY_HINTS + OK, "web-ord-1", "web-ams-1") as L:
            for data in (
                _get("/lane", b"1.0"),
                _post("/general", b"1.0"),
                _get("/bh", b"1.0", FORCE_AMS),
            ):
                out = await raw_exchange(data, L.port)
                assert _heads(out) == [b"HTTP/1.1 200 OK"], out[:400]
                assert out.endswith(b"\r\n\r\nok")
            await settle(L.edge)

    run(main)


def test_100_from_the_machine_is_not_forwarded() -> None:
    async def main() -> None:
        answer = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
        async with raw_lab(answer, "web-ord-1", "web-ams-1") as L:
            for data in (_get("/lane"), _post("/general"), _post("/bh", extra=FORCE_AMS)):
                out = await raw_exchange(data, L.port)
                assert _heads(out) == [b"HTTP/1.1 200 OK"], out[:400]
            # Expect: 100-continue is answered by the edge, once; the machine's
            # own 100 would be a second one.
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                writer.write(
                    b"POST /e HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
                )
                first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(b"abc")
                rest = await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
            assert _heads(rest) == [b"HTTP/1.1 200 OK"], rest[:400]
            await settle(L.edge)

    run(main)


def test_too_many_1xx_is_a_bad_response() -> None:
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"

    async def main() -> None:
        async with raw_lab(hint * MAX_INFORMATIONAL + OK, "web-ord-1") as L:
            out = await raw_exchange(_get("/eight"), L.port)
            assert _heads(out)[-1] == b"HTTP/1.1 200 OK"
            assert len(_heads(out)) == MAX_INFORMATIONAL + 1
        # A fresh lab: the edge's pooled connections to the first machine stay open.
        async with raw_lab(hint * (MAX_INFORMATIONAL + 1) + OK, "web-ord-1", "web-ams-1") as L:
            # Forced to one machine, so the retry has nowhere else to go: 502,
            # on the lane (GET), the general path (POST) and over the backhaul.
            for data in (
                _get("/nine", extra=FORCE_ORD),
                _post("/nine", extra=FORCE_ORD),
                _get("/nine", extra=FORCE_AMS),
            ):
                out = await raw_exchange(data, L.port)
                assert _heads(out)[-1].startswith(b"HTTP/1.1 502 "), out[-400:]
                assert b"HTTP/1.1 200" not in out
            await settle(L.edge)

    run(main)


# --- trailers to HTTP/1.1 clients ---------------------------------------------------------


async def _h11_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h11.Connection,
    method: str,
    extra: list[tuple[str, str]],
) -> tuple[int, bytes, dict[bytes, bytes]]:
    """One request; returns (status, body, trailer fields)."""
    headers = [("host", "web.test"), *extra]
    body = b"abc" if method == "POST" else b""
    if body:
        headers.append(("content-length", "3"))
    writer.write(conn.send(h11.Request(method=method, target="/t", headers=headers)) or b"")
    if body:
        writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    status, out, trailers = 0, bytearray(), {}
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 5))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage):
            trailers = {bytes(n): bytes(v) for n, v in event.headers}
            conn.start_next_cycle()
            return status, bytes(out), trailers


def test_trailers_reach_an_http11_client_with_hop_by_hop_fields_stripped() -> None:
    async def main() -> None:
        async with raw_lab(CHUNKED_WITH_TRAILERS, "web-ord-1", "web-ams-1") as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            conn = h11.Connection(h11.CLIENT)
            try:
                cases: list[tuple[str, list[tuple[str, str]]]] = [
                    ("GET", []),  # the lane
                    ("POST", []),  # the general path
                    ("GET", [("edgeproxy-force-machine", "web-ams-1")]),  # backhaul
                    ("GET", []),  # keep-alive after all of them
                ]
                for method, extra in cases:
                    status, body, trailers = await _h11_exchange(
                        reader, writer, conn, method, extra
                    )
                    assert status == 200 and body == b"hello", (method, extra)
                    assert trailers == {b"x-checksum": b"abc123"}, (method, extra, trailers)
            finally:
                writer.close()
            # HTTP/1.0: the body is not chunked, so there is no place for them.
            out = await raw_exchange(_get("/t", b"1.0"), L.port)
            assert out.endswith(b"\r\n\r\nhello") and b"abc123" not in out, out[-300:]
            await settle(L.edge)

    run(main)


# --- HTTP/2 clients ---------------------------------------------------------------


async def _stream_1_events(conn: h2.connection.H2Connection, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> list[Any]:
    """Send what ``conn`` has queued, then read until stream 1 ends; its events, in
    order (its DATA acknowledged as it comes). Closes the connection."""
    writer.write(conn.data_to_send())
    events: list[Any] = []
    try:
        while not any(isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) for e in events):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "connection closed"
            for event in conn.receive_data(data):
                if getattr(event, "stream_id", None) == 1:
                    events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return events


async def _h2_get(port: int, path: str, extra: list[tuple[bytes, bytes]]) -> list[Any]:
    """One GET with h2 (prior knowledge); every event of its stream, in order."""
    reader, writer = await asyncio.open_connection(VIP, port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    request = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"web.test"),
        (b":path", path.encode()),
        *extra,
    ]
    conn.send_headers(1, request, end_stream=True)
    return await _stream_1_events(conn, reader, writer)


@pytest.mark.parametrize("machine", ["web-ord-1", "web-ams-1"])
def test_h2_client_gets_informational_headers_then_the_response(machine: str) -> None:
    async def main() -> None:
        async with raw_lab(EARLY_HINTS + OK, machine) as L:
            force = [(b"edgeproxy-force-machine", machine.encode())]
            events = await _h2_get(L.port, "/h2", force)
            kinds = [type(e).__name__ for e in events]
            assert kinds[:3] == [
                "InformationalResponseReceived",
                "InformationalResponseReceived",
                "ResponseReceived",
            ], kinds
            processing, hints, final = (dict(e.headers) for e in events[:3])
            assert processing[b":status"] == b"102"
            assert hints[b":status"] == b"103"
            assert hints[b"link"] == b"</style.css>; rel=preload"
            assert b"x-hop" not in hints and b"edgeproxy-replay" not in hints
            assert final[b":status"] == b"200"
            body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
            assert body == b"ok"
            await settle(L.edge)

    run(main)


@pytest.mark.parametrize("machine", ["web-ord-1", "web-ams-1"])
def test_h2_client_gets_trailers_as_a_trailing_headers_frame(machine: str) -> None:
    async def main() -> None:
        async with raw_lab(CHUNKED_WITH_TRAILERS, machine) as L:
            force = [(b"edgeproxy-force-machine", machine.encode())]
            events = await _h2_get(L.port, "/h2t", force)
            trailers = [e for e in events if isinstance(e, h2.events.TrailersReceived)]
            assert len(trailers) == 1, [type(e).__name__ for e in events]
            # Hop-by-hop (keep-alive, connection and what it names) and framing
            # (content-length) fields are not passed on.
            assert dict(trailers[0].headers) == {b"x-checksum": b"abc123"}
            assert trailers[0].stream_ended is not None
            body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
            assert body == b"hello"
            await settle(L.edge)

    run(main)


# --- the parser (sans-IO) ---------------------------------------------------------------


def _events(parser: ResponseParser) -> list[object]:
    out: list[object] = []
    while (event := parser.next_event()) is not NEED_DATA:
        out.append(event)
        if event is END:
            break
    return out


def test_parser_keeps_trailers_bounds_them_and_bounds_interim_heads() -> None:
    parser = ResponseParser()
    parser.start(b"GET")
    parser.feed(CHUNKED_WITH_TRAILERS)
    events = _events(parser)
    assert isinstance(events[0], ResponseHead) and events[1] == Data(b"hello")
    assert events[-1] is END
    assert (b"x-checksum", b"abc123") in parser.trailers
    parser.start(b"GET")  # the next response on the connection: none yet
    assert not parser.trailers

    big = ResponseParser()
    big.start(b"GET")
    big.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    big.feed(b"X-Big: " + b"a" * MAX_TRAILERS + b"\r\n\r\n")
    with pytest.raises(ResponseError, match="trailers too large"):
        _events(big)

    folded = ResponseParser()
    folded.start(b"GET")
    folded.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\r\n\tfold\r\n\r\n")
    with pytest.raises(ResponseError, match="trailer section"):
        _events(folded)

    interim = ResponseParser()
    interim.start(b"GET")
    interim.feed(b"HTTP/1.1 103 Early Hints\r\n\r\n" * (MAX_INFORMATIONAL + 1))
    with pytest.raises(ResponseError, match="too many interim"):
        _events(interim)


def test_1xx_before_a_replay_directive_still_reach_the_client() -> None:
    async def main() -> None:
        replay = b"HTTP/1.1 200 OK\r\nEdgeproxy-Replay: region=syd\r\nContent-Length: 0\r\n\r\n"
        async with raw_lab(EARLY_HINTS + replay, "web-ord-1") as L:
            for data in (_get("/lane"), _post("/general")):
                out = await raw_exchange(data, L.port)
                assert _heads(out) == [
                    b"HTTP/1.1 102 Processing",
                    b"HTTP/1.1 103 Early Hints",
                    b"HTTP/1.1 200 OK",
                ], out[:600]
                assert b'"machine": "web-syd-1"' in out
            await settle(L.edge)

    run(main)


# --- request trailers (client → machine) ----------------------------------------------

REQUEST_TRAILERS = [
    (b"x-request-sum", b"42"),
    (b"edgeproxy-client-ip", b"6.6.6.6"),  # a forged internal field
    (b"connection", b"x-gone"),
    (b"x-gone", b"1"),
    (b"content-length", b"7"),
]


def _trailers_seen(body: bytes) -> dict[str, str]:
    seen = json.loads(body)
    assert seen["body_size"] == 5, seen
    return dict(seen["trailers"])


@pytest.mark.parametrize("machine", ["web-ord-1", "web-ams-1"])
def test_request_trailers_reach_the_machine_from_http11_and_h2_clients(machine: str) -> None:
    async def main() -> None:
        async with lab() as L:
            fields = b"".join(n + b": " + v + b"\r\n" for n, v in REQUEST_TRAILERS)
            out = await raw_exchange(
                b"POST /rt HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n"
                b"Edgeproxy-Force-Machine: %b\r\nConnection: close\r\n\r\n"
                b"5\r\nhello\r\n0\r\n%b\r\n" % (machine.encode(), fields),
                L.port,
            )
            assert out.startswith(b"HTTP/1.1 200 "), out[:300]
            assert _trailers_seen(out.split(b"\r\n\r\n", 1)[1]) == {"x-request-sum": "42"}

            events = await _h2_post_with_trailers(L.port, machine)
            body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
            assert _trailers_seen(body) == {"x-request-sum": "42"}
            await settle(L.edge)

    run(main)


async def _h2_post_with_trailers(port: int, machine: str) -> list[Any]:
    reader, writer = await asyncio.open_connection(VIP, port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False
        )
    )
    conn.initiate_connection()
    request = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"web.test"),
        (b":path", b"/rt2"),
        (b"edgeproxy-force-machine", machine.encode()),
    ]
    conn.send_headers(1, request)
    conn.send_data(1, b"hello")
    # h2 refuses connection-specific fields in trailers; the rest of the set goes.
    conn.send_headers(
        1, [f for f in REQUEST_TRAILERS if f[0] not in (b"connection", b"x-gone")], end_stream=True
    )
    return await _stream_1_events(conn, reader, writer)
