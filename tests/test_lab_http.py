"""Issue 5's proof in the lab: the HTTP slow path with real clients.

Routing by Host and region, retries while machines die under load, replay to
another region, WebSockets across the backhaul, per-app isolation under overload,
and request smuggling refused at the edge. Traffic comes from the lab's client
namespace (198.18.0.2 reaches the apps via edge-ord, 198.18.0.3 via edge-ams; over
IPv6, fd00::2 and fd00::3 do the same for the HTTP apps' fd00:19::80);
the lab machines log every request (not health checks) with the request id the
machine saw, which is how a test proves what did or did not reach a machine.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from conftest import LabHandle
from edgelab.machines import Identity, delay_of, http_response, request_log_line
from edgelab.rundir import machine_dir

APP_ADDRESS = "198.19.0.80"
VIA_ORD = "198.18.0.2"
VIA_AMS = "198.18.0.3"
APP_ADDRESS6 = "fd00:19::80"  # the IPv6 twin of APP_ADDRESS (HTTP apps only)
VIA_ORD6 = "fd00::2"  # the client's default IPv6 source, routed through edge-ord
VIA_AMS6 = "fd00::3"  # routed through edge-ams (ip -6 rule from fd00::3 lookup 101)
WEB_ORD = ("web-ord-1", "web-ord-2")
DAEMON_SOURCE = Path(__file__).resolve().parents[1] / "control" / "edgeproxy" / "daemon.py"
METRICS_URL = "http://127.0.0.1:9109/metrics"  # each daemon, inside its node's namespace
HEALTH_INTERVAL_S = 1.0  # web-http's check interval in the default state
HEALTH_TIMEOUT_S = 0.5

# Runs in the client namespace: GETs (and optionally a body) on one keep-alive
# connection; prints one JSON object per request.
REQUESTS = r"""
import http.client, json, sys
spec = json.loads(sys.stdin.read())
conn = http.client.HTTPConnection(spec["address"], 80, timeout=15,
                                  source_address=(spec["source"], 0))
out = []
for req in spec["requests"]:
    body = req.get("body")
    conn.request(req.get("method", "GET"), req["path"], body=body.encode() if body else None,
                 headers=req["headers"])
    resp = conn.getresponse()
    data = resp.read().decode(errors="replace")
    out.append({"status": resp.status, "headers": {k.lower(): v for k, v in resp.getheaders()},
                "body": data})
conn.close()
print(json.dumps(out))
"""

# Steady keep-alive GETs at a fixed rate for a fixed time, spread over a few
# connections (one thread each, so a slow answer does not lower the rate); every
# failure counted.
STEADY_LOAD = r"""
import http.client, json, sys, threading, time
source, rate, duration, conns = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), 4
def connect():
    return http.client.HTTPConnection("198.19.0.80", 80, timeout=10,
                                      source_address=(source, 0))
out = []
start = time.time()
def worker(k):
    conn, n = connect(), 0
    while True:
        due = start + (n * conns + k) / rate
        if due - start >= duration:
            break
        time.sleep(max(0.0, due - time.time()))
        n += 1
        sent = time.time()
        try:
            conn.request("GET", "/steady", headers={"Host": "web.lab"})
            resp = conn.getresponse()
            resp.read()
            out.append({"t": sent, "ms": (time.time() - sent) * 1000, "status": resp.status,
                        "machine": resp.getheader("X-Machine-Id"),
                        "region": resp.getheader("X-Machine-Region")})
        except (OSError, http.client.HTTPException) as exc:
            out.append({"t": sent, "status": 0, "error": repr(exc)})
            conn.close()
            conn = connect()
threads = [threading.Thread(target=worker, args=(k,)) for k in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(sorted(out, key=lambda r: r["t"])))
"""

# 1,000 WebSocket messages (text and binary, 0..16 KiB) through the edge, echoed.
WEBSOCKET = r"""
import asyncio, json, random, socket, sys
from websockets.asyncio.client import connect

async def main():
    sock = socket.create_connection(("198.19.0.80", 80), timeout=10,
                                    source_address=("198.18.0.2", 0))
    sock.setblocking(False)
    rnd = random.Random(5)
    msgs = []
    for i in range(1000):
        size = rnd.choice([0, 1, 125, 126, 1000, 65535 % 16384, rnd.randrange(16384)])
        if i % 2:
            msgs.append(rnd.randbytes(size))
        else:
            msgs.append("".join(rnd.choice("abcdefé€🙂") for _ in range(size // 4)))
    async with connect("ws://web.lab/ws", sock=sock, max_size=2**20, open_timeout=10,
                       additional_headers={"Edgeproxy-Force-Region": "ams"}) as ws:
        headers = {k.lower(): v for k, v in ws.response.headers.raw_items()}
        async def send():
            for m in msgs:
                await ws.send(m)
        sender = asyncio.create_task(send())
        intact = 0
        for m in msgs:
            got = await asyncio.wait_for(ws.recv(), 30)
            intact += got == m
        await sender
    print(json.dumps({"sent": len(msgs), "intact": intact, "headers": headers,
                      "bytes": sum(len(m) for m in msgs)}))

asyncio.run(main())
"""

# Drives `flood` with slow requests from many keep-alive connections until a deadline.
FLOOD = r"""
import asyncio, json, sys, time
concurrency, delay_ms, duration = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
REQ = (f"GET /flood HTTP/1.1\r\nHost: flood.lab\r\nX-Lab-Delay-Ms: {delay_ms}\r\n\r\n").encode()
counts, retry_after = {}, []

async def one(deadline):
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(
                    "198.19.0.80", 80, local_addr=("198.18.0.2", 0))
            writer.write(REQ)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(":") for line in lines[1:] if line)}
            await reader.readexactly(int(fields.get("content-length", "0")))
            counts[status] = counts.get(status, 0) + 1
            if status == 503:
                retry_after.append(fields.get("retry-after"))
                await asyncio.sleep(0.1)  # a polite client: do not spin on 503s
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            counts[repr(type(exc))] = counts.get(repr(type(exc)), 0) + 1
            writer = None
    if writer is not None:
        writer.close()

async def main():
    deadline = time.monotonic() + duration
    await asyncio.gather(*(one(deadline) for _ in range(concurrency)))
    print(json.dumps({"counts": counts, "retry_after": sorted(set(map(str, retry_after)))}))

asyncio.run(main())
"""

# Raw request bytes from the client namespace; reports the status line, the
# headers, and whether the proxy closed the connection afterwards.
RAW = r"""
import json, socket, sys, time
out = []
for shape, data in json.loads(sys.stdin.read()):
    sock = socket.create_connection(("198.19.0.80", 80), timeout=5,
                                    source_address=("198.18.0.2", 0))
    sock.sendall(data.encode("latin-1"))
    got, closed = b"", False
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            got += chunk
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    sock.close()
    head = got.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1]) if head[0].startswith("HTTP/") else 0
    fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in head[1:])}
    out.append({"shape": shape, "status": status, "closed": closed, "headers": fields,
                "first_line": head[0]})
print(json.dumps(out))
"""


# ---------------------------------------------------------------- helpers


def client_json(lab: LabHandle, code: str, *args: str, stdin: Any = None,
                timeout: float = 60) -> Any:
    done = lab.exec("client", sys.executable, "-c", code, *args, timeout=timeout,
                    input=json.dumps(stdin) if stdin is not None else None)
    assert done.returncode == 0, f"client script failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def web_requests(lab: LabHandle, source: str,
                 requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = {"address": APP_ADDRESS, "source": source, "requests": requests}
    result: list[dict[str, Any]] = client_json(lab, REQUESTS, stdin=spec)
    return result


def get(path: str, **headers: str) -> dict[str, Any]:
    return {"path": path, "headers": {"Host": "web.lab", **headers}}


def machine_requests(marker: str) -> list[tuple[str, str]]:
    """(machine process, log line) for every logged request whose line has marker."""
    hits = []
    for log in sorted(machine_dir().glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("request ") and marker in line:
                hits.append((log.stem.split(":")[0], line))
    return hits


def health_wired() -> bool:
    return "HealthChecker" in DAEMON_SOURCE.read_text()


def metric(lab: LabHandle, node: str, name: str, **labels: str) -> float:
    done = lab.exec(node, "curl", "-s", "--max-time", "5", METRICS_URL)
    assert done.returncode == 0, done.stderr
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in done.stdout.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def _ms(results: list[dict[str, Any]], start: float, end: float) -> str:
    """p50/p99/max latency (ms) of the steady-load GETs sent in [start, end)."""
    ms = [r["ms"] for r in results if start <= r["t"] < end and "ms" in r]
    if not ms:
        return "(none)"
    return f"p50 {percentile(ms, .5):.1f} p99 {percentile(ms, .99):.1f} max {max(ms):.1f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def h2load_web(lab: LabHandle, log: Path, clients: int, rps: int, seconds: int) -> dict[str, Any]:
    """Paced keep-alive GETs to web via edge-ord; latencies from h2load's request log."""
    done = lab.exec("client", "h2load", "--h1", "-c", str(clients), "--rps", str(rps),
                    "-D", str(seconds), "--connect-to", f"{APP_ADDRESS}:80",
                    "--log-file", str(log), "http://web.lab/measure",
                    timeout=seconds + 30)
    assert done.returncode == 0, f"h2load failed:\n{done.stdout}\n{done.stderr}"
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    statuses = [int(r[1]) for r in rows]
    latencies_ms = [int(r[2]) / 1000 for r in rows]
    summary = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                        r"(\d+) failed, (\d+) errored, (\d+) timeout", done.stdout)
    assert summary, done.stdout
    return {
        "n": len(rows),
        "non_200": sum(s != 200 for s in statuses),
        "failed": int(summary.group(5)), "errored": int(summary.group(6)),
        "timeout": int(summary.group(7)),
        "p50": percentile(latencies_ms, 0.50), "p99": percentile(latencies_ms, 0.99),
        "max": max(latencies_ms),
    }


# ---------------------------------------------------------------- hooks (no root)


def _request(*headers: tuple[str, str], target: str = "/x") -> h11.Request:
    return h11.Request(method="GET", target=target, headers=[("host", "web.lab"), *headers])


def test_machine_hooks_delay_echo_and_request_log() -> None:
    assert delay_of(_request(("x-lab-delay-ms", "250"))) == 0.25
    assert delay_of(_request(("x-lab-delay-ms", "999999"))) == 30.0
    assert delay_of(_request()) == 0.0
    echo = _request(("x-lab-echo-headers", "1"), ("x-forwarded-for", "198.18.0.2"))
    _, _, body = http_response(Identity("web-ord-1", "ord", "web"), echo, b"")
    assert ["x-forwarded-for", "198.18.0.2"] in json.loads(body)
    line = request_log_line(_request(("edgeproxy-request-id", "abc"),
                                     ("edgeproxy-replay-source", "web-ord-1")))
    assert line == "request GET /x id=abc replay-source=web-ord-1"
    assert request_log_line(_request(target="/healthz")) is None


# ---------------------------------------------------------------- the lab (root)


@pytest.fixture
def web_machines_running(lab: LabHandle) -> Iterator[None]:
    """Every test starts and ends with the default state and all web machines up."""
    lab.reset_state()
    yield
    for machine in WEB_ORD:
        lab.machine("start", machine)  # a no-op when it is running


@pytest.mark.root
@pytest.mark.lab
def test_web_routes_by_edge_region_and_forced_region(lab: LabHandle,
                                                     web_machines_running: None) -> None:
    echo = {"X-Lab-Echo-Headers": "1", "Edgeproxy-Client-Ip": "6.6.6.6"}  # a forged copy
    # (client source, extra headers, GETs, machine region, edge region). Ties between
    # equally loaded machines are broken at random: 16 GETs all on one machine of
    # two happen once in 32,768 runs.
    cases = [
        (VIA_ORD, {}, 16, "ord", "ord"),
        (VIA_AMS, {}, 16, "ams", "ams"),
        (VIA_ORD, {"Edgeproxy-Force-Region": "syd"}, 4, "syd", "ord"),
        # ams-syd is the longest link: the edge's HTTP checks must still pass over it.
        (VIA_AMS, {"Edgeproxy-Force-Region": "syd"}, 4, "syd", "ams"),
    ]
    for source, extra, count, machine_region, edge_region in cases:
        answers = web_requests(lab, source, [get("/route", **echo, **extra)] * count)
        for answer in answers:
            where = f"from {source} {extra}: {answer['headers']}"
            assert answer["status"] == 200, where
            assert answer["headers"]["x-machine-region"] == machine_region, where
            assert answer["headers"]["x-machine-id"].startswith(f"web-{machine_region}-"), where
            request_id = answer["headers"].get("edgeproxy-request-id", "")
            assert re.fullmatch(r"[0-9a-f]{32}", request_id), where
            seen: dict[str, list[str]] = {}
            for name, value in json.loads(answer["body"]):
                seen.setdefault(name.lower(), []).append(value)
            assert seen["x-forwarded-for"] == [source], seen
            assert seen["edgeproxy-client-ip"] == [source], seen  # the forged one is gone
            assert seen["edgeproxy-edge-region"] == [edge_region], seen
            assert seen["edgeproxy-request-id"] == [request_id], seen
            assert seen["x-forwarded-proto"] == ["http"], seen
            assert len(seen["via"]) == 1 and "edgeproxy" in seen["via"][0], seen
            assert "edgeproxy-force-region" not in seen, seen
        # Both machines of the region share the load.
        if not extra:
            assert len({a["headers"]["x-machine-id"] for a in answers}) == 2, answers

    # The same with curl, the plainest client there is.
    done = lab.exec("client", "curl", "-s", "-i", "--max-time", "10", "--interface", VIA_AMS,
                    "-H", "Host: web.lab", f"http://{APP_ADDRESS}/curl")
    assert done.returncode == 0, done.stderr
    head = done.stdout.split("\r\n\r\n")[0].lower()
    assert head.startswith("http/1.1 200") and "x-machine-region: ams" in head, done.stdout
    assert "edgeproxy-request-id: " in head, done.stdout


def curl_web(lab: LabHandle, url: str, *options: str,
             **headers: str) -> tuple[str, dict[str, str], str]:
    """One GET with curl in the client namespace: (status line, head fields, body)."""
    args = [a for name, value in {"Host": "web.lab", **headers}.items()
            for a in ("-H", f"{name}: {value}")]
    done = lab.exec("client", "curl", "-s", "-i", "--max-time", "10", *options, *args, url)
    assert done.returncode == 0, f"curl {options} {url}: exit {done.returncode} {done.stderr}"
    lines = done.stdout.splitlines()  # exec's text mode has already turned CRLF into LF
    blank = lines.index("")
    fields = dict(line.split(": ", 1) for line in lines[1:blank])
    body = "\n".join(lines[blank + 1:])
    return lines[0], {name.lower(): value for name, value in fields.items()}, body


@pytest.mark.root
@pytest.mark.lab
def test_ipv6_client_reaches_web_through_each_edge(lab: LabHandle,
                                                   web_machines_running: None) -> None:
    # (extra curl options, the source the machine must see, machine and edge region).
    # No --interface: the client's main table picks fd00::2 and edge-ord by itself.
    cases = [((), VIA_ORD6, "ord"), (("--interface", VIA_AMS6), VIA_AMS6, "ams")]
    for options, source, region in cases:
        for _ in range(4):
            status, head, body = curl_web(
                lab, f"http://[{APP_ADDRESS6}]/v6", "-6", *options,
                **{"X-Lab-Echo-Headers": "1", "Edgeproxy-Client-Ip": "6.6.6.6"})
            where = f"{options}: {status} {head}"
            assert status.startswith("HTTP/1.1 200"), where
            assert head["x-machine-region"] == region, where
            assert head["x-machine-id"].startswith(f"web-{region}-"), where
            request_id = head.get("edgeproxy-request-id", "")
            assert re.fullmatch(r"[0-9a-f]{32}", request_id), where
            seen: dict[str, list[str]] = {}
            for name, value in json.loads(body):
                seen.setdefault(name.lower(), []).append(value)
            assert seen["x-forwarded-for"] == [source], seen
            assert seen["edgeproxy-client-ip"] == [source], seen  # the forged one is gone
            assert seen["edgeproxy-edge-region"] == [region], seen
            assert seen["edgeproxy-request-id"] == [request_id], seen


@pytest.mark.root
@pytest.mark.lab
def test_stopping_ord_machines_under_load_loses_no_request(
    lab: LabHandle, web_machines_running: None
) -> None:
    rate, duration, stop_after = 20, 8.0, 2.0
    wired = health_wired()
    retries_before = metric(lab, "edge-ord", "edgeproxy_retries_total", app="web")
    load = lab.popen("client", sys.executable, "-c", STEADY_LOAD, VIA_ORD, str(rate),
                     str(duration), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(stop_after)
        stopping = time.time()
        for machine in WEB_ORD:
            lab.machine("stop", machine)
        stopped = time.time()
        retries_settled = None
        if wired:
            # One health interval (plus the check's own timeout) after the stop, the
            # ord machines are out of placement: no more retries from then on.
            time.sleep(max(0.0, stopped + HEALTH_INTERVAL_S + HEALTH_TIMEOUT_S + 0.5
                           - time.time()))
            settled_at = time.time()
            retries_settled = metric(lab, "edge-ord", "edgeproxy_retries_total", app="web")
        out, err = load.communicate(timeout=duration + 30)
    finally:
        if load.poll() is None:
            load.send_signal(signal.SIGTERM)
            load.wait(timeout=10)
    assert load.returncode == 0, err
    results = json.loads(out)
    failures = [r for r in results if r["status"] != 200]
    print(f"steady load: {len(results)} GETs, stops took {stopped - stopping:.2f} s, "
          f"ms before {_ms(results, 0, stopping)}, after {_ms(results, stopped, 1e12)}")
    assert len(results) >= rate * duration * 0.8, f"only {len(results)} requests sent"
    assert not failures, f"{len(failures)} of {len(results)} GETs failed: {failures[:5]}"
    before = [r for r in results if r["t"] < stopping - 0.05]
    after = [r for r in results if r["t"] > stopped]
    assert before and all(r["region"] == "ord" for r in before), before
    assert len(after) >= rate * 2, f"too few requests after the stop: {len(after)}"
    assert all(r["region"] == "ams" for r in after), [r for r in after if r["region"] != "ams"]
    retries_after = metric(lab, "edge-ord", "edgeproxy_retries_total", app="web")
    assert retries_after > retries_before  # the machines' death was absorbed by retries
    if wired:
        late = [r for r in results if r["t"] > settled_at]
        assert late, "the load ended before the health interval passed"
        assert retries_after == retries_settled, (
            f"retries went on after one health interval: {retries_settled} -> {retries_after}")

    # Restart them: traffic returns to ord within a bounded wait.
    for machine in WEB_ORD:
        lab.machine("start", machine)
    started = time.monotonic()
    deadline = started + 15
    regions: list[str] = []
    while time.monotonic() < deadline:
        answers = web_requests(lab, VIA_ORD, [get("/back")] * 4)
        assert all(a["status"] == 200 for a in answers), answers
        regions = [a["headers"]["x-machine-region"] for a in answers]
        if regions == ["ord"] * 4:
            break
        time.sleep(0.5)
    assert regions == ["ord"] * 4, f"traffic did not return to ord: {regions}"
    print(f"health wired: {wired}; back on ord {time.monotonic() - started:.1f} s after restart")


@pytest.mark.root
@pytest.mark.lab
def test_replay_header_resends_request_to_named_region(lab: LabHandle,
                                                        web_machines_running: None) -> None:
    # Every web machine asked answers "replay to syd" (the hook header travels
    # with the replayed request too): the first answer (ord) is replayed, once; the
    # syd machine's own replay header is not followed again.
    hook = {"X-Lab-Reply-Header": "Edgeproxy-Replay: region=syd", "X-Lab-Echo-Headers": "1"}
    post = {"method": "POST", "path": "/write", "body": "the write",
            "headers": {"Host": "web.lab", **hook}}
    get_answer, post_answer = web_requests(lab, VIA_ORD, [get("/read", **hook), post])
    for answer, method in ((get_answer, "GET"), (post_answer, "POST")):
        headers = answer["headers"]
        assert answer["status"] == 200, answer
        assert headers["x-machine-region"] == "syd", answer
        assert "edgeproxy-replay" not in headers, answer  # the proxy's directive, not the client's
        request_id = headers["edgeproxy-request-id"]
        hits = machine_requests(f"id={request_id}")
        assert len(hits) == 2, hits  # the first machine, then one replay: no loop
        (first, first_line), (second, second_line) = sorted(
            hits, key=lambda hit: hit[0].startswith("web-syd"))
        assert first.startswith("web-ord-") and "replay-source=-" in first_line, hits
        assert second == headers["x-machine-id"], hits
        assert second_line.startswith(f"request {method} ") and \
            f"replay-source={first}" in second_line, hits
    # The GET's machine saw the source header; the POST's body was replayed intact.
    seen = {name.lower(): value for name, value in json.loads(get_answer["body"])}
    assert seen["edgeproxy-replay-source"].startswith("web-ord-"), seen
    assert post_answer["body"] == "the write", post_answer


@pytest.mark.root
@pytest.mark.lab
def test_websocket_messages_echo_intact_across_backhaul(lab: LabHandle,
                                                        web_machines_running: None) -> None:
    result = client_json(lab, WEBSOCKET, timeout=90)
    assert result["headers"].get("x-machine-region") == "ams", result["headers"]
    assert re.fullmatch(r"[0-9a-f]{32}", result["headers"].get("edgeproxy-request-id", "")), \
        result["headers"]
    assert result["sent"] == 1000
    assert result["intact"] == 1000, result


@pytest.mark.root
@pytest.mark.lab
def test_flood_overload_does_not_hurt_web(lab: LabHandle, web_machines_running: None,
                                          tmp_path: Path) -> None:
    # web: 4 keep-alive connections x 25 req/s for 8 s, unloaded and then with
    # flood at 10x its hard limit (40 concurrent 2-s requests) on the same edge.
    clients, rps, seconds = 4, 25, 8
    unloaded = h2load_web(lab, tmp_path / "unloaded.log", clients, rps, seconds)
    flood = lab.popen("client", sys.executable, "-c", FLOOD, "40", "2000", str(seconds + 4),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)  # flood's slots full and its queue building
        loaded = h2load_web(lab, tmp_path / "loaded.log", clients, rps, seconds)
        out, err = flood.communicate(timeout=seconds + 60)
    finally:
        if flood.poll() is None:
            flood.send_signal(signal.SIGTERM)
            flood.wait(timeout=10)
    assert flood.returncode == 0, err
    flooded = json.loads(out)
    figures = f"unloaded {unloaded}\nloaded {loaded}\nflood {flooded}"
    print(figures)
    for run in (unloaded, loaded):
        assert run["n"] >= clients * rps * seconds * 0.8, figures
        assert run["non_200"] == run["failed"] == run["errored"] == run["timeout"] == 0, figures
    assert flooded["counts"].get("503", 0) > 0, figures
    assert flooded["counts"].get("200", 0) > 0, figures
    assert set(flooded["counts"]) <= {"200", "503"}, figures
    assert flooded["retry_after"] and "None" not in flooded["retry_after"], figures
    assert loaded["p99"] <= 2 * unloaded["p99"], figures


SMUGGLING_SHAPES: list[tuple[str, str, int]] = [
    ("cl-te", "POST /{m}/cl-te HTTP/1.1\r\nHost: web.lab\r\nContent-Length: 44\r\n"
              "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /{m}/smuggled HTTP/1.1\r\n"
              "Host: web.lab\r\n\r\n", 400),
    ("te-cl", "POST /{m}/te-cl HTTP/1.1\r\nHost: web.lab\r\nTransfer-Encoding: chunked\r\n"
              "Content-Length: 3\r\n\r\n0\r\n\r\n", 400),
    ("duplicate-cl", "POST /{m}/dup-cl HTTP/1.1\r\nHost: web.lab\r\nContent-Length: 5\r\n"
                     "Content-Length: 6\r\n\r\nhello!", 400),
    ("list-cl", "POST /{m}/list-cl HTTP/1.1\r\nHost: web.lab\r\nContent-Length: 5, 6\r\n\r\n"
                "hello!", 400),
    ("bad-chunk-size", "POST /{m}/bad-chunk HTTP/1.1\r\nHost: web.lab\r\n"
                       "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    ("negative-chunk-size", "POST /{m}/neg-chunk HTTP/1.1\r\nHost: web.lab\r\n"
                            "Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", 400),
    ("obs-fold", "GET /{m}/obs-fold HTTP/1.1\r\nHost: web.lab\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    ("bare-lf", "GET /{m}/bare-lf HTTP/1.1\nHost: web.lab\n\n", 400),
    ("oversized-headers", "GET /{m}/big HTTP/1.1\r\nHost: web.lab\r\n"
                          + "".join(f"X-Big-{i}: {'a' * 1000}\r\n" for i in range(40))
                          + "\r\n", 431),
]


@pytest.mark.root
@pytest.mark.lab
def test_smuggling_shapes_get_4xx_and_reach_no_machine(lab: LabHandle,
                                                        web_machines_running: None) -> None:
    marker = f"smuggle{time.time_ns()}"
    sent = [(shape, text.replace("{m}", marker)) for shape, text, _ in SMUGGLING_SHAPES]
    results = {r["shape"]: r for r in client_json(lab, RAW, stdin=sent)}
    for shape, _, status in SMUGGLING_SHAPES:
        result = results[shape]
        assert result["status"] == status, result
        assert result["closed"], f"{shape}: connection left open: {result}"
        assert re.fullmatch(r"[0-9a-f]{32}", result["headers"].get("edgeproxy-request-id", "")), \
            result
    # A well-formed request with the same marker does reach a machine: the log works.
    control = f"{marker}/control"
    answers = web_requests(lab, VIA_ORD, [get(f"/{control}")])
    assert answers[0]["status"] == 200
    hits = machine_requests(marker)
    assert [line for _, line in hits if control not in line] == [], hits
    assert len(hits) == 1, hits


BACKHAUL_PROBE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 4280), timeout=5)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
try:
    print(len(s.recv(100)))
except ConnectionResetError:
    print(0)
"""


def test_worker_backhaul_serves_edges_only(lab: LabHandle) -> None:
    # The client can route to worker-ord's host address, but it is no edge: the
    # worker's daemon closes the connection before answering a single HTTP/2 frame.
    done = lab.exec("client", sys.executable, "-c", BACKHAUL_PROBE, "198.18.0.21")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", done.stdout
    # An edge is served: its daemon's preface gets the worker's SETTINGS back.
    done = lab.exec("edge-ord", sys.executable, "-c", BACKHAUL_PROBE, "198.18.0.21")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 0, done.stdout
