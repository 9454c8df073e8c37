"""The edge's fast lane over the backhaul (proxy/edgelane.py): plain bodiless
requests to machines behind a worker, served on callbacks, and every way such an
exchange can go wrong ending as the general path would end it (retry elsewhere,
replay, 502 for a non-idempotent request, 504, close), with no slot leaked.
Real sockets on loopback: test_proxy_support's lab, whose ams machines are behind
the ams worker."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct

from test_proxy_fastlane import RawMachine, in_place_of, lane_counts, settle
from test_proxy_interim import CHUNKED_WITH_TRAILERS, EARLY_HINTS, OK, _check_early_hints
from test_proxy_support import (
    FAST,
    VIP,
    WORKER_AMS,
    Lab,
    exchange_on,
    lab,
    raw_exchange,
    request,
    run,
)

AMS_1 = {"edgeproxy-force-machine": "web-ams-1"}
PREFER_AMS = {"edgeproxy-prefer-region": "ams"}


async def warm(L: Lab) -> None:
    """The edge's backhaul connection to the ams worker up, as the general path opens
    it (the lane never waits for a connection), without a request: no machine
    connection gets pooled on the worker."""
    await L.edge._backhaul._link(WORKER_AMS).get()


def test_plain_gets_to_remote_machines_ride_the_lane() -> None:
    async def main() -> None:
        async with lab() as L:
            await warm(L)
            before = lane_counts(L.edge)
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                for i in range(10):
                    r = await exchange_on(reader, writer, "GET", f"/k{i}", headers=AMS_1)
                    assert r.status == 200 and r.json()["machine"] == "web-ams-1"
                    seen = dict(r.json()["headers"])
                    # The machine's head is the general path's: our host, forwarding
                    # fields, no internal fields.
                    assert seen["host"] == "web.test" and "x-forwarded-for" in seen
                    assert seen["via"].endswith("edgeproxy") and "edgeproxy-request-id" in seen
                    assert "edgeproxy-target" not in seen and "edgeproxy-app" not in seen
                    assert r.headers["edgeproxy-request-id"] == seen["edgeproxy-request-id"]
            finally:
                writer.close()
            lane, general = lane_counts(L.edge)
            assert (lane - before[0], general - before[1]) == (10, 0)
            await settle(L.edge)
            assert L.edge.snapshot().responses[("web", 200)] == 10

    run(main)


def test_chunked_body_trailers_and_1xx_cross_the_edge_lane() -> None:
    async def main() -> None:
        async with lab() as L:
            await warm(L)
            before = lane_counts(L.edge)
            chunked = RawMachine(CHUNKED_WITH_TRAILERS, True)
            async with in_place_of(L.machines["web-ams-1"], chunked):
                out = await raw_exchange(
                    b"GET /t HTTP/1.1\r\nHost: web.test\r\nTE: trailers\r\n"
                    b"Edgeproxy-Force-Machine: web-ams-1\r\nConnection: close\r\n\r\n", L.port)
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
            assert body.startswith(b"5\r\nhello\r\n0\r\n")
            assert b"x-checksum: abc123" in body.lower() and b"x-drop" not in body.lower()
            async with in_place_of(L.machines["web-ams-1"], RawMachine(EARLY_HINTS + OK, True)):
                _check_early_hints(await raw_exchange(
                    b"GET /x HTTP/1.1\r\nHost: web.test\r\nEdgeproxy-Force-Machine: web-ams-1\r\n"
                    b"Connection: close\r\n\r\n", L.port))
            lane, general = lane_counts(L.edge)
            assert (lane - before[0], general - before[1]) == (2, 0)
            await settle(L.edge)

    run(main)


def test_head_and_no_content_answers_carry_no_body() -> None:
    async def main() -> None:
        async with lab() as L:
            await warm(L)
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                r = await exchange_on(reader, writer, "HEAD", "/h", headers=AMS_1)
                assert r.status == 200 and r.body == b""
                # The connection is still in step: the next answer is the next request's.
                r = await exchange_on(reader, writer, "GET", "/after", headers=AMS_1)
                assert r.status == 200 and r.json()["path"] == "/after"
            finally:
                writer.close()
            await settle(L.edge)

    run(main)


def test_worker_connect_failure_is_retried_on_another_machine() -> None:
    async def main() -> None:
        async with lab() as L:
            await warm(L)
            await L.machines["web-ord-1"].stop()
            await L.machines["web-ams-1"].stop()
            before = lane_counts(L.edge)
            retries = L.edge.snapshot().retries.get("web", 0)
            for i in range(6):
                r = await request("GET", f"/r{i}", L.port, headers=PREFER_AMS)
                assert r.status == 200 and r.json()["machine"] == "web-ams-2"
            lane, general = lane_counts(L.edge)
            # Requests that drew web-ams-1 got the worker's 502 connect on the lane and
            # went to the general path as a failed attempt, which retried elsewhere.
            assert L.edge.snapshot().retries.get("web", 0) - retries == general - before[1] > 0
            assert lane > before[0]
            await settle(L.edge)

    run(main)


def test_reset_before_the_answer_retries_a_get_but_not_a_post() -> None:
    async def main() -> None:
        async with lab() as L:
            await warm(L)
            # web-ams-1 reads the request, then closes without a byte of an answer:
            # the worker answers 502 "reset".
            async with in_place_of(L.machines["web-ams-1"], RawMachine(b"", True)):
                r = await request("GET", "/g", L.port, headers=AMS_1)
                # Forced to the one machine: the general path's retry finds no other.
                assert r.status == 502
                before = lane_counts(L.edge)
                r = await request("POST", "/p", L.port, headers=AMS_1)
                assert r.status == 502
                assert "after the request was sent" in r.body.decode()
                lane, general = lane_counts(L.edge)
                assert (lane - before[0], general - before[1]) == (1, 0)  # never resent
            await settle(L.edge)

    run(main)


def test_replay_from_a_remote_machine_goes_where_it_says() -> None:
    async def main() -> None:
        async with lab() as L:
            await warm(L)
            L.machines["web-ams-1"].replay = "region=syd"
            r = await request("GET", "/r", L.port, headers=AMS_1)
            assert r.status == 200 and r.json()["machine"] == "web-syd-1"
            seen = dict(r.json()["headers"])
            assert seen["edgeproxy-replay-source"] == "web-ams-1"
            assert L.edge.snapshot().replays["web"] == 1
            # One request, one id: the one the first machine saw, the replay, the client.
            first = dict(L.machines["web-ams-1"].requests[-1]["headers"])
            assert first["edgeproxy-request-id"] == seen["edgeproxy-request-id"]
            assert r.headers["edgeproxy-request-id"] == seen["edgeproxy-request-id"]
            await settle(L.edge)

    run(main)


def test_no_answer_in_time_is_504_and_a_stalled_client_holds_no_slot() -> None:
    async def main() -> None:
        settings = dataclasses.replace(FAST, response_timeout=0.4)
        async with lab(settings) as L:
            await warm(L)
            L.machines["web-ams-1"].delay = 2.0
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                slow = await exchange_on(reader, writer, "GET", "/slow", headers=AMS_1)
                assert slow.status == 504
                L.machines["web-ams-1"].delay = 0.0
                fast = await exchange_on(reader, writer, "GET", "/fast", headers=AMS_1)
                assert fast.status == 200
            finally:
                writer.close()
            await settle(L.edge)
            # A client that resets its connection while its answer is on the way gives
            # its slot back at once (a half-close would still get the answer).
            L.machines["web-ams-1"].delay = 1.5
            reader, writer = await asyncio.open_connection(VIP, L.port)
            writer.write(b"GET /gone HTTP/1.1\r\nHost: web.test\r\n"
                         b"Edgeproxy-Force-Machine: web-ams-1\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            assert L.edge.snapshot().in_flight
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            await settle(L.edge)  # within 1 s: before the machine answers

    run(main)


def test_a_remote_machine_failing_mid_response_is_counted_once() -> None:
    async def main() -> None:
        async with lab() as L:
            await warm(L)
            cut = RawMachine(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True)
            async with in_place_of(L.machines["web-ams-1"], cut):
                out = await raw_exchange(
                    b"GET /cut HTTP/1.1\r\nHost: web.test\r\n"
                    b"Edgeproxy-Force-Machine: web-ams-1\r\n\r\n", L.port)
            assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\nabc"), out
            await settle(L.edge)
            assert L.edge.snapshot().responses[("web", 200)] == 1
            assert lane_counts(L.edge) == (1, 0)

    run(main)
