"""Requests with a small Content-Length body on the fast lane (proxy/fastlane.py):
the body travels with the head in one write, framed by the edge (one
Content-Length, the client's dropped), and every way the exchange can fail ends as
the general path ends it: a request the machine may have acted on is never sent
twice. Real sockets on loopback, the lab of test_proxy_support."""

from __future__ import annotations

import asyncio
import hashlib

from edgeproxy.proxy.fastlane import LANE_BODY
from test_proxy_fastlane import RawMachine, in_place_of, lane_counts, settle
from test_proxy_support import VIP, lab, raw_exchange, request, run


def _post(body: bytes, path: str = "/p", method: bytes = b"POST") -> bytes:
    return (
        b"%b %b HTTP/1.1\r\nHost: web.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
        % (method, path.encode(), len(body), body)
    )


def test_small_post_rides_the_lane_with_one_content_length() -> None:
    async def main() -> None:
        async with lab() as L:
            body = bytes(range(256)) * 16  # 4 KiB, every byte value
            r = await request("POST", "/up", L.port, body=body)
            assert r.status == 200
            seen = r.json()
            assert seen["machine"] == "web-ord-1" and seen["method"] == "POST"
            assert seen["body_size"] == len(body)
            assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
            lengths = [v for n, v in seen["headers"] if n == "content-length"]
            assert lengths == [str(len(body))], seen["headers"]
            assert lane_counts(L.edge) == (1, 0)
            await settle(L.edge)

    run(main)


def test_bodies_too_big_or_still_arriving_take_the_general_path() -> None:
    async def main() -> None:
        async with lab() as L:
            big = b"x" * (LANE_BODY + 1)
            r = await request("POST", "/big", L.port, body=big)
            assert r.status == 200 and r.json()["body_size"] == len(big)
            assert lane_counts(L.edge) == (0, 1)
            # The head first, the body a moment later: the general path reads it.
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                raw = _post(b"late body")
                head_end = raw.index(b"\r\n\r\n") + 4
                writer.write(raw[:head_end])
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(raw[head_end:])
                out = await asyncio.wait_for(reader.read(65536), 5)
                while b'"body_sha256"' not in out:
                    more = await asyncio.wait_for(reader.read(65536), 5)
                    assert more, out
                    out += more
            finally:
                writer.close()
            assert out.startswith(b"HTTP/1.1 200 ")
            assert hashlib.sha256(b"late body").hexdigest().encode() in out
            assert lane_counts(L.edge) == (0, 2)
            await settle(L.edge)

    run(main)


def test_post_is_never_resent_after_the_machine_failed_with_it() -> None:
    """The machine reads the POST and closes without answering: the edge answers
    502 and no other machine sees the request (it may have been acted on)."""

    async def main() -> None:
        async with lab() as L, in_place_of(L.machines["web-ord-1"], RawMachine(b"", True)) as raw:
            out = await raw_exchange(_post(b"pay once"), L.port)
            assert out.startswith(b"HTTP/1.1 502 "), out[:200]
            assert raw.connections == 1
            others = [m for mid, m in L.machines.items() if mid != "web-ord-1"]
            assert all(not m.requests for m in others), [m.requests for m in others]
            assert L.edge.snapshot().responses[("web", 502)] == 1
            await settle(L.edge)

    run(main)


def test_idempotent_request_with_a_body_is_retried_elsewhere_with_its_body() -> None:
    """The same failure for a PUT (idempotent): retried on another machine by the
    general path, which gets the whole body again."""

    async def main() -> None:
        async with lab() as L, in_place_of(L.machines["web-ord-1"], RawMachine(b"", True)):
            out = await raw_exchange(_post(b"put twice is fine", "/put", b"PUT"), L.port)
            assert out.startswith(b"HTTP/1.1 200 "), out[:300]
            assert hashlib.sha256(b"put twice is fine").hexdigest().encode() in out
            assert b'"machine": "web-ams-' in out
            assert L.edge.snapshot().retries.get("web") == 1
            await settle(L.edge)

    run(main)


def test_replay_directive_resends_the_body_where_the_machine_said() -> None:
    async def main() -> None:
        async with lab() as L:
            L.machines["web-ord-1"].replay = "region=ams"
            body = b"write me in ams"
            r = await request("POST", "/write", L.port, body=body)
            assert r.status == 200
            seen = r.json()
            assert seen["region"] == "ams" and seen["body_size"] == len(body)
            assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
            await settle(L.edge)

    run(main)
