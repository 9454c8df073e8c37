"""HTTP/2 abuse bounds at the edge, with real clients on loopback: rapid reset
(CVE-2023-44487), CONTINUATION floods (bytes and frames), SETTINGS and PING floods,
zero-window stalls. The abusing connection gets GOAWAY ENHANCE_YOUR_CALM and is
closed, each kind is counted, and a well-behaved client on its own connection
keeps getting its answers meanwhile. The abuser's frames are built by hand here
(so nothing in a client library can refuse to send them)."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from edgeproxy.proxy import frontend_h2
from edgeproxy.proxy.h2session import CLIENT_LIMITS
from test_proxy_support import VIP, Lab, lab, run

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, END_HEADERS = 0x1, 0x4
ENHANCE_YOUR_CALM = 0xB


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream_id
    ) + payload


def _integer(value: int, prefix: int) -> bytes:
    """HPACK integer with a ``prefix``-bit prefix (RFC 7541 5.1), first byte's flags 0."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes([value])
    out, value = bytearray([top]), value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(fields: list[tuple[bytes, bytes]]) -> bytes:
    """A header block of literals without indexing, no huffman (RFC 7541 6.2.2)."""
    out = b""
    for name, value in fields:
        out += b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value
    return out


def request_block(path: bytes = b"/x") -> bytes:
    return literal(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path),
         (b":authority", b"web.test")]
    )


def goaways(data: bytes) -> Iterator[int]:
    """The error codes of the GOAWAY frames in what the server sent."""
    offset = 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        kind = data[offset + 3]
        payload = data[offset + 9 : offset + 9 + length]
        if kind == GOAWAY and len(payload) >= 8:
            yield int.from_bytes(payload[4:8], "big")
        offset += 9 + length


async def abuse(port: int, frames: bytes, *, settings: bytes = b"", timeout: float = 5.0) -> bytes:
    """Connect, send the preface, SETTINGS and ``frames``; everything the edge sends
    until it closes the connection (a timeout fails the test: it has to close)."""
    reader, writer = await asyncio.open_connection(VIP, port)
    try:
        writer.write(PREFACE + frame(SETTINGS, 0, 0, settings) + frames)
        await writer.drain()
        received = bytearray()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
        return bytes(received)
    finally:
        writer.close()


async def good_client(port: int, count: int, pause: float = 0.02) -> list[int]:
    """A well-behaved h2c client: ``count`` GETs one after another on one connection."""
    reader, writer = await asyncio.open_connection(VIP, port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    statuses: list[int] = []
    try:
        for _ in range(count):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(
                stream_id,
                [(":method", "GET"), (":scheme", "http"), (":path", "/good"),
                 (":authority", "web.test")],
                end_stream=True,
            )
            writer.write(conn.data_to_send())
            done = False
            while not done:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the well-behaved client's connection was closed"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses.append(int(dict(event.headers)[b":status"]))
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                        done = True
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        raise AssertionError(f"GOAWAY to the good client: {event}")
                writer.write(conn.data_to_send())
            await asyncio.sleep(pause)
    finally:
        writer.close()
    return statuses


def abuse_counts(L: Lab) -> dict[str, int]:
    return dict(L.edge.snapshot().http2_abuse)


async def check_abuse(L: Lab, frames: bytes, kind: str, *, settings: bytes = b"") -> None:
    """The abuser gets GOAWAY ENHANCE_YOUR_CALM and is closed, the kind is counted
    once, and a good client's requests all succeed meanwhile."""
    good = asyncio.create_task(good_client(L.port, 15))
    await asyncio.sleep(0.05)  # the good client is mid-conversation during the abuse
    received = await abuse(L.port, frames, settings=settings)
    assert ENHANCE_YOUR_CALM in list(goaways(received)), received[-64:]
    assert abuse_counts(L) == {kind: 1}
    assert await good == [200] * 15


def test_rapid_reset_gets_goaway() -> None:
    """CVE-2023-44487: HEADERS then RST_STREAM, over and over, faster than the
    bound (burst 200, 50/s) -> GOAWAY ENHANCE_YOUR_CALM."""
    flood = b"".join(
        frame(HEADERS, END_STREAM | END_HEADERS, sid, request_block())
        + frame(RST_STREAM, 0, sid, struct.pack(">I", 8))
        for sid in range(1, 2 * 400, 2)
    )

    async def main() -> None:
        async with lab() as L:
            await check_abuse(L, flood, "rapid_reset")

    run(main)


def test_some_resets_are_fine() -> None:
    """Cancelling a few streams is normal: no GOAWAY, nothing counted."""
    few = b"".join(
        frame(HEADERS, END_STREAM | END_HEADERS, sid, request_block())
        + frame(RST_STREAM, 0, sid, struct.pack(">I", 8))
        for sid in range(1, 2 * 20, 2)
    )

    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            writer.write(PREFACE + frame(SETTINGS, 0, 0) + few)
            received = bytearray()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    while chunk := await reader.read(65536):
                        received += chunk
            writer.close()
            assert list(goaways(bytes(received))) == []
            assert abuse_counts(L) == {}

    run(main)


def test_continuation_flood_of_bytes_gets_goaway() -> None:
    """A header block that grows past 64 KiB before END_HEADERS (a few big
    CONTINUATION frames) -> GOAWAY, before the block is ever complete."""
    pad = literal([(b"x-pad", b"a" * 10_000)])
    flood = frame(HEADERS, END_STREAM, 1, request_block()) + b"".join(
        frame(CONTINUATION, 0, 1, pad) for _ in range(8)
    )

    async def main() -> None:
        async with lab() as L:
            await check_abuse(L, flood, "continuation_flood")

    run(main)


def test_continuation_flood_of_frames_gets_goaway() -> None:
    """Many tiny CONTINUATION frames, never END_HEADERS -> GOAWAY after 16 frames."""
    flood = frame(HEADERS, END_STREAM, 1, request_block()) + b"".join(
        frame(CONTINUATION, 0, 1, literal([(b"x-a", b"b")])) for _ in range(200)
    )

    async def main() -> None:
        async with lab() as L:
            await check_abuse(L, flood, "continuation_flood")

    run(main)


def test_settings_flood_gets_goaway() -> None:
    flood = b"".join(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x3, 100)) for _ in range(200))

    async def main() -> None:
        async with lab() as L:
            await check_abuse(L, flood, "settings_flood")

    run(main)


def test_ping_flood_gets_goaway() -> None:
    flood = b"".join(frame(PING, 0, 0, struct.pack(">Q", n)) for n in range(200))

    async def main() -> None:
        async with lab() as L:
            await check_abuse(L, flood, "ping_flood")

    run(main)


def test_zero_window_stall_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that asks for a big body but never opens its window: after the stall
    timeout (0.5 s here, 30 s by default) the edge sends GOAWAY and closes."""
    monkeypatch.setattr(
        frontend_h2, "CLIENT_LIMITS", dataclasses.replace(CLIENT_LIMITS, send_stall=0.5)
    )
    no_window = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    ask = frame(HEADERS, END_STREAM | END_HEADERS, 1, request_block(b"/download?n=1000000"))

    async def main() -> None:
        async with lab() as L:
            await check_abuse(L, ask, "zero_window", settings=no_window)

    run(main)


def test_slow_reader_is_not_a_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that opens its window slowly but steadily is served to the end."""
    monkeypatch.setattr(
        frontend_h2, "CLIENT_LIMITS", dataclasses.replace(CLIENT_LIMITS, send_stall=0.5)
    )

    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding=None)
            )
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384}
            )
            conn.initiate_connection()
            conn.send_headers(
                1,
                [(":method", "GET"), (":scheme", "http"), (":path", "/download?n=300000"),
                 (":authority", "web.test")],
                end_stream=True,
            )
            writer.write(conn.data_to_send())
            got, ended = 0, False
            async with asyncio.timeout(15):
                while not ended:
                    data = await reader.read(65536)
                    assert data, "closed on a slow reader"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            got += len(event.data)
                            await asyncio.sleep(0.05)  # a slow consumer, 16 KiB at a time
                            conn.acknowledge_received_data(event.flow_controlled_length, 1)
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = True
                        elif isinstance(event, h2.events.ConnectionTerminated):
                            raise AssertionError(f"GOAWAY to a slow reader: {event}")
                    writer.write(conn.data_to_send())
            writer.close()
            assert got == 300000 and abuse_counts(L) == {}

    run(main)


def test_protocol_error_is_goaway_but_not_abuse() -> None:
    """A plain protocol error (DATA on stream 0) is GOAWAY PROTOCOL_ERROR and a
    closed connection, not counted as abuse."""

    async def main() -> None:
        async with lab() as L:
            received = await abuse(L.port, frame(DATA, 0, 0, b"x"))
            assert list(goaways(received)) == [0x1]
            assert abuse_counts(L) == {}

    run(main)


def test_malformed_requests_are_400_on_their_stream_only() -> None:
    """RFC 9113 8.1.1 over a real connection: nghttp2's own messaging checks are off
    (they would reset the stream), so a malformed request is our 400 on that stream
    and its neighbour is served."""
    from hpack import Decoder

    bad = literal([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
                   (b":authority", b"web.test"), (b"X-Upper", b"1")])
    frames = frame(HEADERS, END_STREAM | END_HEADERS, 1, bad) + frame(
        HEADERS, END_STREAM | END_HEADERS, 3, request_block()
    )

    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            writer.write(PREFACE + frame(SETTINGS, 0, 0) + frames)
            decoder, buffer = Decoder(), b""
            statuses: dict[int, int] = {}
            ended: set[int] = set()
            async with asyncio.timeout(5):
                while ended != {1, 3}:
                    chunk = await reader.read(65536)
                    assert chunk, "connection closed"
                    buffer += chunk
                    while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3]):
                        length = int.from_bytes(buffer[:3], "big")
                        kind, flags = buffer[3], buffer[4]
                        sid = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                        payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                        if kind == HEADERS:
                            fields = dict(decoder.decode(payload, raw=True))
                            statuses.setdefault(sid, int(fields[b":status"]))
                        if kind == RST_STREAM or (kind in (DATA, HEADERS) and flags & END_STREAM):
                            ended.add(sid)
            writer.close()
            assert statuses == {1: 400, 3: 200}

    run(main)


def test_abuse_counts_are_one_metric_family() -> None:
    """The counters reach the exporter as edgeproxy_http2_abuse_total{kind}."""
    from edgeproxy import metrics
    from edgeproxy.proxy.stats import ProxyCounters, ProxySnapshot

    counters = ProxyCounters()
    for kind in ("rapid_reset", "ping_flood", "rapid_reset"):
        counters.http2_abuse_seen(kind)
    snap = ProxySnapshot(
        responses={}, in_flight={}, queue_depth={}, retries={}, replays={},
        response_seconds={}, response_seconds_sum={}, backhaul={},
        http2_abuse=dict(counters.http2_abuse),
    )
    families = {spec.name: metrics._family(spec) for spec in metrics.METRICS}
    metrics.add_proxy(families, snap, metrics.StateLabels.of(None))
    samples = {
        s.labels["kind"]: s.value
        for s in families["edgeproxy_http2_abuse_total"].samples
        if s.name == "edgeproxy_http2_abuse_total"
    }
    assert samples == {"rapid_reset": 2, "ping_flood": 1}
