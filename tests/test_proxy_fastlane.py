"""The HTTP/1.1 fast lane (proxy/fastlane.py): which requests it serves itself,
and that every way an exchange can go wrong ends as the general path would end it
(retry elsewhere, replay, 504, 408, close), with no slot or connection leaked.
Real sockets on loopback: the edge of test_proxy_support's lab, whose web-ord-1
machine is on the edge's own host (the lane's case)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from edgeproxy.proxy.server import HttpProxy
from test_proxy_support import (
    FAST,
    VIP,
    Machine,
    exchange_on,
    lab,
    raw_exchange,
    request,
    run,
)


def lane_counts(edge: HttpProxy) -> tuple[int, int]:
    lane = edge._lane
    return lane.lane_requests, lane.general_requests


async def settle(edge: HttpProxy) -> None:
    """Let callbacks that finish an exchange run, then check nothing is held."""
    for _ in range(50):
        if not edge.snapshot().in_flight:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"slots still held: {edge.snapshot().in_flight}")


def test_keep_alive_gets_stay_on_the_lane_and_reuse_one_machine_connection() -> None:
    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                for i in range(20):
                    r = await exchange_on(reader, writer, "GET", f"/k{i}")
                    assert r.status == 200 and r.json()["path"] == f"/k{i}"
                    assert r.json()["machine"] == "web-ord-1"
            finally:
                writer.close()
            assert lane_counts(L.edge) == (20, 0)
            assert L.machines["web-ord-1"].connections == 1
            await settle(L.edge)
            assert L.edge.snapshot().responses[("web", 200)] == 20

    run(main)


def test_pipelined_requests_answered_in_order_with_a_body_in_between() -> None:
    async def main() -> None:
        async with lab() as L:
            batch = (
                b"GET /one HTTP/1.1\r\nHost: web.test\r\n\r\n"
                b"POST /two HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\n\r\nabc"
                b"GET /three HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n"
            )
            out = await raw_exchange(batch, L.port)
            paths = [p.decode() for p in out.split(b'"path": "')[1:]]
            assert [p.split('"')[0] for p in paths] == ["/one", "/two", "/three"], out[:400]
            assert out.count(b"HTTP/1.1 200 OK") == 3
            # The POST's small Content-Length body came with its head: it rides the
            # lane too (tests/test_proxy_lane_bodies.py).
            assert lane_counts(L.edge) == (3, 0)
            await settle(L.edge)

    run(main)


def test_pipelined_requests_answered_in_order_with_a_chunked_body_in_between() -> None:
    async def main() -> None:
        async with lab() as L:
            batch = (
                b"GET /one HTTP/1.1\r\nHost: web.test\r\n\r\n"
                b"POST /two HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"
                b"GET /three HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n"
            )
            out = await raw_exchange(batch, L.port)
            paths = [p.decode() for p in out.split(b'"path": "')[1:]]
            assert [p.split('"')[0] for p in paths] == ["/one", "/two", "/three"], out[:400]
            assert out.count(b"HTTP/1.1 200 OK") == 3
            # GETs on the lane, the chunked POST on the general path, then back.
            assert lane_counts(L.edge) == (2, 1)
            await settle(L.edge)

    run(main)


def test_pooled_connection_closed_by_the_machine_is_resent_on_a_fresh_one() -> None:
    async def main() -> None:
        async with lab() as L:
            # Answers the first request of each connection; closes at the second
            # without answering: the keep-alive race, every time.
            raw = RawMachine(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False, 1)
            async with in_place_of(L.machines["web-ord-1"], raw):
                for path in ("/a", "/b", "/c"):
                    r = await request("GET", path, L.port)
                    assert r.status == 200 and r.body == b"ok", (path, r.body[:300])
                assert raw.connections == 3
                assert L.edge.snapshot().retries.get("web", 0) == 0  # same machine, no retry
                assert lane_counts(L.edge) == (3, 0)
                await settle(L.edge)

    run(main)


def test_machine_down_goes_to_the_general_path_which_retries_elsewhere() -> None:
    async def main() -> None:
        async with lab() as L:
            await L.machines["web-ord-1"].stop()
            r = await request("GET", "/x", L.port)
            assert r.status == 200 and r.json()["machine"] in ("web-ams-1", "web-ams-2")
            assert L.edge.snapshot().retries["web"] == 1
            assert lane_counts(L.edge) == (1, 1)
            await settle(L.edge)

    run(main)


def test_replay_asked_by_a_lane_machine_is_sent_where_it_says() -> None:
    async def main() -> None:
        async with lab() as L:
            L.machines["web-ord-1"].replay = "region=syd"
            r = await request("GET", "/r", L.port)
            assert r.status == 200 and r.json()["machine"] == "web-syd-1"
            seen = dict(r.json()["headers"])
            assert seen["edgeproxy-replay-source"] == "web-ord-1"
            assert "edgeproxy-replay" not in r.headers
            assert L.edge.snapshot().replays["web"] == 1
            # One request, one id: the one the first machine saw, the replay, the client.
            first = dict(L.machines["web-ord-1"].requests[-1]["headers"])
            assert first["edgeproxy-request-id"] == seen["edgeproxy-request-id"]
            assert r.headers["edgeproxy-request-id"] == seen["edgeproxy-request-id"]
            await settle(L.edge)

    run(main)


def test_no_response_head_in_time_is_504_and_the_connection_carries_on() -> None:
    async def main() -> None:
        settings = dataclasses.replace(FAST, response_timeout=0.3)
        async with lab(settings) as L:
            machine = L.machines["web-ord-1"]
            machine.delay = 1.0
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                slow = await exchange_on(reader, writer, "GET", "/slow")
                assert slow.status == 504 and "edgeproxy-request-id" in slow.headers
                machine.delay = 0.0
                fast = await exchange_on(reader, writer, "GET", "/fast")
                assert fast.status == 200
            finally:
                writer.close()
            assert L.edge.snapshot().responses[("web", 504)] == 1
            await settle(L.edge)

    run(main)


def test_slow_head_gets_408_and_idle_connection_is_closed() -> None:
    async def main() -> None:
        settings = dataclasses.replace(FAST, header_timeout=0.3, idle_timeout=0.4)
        async with lab(settings) as L:
            out = await raw_exchange(b"GET / HTTP/1.1\r\nHost: web", L.port, timeout=3.0)
            assert out.startswith(b"HTTP/1.1 408 "), out[:200]
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                r = await exchange_on(reader, writer, "GET", "/then-idle")
                assert r.status == 200
                assert await asyncio.wait_for(reader.read(100), 3.0) == b""  # closed by us
            finally:
                writer.close()

    run(main)


def test_client_leaving_mid_exchange_frees_its_slot() -> None:
    async def main() -> None:
        async with lab() as L:
            L.machines["web-ord-1"].delay = 0.5
            _, writer = await asyncio.open_connection(VIP, L.port)
            writer.write(b"GET /gone HTTP/1.1\r\nHost: web.test\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            assert L.edge.snapshot().in_flight == {("web", "web-ord-1"): 1}
            writer.close()
            await settle(L.edge)
            L.machines["web-ord-1"].delay = 0.0
            assert (await request("GET", "/after", L.port)).status == 200

    run(main)


def test_large_download_streams_through_the_lane() -> None:
    async def main() -> None:
        async with lab() as L:
            n = 30 * 1024 * 1024
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                writer.write(f"GET /download?n={n} HTTP/1.1\r\nHost: web.test\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ") and f"content-length: {n}".encode() in head
                got = 0
                while got < n:
                    chunk = await asyncio.wait_for(reader.read(1 << 20), 5.0)
                    assert chunk
                    got += len(chunk)
                    if got < n // 2:
                        await asyncio.sleep(0.001)  # a slow reader: flow control must hold
                assert got == n
            finally:
                writer.close()
            assert lane_counts(L.edge) == (1, 0)
            await settle(L.edge)

    run(main)


@contextlib.asynccontextmanager
async def in_place_of(machine: Machine, raw: RawMachine) -> AsyncIterator[RawMachine]:
    """Stop the fixture machine and answer on its address with canned bytes."""
    await machine.stop()
    server = await asyncio.start_server(raw.serve, machine.address, machine.port)
    try:
        yield raw
    finally:
        server.close()


class RawMachine:
    """Answers each request with canned bytes: chunked, close-delimited, garbage."""

    def __init__(self, answer: bytes, close: bool, per_connection: int = 0) -> None:
        self.answer = answer
        self.close = close
        self.per_connection = per_connection  # close unanswered after this many (0: never)
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                if self.per_connection and answered == self.per_connection:
                    break
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)  # a request body: read, dropped
                writer.write(self.answer)
                await writer.drain()
                answered += 1
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_chunked_and_close_delimited_responses_are_reframed_for_the_client() -> None:
    async def main() -> None:
        cases = [
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
             False, b"hello"),
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", True, b"until the end"),
        ]
        for answer, close, body in cases:
            async with lab() as L, in_place_of(L.machines["web-ord-1"], RawMachine(answer, close)):
                reader, writer = await asyncio.open_connection(VIP, L.port)
                try:
                    r = await exchange_on(reader, writer, "GET", "/c")
                    assert r.status == 200 and r.body == body
                    assert r.headers.get("transfer-encoding") == "chunked"
                    again = await exchange_on(reader, writer, "GET", "/c2")
                    assert again.status == 200 and again.body == body
                finally:
                    writer.close()
                assert lane_counts(L.edge) == (2, 0)
                await settle(L.edge)

    run(main)


def test_garbage_from_the_machine_before_its_head_is_retried_elsewhere() -> None:
    async def main() -> None:
        async with lab() as L:
            raw = RawMachine(b"NOT HTTP AT ALL\r\n\r\n", True)
            async with in_place_of(L.machines["web-ord-1"], raw):
                r = await request("GET", "/g", L.port)
                assert r.status == 200 and r.json()["region"] == "ams"
                assert L.edge.snapshot().retries["web"] == 1
                await settle(L.edge)

    run(main)


def test_head_and_http10_keep_alive_on_the_lane() -> None:
    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                writer.write(b"HEAD /h HTTP/1.1\r\nHost: web.test\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: " in head
                # HTTP/1.0 with keep-alive: the answer says so and the connection stays.
                writer.write(
                    b"GET /ten HTTP/1.0\r\nHost: web.test\r\nConnection: keep-alive\r\n\r\n"
                )
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ") and b"connection: keep-alive" in head
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await asyncio.wait_for(reader.readexactly(length), 5)
                assert b'"path": "/ten"' in body
                # HTTP/1.0 without keep-alive: answered, then closed.
                writer.write(b"GET /last HTTP/1.0\r\nHost: web.test\r\n\r\n")
                rest = await asyncio.wait_for(reader.read(), 5)
                assert rest.startswith(b"HTTP/1.1 200 ") and b"connection: close" in rest
                assert b'"path": "/last"' in rest
            finally:
                writer.close()
            assert lane_counts(L.edge) == (3, 0)
            await settle(L.edge)

    run(main)


def test_a_machine_failing_mid_response_is_counted_once() -> None:
    """Part of the answer went out, then the machine closed: the client connection
    is closed, and the request counted and its slot given back once (the
    connection's loss afterwards finds no exchange)."""

    async def main() -> None:
        async with lab() as L:
            cut = RawMachine(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True)
            async with in_place_of(L.machines["web-ord-1"], cut):
                out = await raw_exchange(
                    b"GET /cut HTTP/1.1\r\nHost: web.test\r\n"
                    b"Edgeproxy-Force-Machine: web-ord-1\r\n\r\n", L.port)
            assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\nabc"), out
            await settle(L.edge)
            assert L.edge.snapshot().responses[("web", 200)] == 1
            assert lane_counts(L.edge) == (1, 0)

    run(main)
