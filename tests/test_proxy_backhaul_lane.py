"""The worker's fast lane (proxy/workerlane.py): plain backhaul streams served on
callbacks, no task. Loopback lab (test_proxy_support): through the edge, and with
a backhaul client of our own straight to the worker for its error answers and its
flow control."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from edgeproxy.proxy import HttpProxy
from edgeproxy.proxy.h2session import SEND_BUFFER, H2Session, H2Stream
from edgeproxy.proxy.workerlane import StreamExchange
from test_proxy_fastlane import RawMachine, in_place_of
from test_proxy_interim import CHUNKED_WITH_TRAILERS, EARLY_HINTS, FORCE_AMS, OK, _check_early_hints
from test_proxy_support import EDGE, FAST, WORKER_AMS, Lab, lab, raw_exchange, request, run

AMS = {"edgeproxy-force-machine": "web-ams-1"}


def counts(worker: HttpProxy) -> tuple[int, int]:
    snap = worker.snapshot()
    return snap.backhaul_lane_requests, snap.backhaul_general_requests


@contextlib.asynccontextmanager
async def backhaul_client(L: Lab, window: int = 1024 * 1024) -> AsyncIterator[H2Session]:
    """An h2c connection to the ams worker from the edge's address, as an edge opens it."""
    reader, writer = await asyncio.open_connection(
        WORKER_AMS, L.workers[0].backhaul_port, local_addr=(EDGE, 0)
    )
    session = H2Session(reader, writer, client_side=True, stream_window=window)
    session.start()
    task = asyncio.get_running_loop().create_task(session.run())
    try:
        yield session
    finally:
        session.close()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def get(session: H2Session, L: Lab, path: str, machine: str = "web-ams-1") -> H2Stream:
    m = L.machines[machine]
    return await session.open_stream(
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"web.test"),
            (b":path", path.encode()),
            (b"edgeproxy-target", f"{m.address}:{m.port}".encode()),
            (b"edgeproxy-app", b"web"),
        ],
        end_stream=True,
    )


async def head_of(stream: H2Stream) -> dict[bytes, bytes]:
    return dict(await asyncio.wait_for(stream.headers, 5))


def test_plain_backhaul_requests_are_served_without_a_task_on_one_connection() -> None:
    async def main() -> None:
        async with lab() as L:
            worker, machine = L.workers[0], L.machines["web-ams-1"]
            for i in range(5):
                r = await request("GET", f"/p{i}", L.port, headers=AMS)
                assert r.status == 200 and r.json()["machine"] == "web-ams-1"
                seen = dict(r.json()["headers"])
                # The machine's head is the task path's: no internal fields, our host.
                assert "edgeproxy-target" not in seen and "edgeproxy-app" not in seen
                assert seen["host"] == "web.test" and "x-forwarded-for" in seen
            assert counts(worker) == (5, 0)
            assert machine.connections == 1  # keep-alive: one pooled machine connection
            # A request with a body keeps the task path.
            r = await request("POST", "/b", L.port, headers=AMS, body=b"abc")
            assert r.status == 200 and r.json()["body_size"] == 3
            assert counts(worker) == (5, 1)

    run(main)


def test_1xx_and_trailers_still_cross_the_backhaul_lane() -> None:
    async def main() -> None:
        async with lab() as L:
            worker = L.workers[0]
            async with in_place_of(L.machines["web-ams-1"], RawMachine(EARLY_HINTS + OK, False)):
                get_ = b"GET /x HTTP/1.1\r\nHost: web.test\r\n%bConnection: close\r\n\r\n"
                _check_early_hints(await raw_exchange(get_ % FORCE_AMS, L.port))
            assert counts(worker) == (1, 0)
            async with in_place_of(
                L.machines["web-ams-2"], RawMachine(CHUNKED_WITH_TRAILERS, False)
            ), backhaul_client(L) as session:
                stream = await get(session, L, "/t", "web-ams-2")
                head = await head_of(stream)
                assert head[b":status"] == b"200"
                body = b""
                while chunk := await asyncio.wait_for(stream.read(), 5):
                    body += chunk
                assert body == b"hello"
                assert dict(stream.trailers) == {b"x-checksum": b"abc123"}
            assert counts(worker) == (2, 0)

    run(main)


def test_machine_connect_failure_is_502_connect() -> None:
    async def main() -> None:
        async with lab() as L:
            await L.machines["web-ams-1"].stop()
            async with backhaul_client(L) as session:
                head = await head_of(await get(session, L, "/down"))
            assert head[b":status"] == b"502"
            assert head[b"edgeproxy-upstream-error"] == b"connect"
            assert counts(L.workers[0]) == (1, 0)

    run(main)


def test_no_response_head_in_time_is_504_timeout() -> None:
    async def main() -> None:
        settings = dataclasses.replace(FAST, response_timeout=0.4)
        async with lab(settings) as L:
            L.machines["web-ams-1"].delay = 3.0
            loop = asyncio.get_running_loop()
            async with backhaul_client(L) as session:
                started = loop.time()
                head = await head_of(await get(session, L, "/slow"))
                took = loop.time() - started
            assert head[b":status"] == b"504"
            assert head[b"edgeproxy-upstream-error"] == b"timeout"
            assert 0.35 < took < 1.5, took  # the sweeper: at most a tick late
            assert counts(L.workers[0]) == (1, 0)
            assert not L.workers[0]._lane.watched

    run(main)


def test_a_stream_that_does_not_read_stops_the_machine_being_read() -> None:
    async def main() -> None:
        size = 24 * 1024 * 1024
        window = 64 * 1024
        async with lab() as L:
            worker = L.workers[0]
            async with backhaul_client(L, window=window) as session:
                stream = await get(session, L, f"/download?n={size}")
                assert (await head_of(stream))[b":status"] == b"200"
                await asyncio.sleep(1.5)  # nothing read: the stream window stays shut
                exchanges = [x for x in worker._lane.watched if isinstance(x, StreamExchange)]
                assert len(exchanges) == 1
                x = exchanges[0]
                pending = x.stream.session.engine.pending(x.stream.stream_id)
                # At most SEND_BUFFER queued, plus the one socket read that crossed it
                # (uvloop reads up to 256 KiB); far below the 1 MiB backhaul window.
                assert x.blocked and x.upstream is not None and x.upstream.paused
                assert pending <= SEND_BUFFER + 256 * 1024, pending
                got = 0
                while chunk := await asyncio.wait_for(stream.read(), 10):
                    got += len(chunk)
                assert got == size
            assert counts(worker) == (1, 0)

    run(main, timeout=60)
