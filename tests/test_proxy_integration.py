"""Edge + worker proxies + fixture machines on loopback, driven by real clients."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
from ipaddress import IPv4Address

import pytest
import websockets.asyncio.client

from edgeproxy import placement
from edgeproxy.proxy.admission import Admission
from edgeproxy.routing import Backend
from test_proxy_support import (
    FAST,
    SMUGGLE_SHAPES,
    VIP,
    WORKER_AMS,
    exchange_on,
    lab,
    raw_exchange,
    request,
    run,
    table,
)


def seen_headers(resp_json: dict[str, object]) -> dict[str, str]:
    return {n: v for n, v in resp_json["headers"]}  # type: ignore[attr-defined]


def test_get_and_post_direct_and_over_backhaul() -> None:
    async def main() -> None:
        async with lab() as L:
            local = await request(
                "GET",
                "/a?x=1",
                L.port,
                headers={
                    "edgeproxy-client-ip": "6.6.6.6",
                    "x-forwarded-for": "10.9.9.9",
                    "connection": "x-drop",
                    "x-drop": "1",
                },
            )
            assert local.status == 200 and local.json()["machine"] == "web-ord-1"
            seen = seen_headers(local.json())
            assert seen["edgeproxy-client-ip"] == "127.0.0.1"
            assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
            assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-port"] == str(L.port)
            assert seen["via"] == "1.1 edgeproxy" and seen["edgeproxy-edge-region"] == "ord"
            assert seen["edgeproxy-request-id"] == local.headers["edgeproxy-request-id"]
            assert "x-drop" not in seen and local.json()["path"] == "/a"
            remote = await request(
                "POST", "/b", L.port, body=b"z" * 300_000, headers={"edgeproxy-force-region": "ams"}
            )
            body = remote.json()
            assert remote.status == 200 and body["region"] == "ams" and body["body_size"] == 300_000
            seen = seen_headers(body)
            assert "edgeproxy-target" not in seen and "edgeproxy-app" not in seen
            assert seen["edgeproxy-request-id"] == remote.headers["edgeproxy-request-id"]
            assert seen["host"] == "web.test"
            health = L.edge.snapshot().backhaul["127.0.0.3"]
            assert health.state == "up" and health.connects == 1
            stats = L.edge.snapshot().responses
            assert stats[("web", 200)] == 2

    run(main)


def test_keep_alive_pipelining_and_pool_reuse() -> None:
    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            try:
                for i in range(5):
                    r = await exchange_on(
                        reader,
                        writer,
                        "GET",
                        f"/k{i}",
                        headers={"edgeproxy-force-machine": "web-ams-1"},
                    )
                    assert r.status == 200
                    # h11 client cycle per request on the same socket
            except Exception:
                raise
            finally:
                writer.close()
            # Pipelined: two requests in one write, answered in order.
            raw = await raw_exchange(
                b"GET /p1 HTTP/1.1\r\nHost: web.test\r\n\r\n"
                b"GET /p2 HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
                L.port,
            )
            assert raw.count(b"HTTP/1.1 200") == 2 and raw.index(b'"/p1"') < raw.index(b'"/p2"')
            assert (
                L.machines["web-ord-1"].connections == 1
            )  # the machine pool reused one connection

    run(main)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")
def test_h2c_prior_knowledge_with_h2load() -> None:
    async def main() -> None:
        async with lab() as L:
            proc = await asyncio.create_subprocess_exec(
                "h2load",
                "-n",
                "200",
                "-c",
                "2",
                "-m",
                "10",
                "-H",
                "edgeproxy-force-region: ams",
                f"http://{VIP}:{L.port}/h2",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
            text = out.decode()
            assert "200 succeeded, 0 failed, 0 errored" in text, text
            assert "status codes: 200 2xx" in text, text
            assert sum(len(m.requests) for k, m in L.machines.items() if "ams" in k) == 200

    run(main)


def test_retry_when_machines_are_down() -> None:
    async def main() -> None:
        async with lab() as L:
            await L.machines["web-ord-1"].stop()  # the local machine
            await L.machines["web-ams-1"].stop()  # one of the remote ones
            results = await asyncio.gather(*(request("GET", f"/r{i}", L.port) for i in range(40)))
            assert [r.status for r in results] == [200] * 40
            assert {r.json()["machine"] for r in results} <= {"web-ams-2"}
            assert L.edge.snapshot().retries["web"] >= 40

    run(main)


def test_errors_503_502_504_with_request_id() -> None:
    async def main() -> None:
        slow = dataclasses.replace(FAST, response_timeout=0.5)
        async with lab(slow, extra_apps=True) as L:  # shared address: Host decides
            r = await request("GET", "/", L.port, headers={"edgeproxy-force-region": "fra"})
            assert r.status == 503 and r.headers["edgeproxy-request-id"]
            await L.machines["web-syd-1"].stop()
            r = await request("GET", "/", L.port, headers={"edgeproxy-force-region": "syd"})
            assert r.status == 502 and r.headers["edgeproxy-request-id"]
            L.machines["web-ams-1"].delay = 2.0
            r = await request("GET", "/", L.port, headers={"edgeproxy-force-machine": "web-ams-1"})
            assert r.status == 504 and r.headers["edgeproxy-request-id"]
            r = await request("GET", "/", L.port, host_header="nope.test")
            assert r.status == 404 and r.headers["edgeproxy-request-id"]

    run(main)


def test_replay_to_another_region() -> None:
    async def main() -> None:
        async with lab() as L:
            L.machines["web-ord-1"].replay = "region=syd"
            r = await request("POST", "/write", L.port, body=b"payload" * 1000)
            assert r.status == 200 and r.json()["machine"] == "web-syd-1"
            assert r.json()["body_size"] == 7000
            assert seen_headers(r.json())["edgeproxy-replay-source"] == "web-ord-1"
            assert "edgeproxy-replay" not in r.headers
            assert len(L.machines["web-ord-1"].requests) == 1
            L.machines["web-ord-1"].replay = "elsewhere"
            r = await request("GET", "/read", L.port)
            assert r.json()["machine"] in ("web-ams-1", "web-ams-2")
            assert L.edge.snapshot().replays["web"] == 2

    run(main)


def test_websocket_echo_through_backhaul() -> None:
    async def main() -> None:
        async with lab() as L:
            uri = f"ws://{VIP}:{L.port}/ws"
            async with websockets.asyncio.client.connect(
                uri, additional_headers={"edgeproxy-force-region": "ams"}, open_timeout=5
            ) as ws:
                for i in range(1000):
                    message = f"message {i} " + "x" * (i % 50)
                    await ws.send(message)
                    assert await asyncio.wait_for(ws.recv(), 5) == message
                await ws.send(b"\x00\x01binary")
                assert await ws.recv() == b"\x00\x01binary"
            assert sum(len(m.requests) for k, m in L.machines.items() if "ams" in k) == 1

    run(main)


@pytest.mark.parametrize("name", sorted(SMUGGLE_SHAPES))
def test_smuggling_shape_gets_4xx_and_reaches_no_machine(name: str) -> None:
    data, status = SMUGGLE_SHAPES[name]

    async def main() -> None:
        async with lab() as L:
            raw = await raw_exchange(data, L.port)
            assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:200]
            assert b"edgeproxy-request-id: " in raw and b"connection: close" in raw
            assert not raw.endswith(b"<timeout>")  # closed by the proxy
            assert all(not m.requests for m in L.machines.values())

    run(main)


def test_isolation_flood_gets_503_web_unaffected() -> None:
    async def main() -> None:
        async with lab(extra_apps=True) as L:

            async def flood() -> int:
                return (await request("GET", "/f", L.port, host_header="flood.test")).status

            async def web() -> int:
                r = await request("GET", "/w", L.port)
                return r.status

            flood_tasks = [asyncio.ensure_future(flood()) for _ in range(40)]
            await asyncio.sleep(0.05)
            web_statuses = []
            for _ in range(30):
                web_statuses.append(await web())
            flood_statuses = await asyncio.gather(*flood_tasks)
            assert web_statuses == [200] * 30
            assert flood_statuses.count(503) >= 25 and flood_statuses.count(200) >= 3
            snap = L.edge.snapshot()
            assert snap.responses[("flood", 503)] == flood_statuses.count(503)
            r = await request("GET", "/f", L.port, host_header="flood.test")
            assert r.status == 200

    run(main)


def test_overloaded_app_answers_retry_after() -> None:
    async def main() -> None:
        async with lab(extra_apps=True) as L:
            results = await asyncio.gather(
                *(request("GET", "/f", L.port, host_header="flood.test") for _ in range(12))
            )
            refused = [r for r in results if r.status == 503]
            assert refused and all(r.headers.get("retry-after") == "1" for r in refused)

    run(main)


def test_slowloris_header_timeout_closes() -> None:
    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            started = asyncio.get_running_loop().time()
            writer.write(b"GET / HTTP/1.1\r\nHost: web.test\r\n")
            answer = asyncio.ensure_future(reader.read(65536))
            for _ in range(30):  # trickle a header byte every 0.1 s until the proxy answers
                if answer.done():
                    break
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.1)
            data = await asyncio.wait_for(answer, 3)
            elapsed = asyncio.get_running_loop().time() - started
            assert data.startswith(b"HTTP/1.1 408"), data
            assert elapsed < FAST.header_timeout + 1.5
            assert await asyncio.wait_for(reader.read(65536), 3) == b""
            writer.close()

    run(main)


def test_backhaul_refuses_connections_from_non_edges() -> None:
    async def main() -> None:
        async with lab() as L:
            worker = L.workers[0]
            port = worker.backhaul_port
            # from an address that is no edge's: closed before any HTTP/2 byte
            reader, writer = await asyncio.open_connection(
                WORKER_AMS, port, local_addr=("127.0.0.9", 0)
            )
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            # EOF, or a reset when the close found our bytes unread
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(100), 3) == b""
            writer.close()
            assert worker.snapshot().backhaul_refused == 1
            # the edge (connecting from its host address) is served as before
            r = await request("GET", "/x", L.port, headers={"edgeproxy-force-region": "ams"})
            assert r.status == 200 and r.json()["region"] == "ams"
            assert worker.snapshot().backhaul_refused == 1

    run(main)


def test_backhaul_worker_down_then_back() -> None:
    async def main() -> None:
        async with lab() as L:
            await L.machines["web-ord-1"].stop()
            ams = L.workers[0]
            assert (await request("GET", "/", L.port)).json()["region"] == "ams"
            await ams.stop()
            # Worker gone: every request still succeeds, on syd (the next tier).
            results = [await request("GET", f"/d{i}", L.port) for i in range(10)]
            assert [r.status for r in results] == [200] * 10, results[0].body
            assert [r.json()["region"] for r in results] == ["syd"] * 10
            assert L.edge.snapshot().backhaul["127.0.0.3"].state in ("down", "idle")
            await ams.start()  # the same worker comes back: the edge reconnects after backoff
            for _ in range(50):
                r = await request("GET", "/", L.port, headers={"edgeproxy-force-region": "ams"})
                if r.status == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status == 200 and L.edge.snapshot().backhaul["127.0.0.3"].connects == 2

    run(main)


def test_h2c_host_header_differing_from_authority_fails_only_its_stream() -> None:
    """h2load -H "host: web.test" sends :authority from the URL plus a Host field.
    RFC 9113 8.3.1: that request is malformed -> 400 on its stream; the connection
    and its other streams are unaffected (h2 used to fail the whole connection)."""
    import h2.config
    import h2.connection
    import h2.events

    async def main() -> None:
        async with lab() as L:
            reader, writer = await asyncio.open_connection(VIP, L.port)
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(
                    client_side=True, header_encoding=None, validate_outbound_headers=False
                )
            )
            conn.initiate_connection()
            base = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x")]
            conn.send_headers(
                1, [*base, (b":authority", b"10.0.0.1"), (b"host", b"web.test")], end_stream=True
            )
            conn.send_headers(3, [*base, (b":authority", b"web.test")], end_stream=True)
            conn.send_headers(5, [*base, (b"host", b"web.test")], end_stream=True)
            writer.write(conn.data_to_send())
            statuses: dict[int, int] = {}
            ended: set[int] = set()
            while len(ended) < 3:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "connection closed"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                    if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        ended.add(event.stream_id)
                writer.write(conn.data_to_send())
            writer.close()
            assert statuses == {1: 400, 3: 200, 5: 200}

    run(main)


def test_processes_share_listeners_and_one_budget() -> None:
    """proxy processes > 1: listeners carry SO_REUSEPORT (a second process can bind
    the same address and port), and two proxies on one shared segment admit the
    app's hard_limit once between them, not once each."""
    from edgeproxy.proxy._shared import SharedBudgets
    from edgeproxy.proxy.server import HttpProxy

    async def main() -> None:
        settings = dataclasses.replace(FAST, processes=2)
        async with lab(settings) as L:
            twin = HttpProxy(
                role="edge", region="ord", host_addresses=["127.0.0.2"], settings=settings
            )
            shared = L.edge._routes.by_app_port[("web", L.port)]
            twin.update([shared], {"web.test": "web"})
            limits = (shared.soft_limit, shared.hard_limit)
            await twin.start()
            try:
                assert twin.listening == L.edge.listening and not twin.listen_errors
                for _ in range(4):
                    response = await request("GET", "/shared", L.port)
                    assert response.status == 200
            finally:
                await twin.stop()
            # the table is not cut to limit // processes any more
            assert (twin._routes.by_app_port[("web", L.port)].soft_limit,
                    twin._routes.by_app_port[("web", L.port)].hard_limit) == limits

    run(main)
    budgets = SharedBudgets.create(1 << 8, 2)
    twin_budgets = SharedBudgets(budgets.fd, 1)
    try:
        a: Admission[object] = Admission(placement.choose, random.Random(1), 10, budgets)
        b: Admission[object] = Admission(placement.choose, random.Random(2), 10, twin_budgets)
        m1 = Backend("m1", "tiny", "ord", IPv4Address("127.0.0.9"), 1, IPv4Address("127.0.0.1"))
        tiny = table("tiny", VIP, 80, [[m1]], soft=1, hard=3)
        got = [a.try_acquire("tiny", [tiny]), b.try_acquire("tiny", [tiny]),
               a.try_acquire("tiny", [tiny]), b.try_acquire("tiny", [tiny])]
        assert [g is not None for g in got] == [True, True, True, False]
        assert a.in_flight() == {("tiny", "m1"): 2} and b.in_flight() == {("tiny", "m1"): 1}
        a.release("tiny", "m1")
        assert b.try_acquire("tiny", [tiny]) is not None
        assert budgets.total(budgets.find("m1")) == 3
    finally:
        twin_budgets.close()
        budgets.close()
        os.close(budgets.fd)


async def h2_websocket_echo(port: int, extra: list[tuple[str, str]], messages: int) -> list[str]:
    """RFC 8441 from an HTTP/2 client: extended CONNECT, then WebSocket frames
    (wsproto) in the stream's DATA; returns what the machine echoed."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    reader, writer = await asyncio.open_connection(VIP, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    events: list[h2.events.Event] = []

    async def pump() -> None:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "edge closed the connection"
        events.extend(conn.receive_data(data))
        writer.write(conn.data_to_send())

    # The edge advertises SETTINGS_ENABLE_CONNECT_PROTOCOL (in its second SETTINGS
    # frame, after the preface's defaults); pump() times out if it never does.
    while conn.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) != 1:
        await pump()
    conn.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                          (":path", "/ws"), (":authority", "web.test"),
                          ("sec-websocket-version", "13"), *extra])
    writer.write(conn.data_to_send())
    while not any(isinstance(e, h2.events.ResponseReceived) for e in events):
        await pump()
    response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    assert dict(response.headers)[b":status"] == b"200", response.headers
    ws = Connection(ConnectionType.CLIENT)
    echoed: list[str] = []
    for i in range(messages):
        conn.send_data(1, ws.send(TextMessage(data=f"message {i}")))
    writer.write(conn.data_to_send())
    while len(echoed) < messages:
        events.clear()
        await pump()
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, 1)
                ws.receive_data(event.data)
                echoed += [m.data for m in ws.events() if isinstance(m, TextMessage)]
        writer.write(conn.data_to_send())
    writer.close()
    return echoed


def test_websocket_over_http2_from_clients_direct_and_over_backhaul() -> None:
    async def main() -> None:
        async with lab() as L:
            for extra, machine in (([], "web-ord-1"),
                                   ([("edgeproxy-force-region", "ams")], "web-ams-")):
                before = {m: len(x.requests) for m, x in L.machines.items()}
                echoed = await h2_websocket_echo(L.port, extra, 50)
                assert echoed == [f"message {i}" for i in range(50)]
                hit = [m for m, x in L.machines.items() if len(x.requests) > before[m]]
                assert len(hit) == 1 and hit[0].startswith(machine), hit
                seen = dict(L.machines[hit[0]].requests[-1]["headers"])
                assert seen["upgrade"].lower() == "websocket" and seen["sec-websocket-key"]

    run(main)
