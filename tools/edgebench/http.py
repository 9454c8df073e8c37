"""http: keep-alive GETs through the edge (edgeproxy, nginx, HAProxy), req/s and
latency; one 100 MB transfer each; the proxies' peak RSS.

Cases (wrk -t1 -cC keep-alive, 13-byte body):
- edgeproxy-local: edge daemon (role both) → machine on the edge host, directly
- edgeproxy-backhaul: edge daemon → HTTP/2 backhaul → worker daemon → machine
- nginx-local / nginx-remote: nginx proxy_pass (upstream keep-alive) → same machines
- haproxy-local / haproxy-remote: HAProxy mode http → same machines
- h2c: h2load (prior knowledge) to edgeproxy-local and to nginx-local (`listen … http2`)
- python-floor: `pyfloor.py`, a bench-only uvloop forwarder with no HTTP semantics,
  → the local machine: the least a Python proxy can spend per request
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from subprocess import Popen

import yaml

from edgebench import load, peers
from edgebench.common import (
    VENV_PYTHON,
    BenchError,
    Result,
    Row,
    cpu_split,
    relate,
    rss_kib,
    wait_for,
)
from edgebench.net import EDGE_HOST, EDGE_MACHINE, HTTP_APP, WORKER_MACHINE, BenchNet

STATE = Path(__file__).with_name("http_state.yaml")
CONNS = 32
BIG = 100 * 1000 * 1000
MACHINE_PORT = 8080
PIN_ROOT = Path("/sys/fs/bpf/edgeproxy")

POST_BYTES = 4096
# case -> (url, Host header, POST body bytes or 0 for GET)
CASES: dict[str, tuple[str, str | None, int]] = {
    "edgeproxy-local": (f"http://{HTTP_APP}/", "local.bench", 0),
    "edgeproxy-backhaul": (f"http://{HTTP_APP}/", "remote.bench", 0),
    "nginx-local": (f"http://{EDGE_HOST}:8081/", None, 0),
    "nginx-remote": (f"http://{EDGE_HOST}:8082/", None, 0),
    "haproxy-local": (f"http://{EDGE_HOST}:9081/", None, 0),
    "haproxy-remote": (f"http://{EDGE_HOST}:9082/", None, 0),
    "python-floor": (f"http://{EDGE_HOST}:9091/", None, 0),
    "edgeproxy-local-post": (f"http://{HTTP_APP}/", "local.bench", POST_BYTES),
    "nginx-local-post": (f"http://{EDGE_HOST}:8081/", None, POST_BYTES),
}


def _proxy_of(case: str) -> str:
    """Which process group a case's CPU is read from (see ``procs`` in measure)."""
    if case.startswith("edgeproxy-backhaul"):
        return "edgeproxy-both"
    for prefix in ("edgeproxy", "nginx", "haproxy", "python-floor"):
        if case.startswith(prefix):
            return prefix
    raise BenchError(f"no process for case {case}")
PYFLOOR = Path(__file__).with_name("pyfloor.py")


def _upstream(addr: str, big: Path) -> str:
    return f"""http {{
  access_log off;
  keepalive_requests 10000000;
  default_type application/octet-stream;
  sendfile on;
  server {{
    listen {addr}:{MACHINE_PORT} backlog=4096;
    location = /100m {{ alias {big}; }}
    location / {{ return 200 "hello, world\\n"; }}
  }}
}}"""


PROXY_NGINX = f"""http {{
  access_log off;
  keepalive_requests 10000000;
  upstream local {{ server {EDGE_MACHINE}:{MACHINE_PORT}; keepalive 64; }}
  upstream remote {{ server {WORKER_MACHINE}:{MACHINE_PORT}; keepalive 64; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering on;
  server {{ listen {EDGE_HOST}:8081 backlog=4096; location / {{ proxy_pass http://local; }} }}
  server {{ listen {EDGE_HOST}:8082 backlog=4096; location / {{ proxy_pass http://remote; }} }}
  server {{ listen {EDGE_HOST}:8083 http2; location / {{ proxy_pass http://local; }} }}
}}"""

PROXY_HAPROXY = "\n".join([
    f"listen local\n  bind {EDGE_HOST}:9081\n  server s1 {EDGE_MACHINE}:{MACHINE_PORT}",
    f"listen remote\n  bind {EDGE_HOST}:9082\n  server s1 {WORKER_MACHINE}:{MACHINE_PORT}",
])


def _daemon(net: BenchNet, ns: str, name: str, role: str, host: str,
            processes: int = 1) -> Popen[bytes]:
    d = net.dir / name
    d.mkdir(parents=True, exist_ok=True)
    ready = d / "ready"
    cfg = d / "daemon.yaml"
    cfg.write_text(yaml.safe_dump({
        "instance": f"bench-{os.getpid()}-{name}",
        "role": role,
        "host_id": host,
        "state": {"source": "file", "path": str(STATE)},
        "interfaces": [],
        "metrics": {"listen": "127.0.0.1:19109"},
        "ready_file": str(ready),
        # As many HTTP processes as nginx has workers (one): the comparison.
        "http": {"processes": processes},
    }))
    log = d / "daemon.log"
    p = net.procs.spawn([str(VENV_PYTHON), "-m", "edgeproxy.daemon", "--config", str(cfg)],
                        netns=ns, log=log)

    def up() -> bool:
        if p.poll() is not None:
            raise BenchError(f"edgeproxy daemon {name} exited {p.returncode}: "
                             f"{log.read_text(errors='replace')[-800:]}")
        return ready.exists()

    wait_for(f"edgeproxy daemon {name}", up, 90.0, 0.1)
    return p


def _per_request(vals: dict[tuple[str, str], list[float]], case: str,
                 before: tuple[float, float], after: tuple[float, float], requests: int) -> None:
    """CPU microseconds per request, total and user, between two ``cpu_split``s."""
    user, system = after[0] - before[0], after[1] - before[1]
    n = max(requests, 1)
    vals.setdefault((case, "cpu-per-req"), []).append((user + system) * 1e6 / n)
    vals.setdefault((case, "user-cpu-per-req"), []).append(user * 1e6 / n)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def measure(result: Result, runs: int, quick: bool) -> None:
    secs = 3.0 if quick else 8.0
    vals: dict[tuple[str, str], list[float]] = {}
    errors: dict[str, int] = {}
    pct: dict[str, list[float]] = {}
    rss: dict[str, dict[str, float]] = {}
    pins: list[Path] = []
    with BenchNet() as net:
        try:
            big = net.dir / "100m.bin"
            with big.open("wb") as f:
                f.truncate(BIG)
            peers.nginx(net, net.edge, "machine-local", _upstream(EDGE_MACHINE, big),
                        [(EDGE_MACHINE, MACHINE_PORT)])
            peers.nginx(net, net.worker, "machine-remote", _upstream(WORKER_MACHINE, big),
                        [(WORKER_MACHINE, MACHINE_PORT)])
            ngx = peers.nginx(net, net.edge, "nginx-proxy", PROXY_NGINX,
                              [(EDGE_HOST, 8081), (EDGE_HOST, 8083)])
            hap = peers.haproxy(net, net.edge, "haproxy-http", PROXY_HAPROXY,
                                [(EDGE_HOST, 9081)], mode="http")
            floor = net.procs.spawn(
                [str(VENV_PYTHON), str(PYFLOOR), EDGE_HOST, "9091", EDGE_MACHINE,
                 str(MACHINE_PORT)], netns=net.edge, log=net.dir / "pyfloor.log")
            wait_for("python floor listening",
                     lambda: floor.poll() is None and peers.listening(net, net.edge, EDGE_HOST,
                                                                      9091), 15.0)
            pins = [PIN_ROOT / f"bench-{os.getpid()}-{n}" for n in ("hedge", "hworker")]
            wd = _daemon(net, net.worker, "hworker", "worker", "bench-worker")
            ed = _daemon(net, net.edge, "hedge", "both", "bench-edge")
            wait_for("edgeproxy listening on the app address",
                     lambda: peers.listening(net, net.edge, HTTP_APP, 80), 15.0)
            ngx_workers = _children(ngx.pid)
            procs = {"edgeproxy-edge": ed.pid, "edgeproxy-worker": wd.pid,
                     "nginx-worker": ngx_workers[0] if ngx_workers else ngx.pid,
                     "haproxy": hap.pid}
            idle = {k: rss_kib(p)[0] for k, p in procs.items()}
            # warm-up: pools, backhaul connection
            # The processes whose CPU a case costs, descendants included.
            cpu_pids = {"edgeproxy": [ed.pid], "edgeproxy-both": [ed.pid, wd.pid],
                        "nginx": [ngx.pid], "haproxy": [hap.pid], "python-floor": [floor.pid]}
            for url, host, post in CASES.values():
                hdr = (f"Host: {host}",) if host else ()
                load.wrk(net.client, url, 1, 4, net.dir, headers=hdr, post_bytes=post)
            for _ in range(runs):
                for case, (url, host, post) in CASES.items():
                    hdr = (f"Host: {host}",) if host else ()
                    pids = cpu_pids[_proxy_of(case)]
                    before = cpu_split(pids)
                    w = load.wrk(net.client, url, secs, CONNS, net.dir, headers=hdr,
                                 post_bytes=post)
                    _per_request(vals, case, before, cpu_split(pids), w.requests)
                    vals.setdefault((case, "req-rate"), []).append(w.rate)
                    vals.setdefault((case, "p50"), []).append(w.p50_ms)
                    vals.setdefault((case, "p99"), []).append(w.p99_ms)
                    errors[case] = errors.get(case, 0) + w.errors
                    pct[f"request latency:{case}"] = w.pct_ms
                    print(f"[bench] http {case}: {w.rate:,.0f} req/s p50 {w.p50_ms:.2f} ms "
                          f"p99 {w.p99_ms:.2f} ms errors {w.errors}", flush=True)
                for case, url, host in (
                        ("edgeproxy-local-h2c", f"http://{HTTP_APP}/", "local.bench"),
                        ("nginx-local-h2c", f"http://{EDGE_HOST}:8083/", None)):
                    pids = cpu_pids[_proxy_of(case)]
                    before = cpu_split(pids)
                    h = load.h2load(net.client, url, secs, CONNS, 10, host)
                    _per_request(vals, case, before, cpu_split(pids), h.requests)
                    vals.setdefault((case, "req-rate"), []).append(h.rate)
                    errors[case] = errors.get(case, 0) + h.errors
                    print(f"[bench] http {case}: {h.rate:,.0f} req/s errors {h.errors}",
                          flush=True)
            for case, url, host in (
                    ("edgeproxy-local", f"http://{HTTP_APP}/100m", "local.bench"),
                    ("edgeproxy-backhaul", f"http://{HTTP_APP}/100m", "remote.bench"),
                    ("nginx-local", f"http://{EDGE_HOST}:8081/100m", None),
                    ("haproxy-local", f"http://{EDGE_HOST}:9081/100m", None)):
                for _ in range(runs):
                    mbps, size = load.curl_download(net.client, url, host, 120)
                    if size != BIG:
                        raise BenchError(f"{case}: 100 MB GET returned {size} bytes")
                    vals.setdefault((case, "transfer"), []).append(mbps)
            for k, p in procs.items():
                now, peak = rss_kib(p)
                rss[k] = {"idle_mib": idle[k] / 1024, "peak_mib": peak / 1024,
                          "end_mib": now / 1024}
            # processes=2 against 1: the same edge restarted with two HTTP processes
            # (the load generator shares the same 2 cores: reported, no target).
            net.procs.stop(ed)
            pins.append(PIN_ROOT / f"bench-{os.getpid()}-hedge2")
            ed2 = _daemon(net, net.edge, "hedge2", "both", "bench-edge", processes=2)
            wait_for("edgeproxy (2 processes) listening on the app address",
                     lambda: peers.listening(net, net.edge, HTTP_APP, 80), 15.0)
            url, host, _ = CASES["edgeproxy-local"]
            load.wrk(net.client, url, 1, 4, net.dir, headers=(f"Host: {host}",))
            for _ in range(runs):
                before = cpu_split([ed2.pid])
                w = load.wrk(net.client, url, secs, CONNS, net.dir, headers=(f"Host: {host}",))
                vals.setdefault(("edgeproxy-local-2proc", "req-rate"), []).append(w.rate)
                vals.setdefault(("edgeproxy-local-2proc", "p99"), []).append(w.p99_ms)
                _per_request(vals, "edgeproxy-local-2proc", before, cpu_split([ed2.pid]),
                             w.requests)
                errors["edgeproxy-local-2proc"] = (errors.get("edgeproxy-local-2proc", 0)
                                                   + w.errors)
                print(f"[bench] http edgeproxy-local-2proc: {w.rate:,.0f} req/s "
                      f"errors {w.errors}", flush=True)
        finally:
            net.procs.stop_all()
            for pin in pins:  # the worker daemon's data plane (not attached anywhere)
                shutil.rmtree(pin, ignore_errors=True)

    units = {"req-rate": ("req/s", "higher"), "p50": ("ms", "lower"), "p99": ("ms", "lower"),
             "transfer": ("MB/s", "higher"), "cpu-per-req": ("us", "lower"),
             "user-cpu-per-req": ("us", "lower")}
    for (case, metric), vs in vals.items():
        unit, better = units[metric]
        result.rows.append(Row(case, metric, unit, vs, better=better,
                               extra={"errors": errors.get(case, 0)}).finish())
    order = list(units)
    result.rows.sort(key=lambda r: (order.index(r.metric), r.name))
    # The HTTP engine issue's targets (same number of worker processes as nginx).
    relate(result.rows, "edgeproxy-local", "nginx-local", "req-rate", (">=", 0.9))
    relate(result.rows, "edgeproxy-local", "nginx-local", "p99", ("<=", 1.5))
    relate(result.rows, "edgeproxy-local-post", "nginx-local-post", "req-rate", (">=", 0.8))
    relate(result.rows, "edgeproxy-backhaul", "nginx-remote", "req-rate", (">=", 0.5))
    relate(result.rows, "edgeproxy-backhaul", "nginx-remote", "p99", ("<=", 2.0))
    relate(result.rows, "haproxy-local", "nginx-local", "req-rate")
    relate(result.rows, "haproxy-remote", "nginx-remote", "req-rate")
    relate(result.rows, "python-floor", "nginx-local", "req-rate")
    relate(result.rows, "edgeproxy-local-h2c", "nginx-local-h2c", "req-rate", (">=", 0.8))
    relate(result.rows, "edgeproxy-local", "nginx-local", "cpu-per-req", ("<=", 1.2))
    relate(result.rows, "edgeproxy-backhaul", "nginx-remote", "cpu-per-req", ("<=", 2.5))
    relate(result.rows, "edgeproxy-local-post", "nginx-local-post", "cpu-per-req")
    relate(result.rows, "edgeproxy-local-h2c", "nginx-local-h2c", "cpu-per-req")
    relate(result.rows, "haproxy-local", "nginx-local", "cpu-per-req")
    relate(result.rows, "python-floor", "nginx-local", "cpu-per-req")
    relate(result.rows, "edgeproxy-local", "nginx-local", "transfer", (">=", 1.0))
    relate(result.rows, "edgeproxy-backhaul", "nginx-local", "transfer")
    relate(result.rows, "haproxy-local", "nginx-local", "transfer")
    relate(result.rows, "edgeproxy-local-2proc", "edgeproxy-local", "req-rate")
    relate(result.rows, "edgeproxy-local-2proc", "edgeproxy-local", "cpu-per-req")
    for case, peer in (("edgeproxy-local", "nginx-local"), ("edgeproxy-backhaul", "nginx-remote"),
                       ("edgeproxy-local-post", "nginx-local-post"),
                       ("edgeproxy-local-h2c", "nginx-local-h2c"),
                       ("python-floor", "nginx-local")):
        relate(result.rows, case, peer, "user-cpu-per-req")
    for k, v in rss.items():
        result.rows.append(Row(k, "peak RSS", "MiB", [v["peak_mib"]], better="lower",
                               notes=f"idle {v['idle_mib']:.1f} MiB, "
                                     f"end {v['end_mib']:.1f} MiB").finish())
    result.samples.update(pct)
    result.notes += [
        f"wrk -t1 -c{CONNS} -d{secs:.0f}s keep-alive; h2load -c{CONNS} -m10 -t1 "
        f"-D{secs:.0f}; cases interleaved in each run; errors summed over runs: {errors}.",
        f"*-post: wrk POSTs of {POST_BYTES} bytes (Content-Length), keep-alive.",
        "edgeproxy-local-2proc: the edge daemon restarted with http.processes = 2 "
        "(SO_REUSEPORT, shared budgets) after the other cases; every other edgeproxy "
        "case runs one HTTP process per daemon, as nginx runs one worker.",
        "cpu-per-req: user + system CPU of the proxy's processes (and their children) "
        "from /proc/<pid>/stat across each wrk/h2load run, over the requests it "
        "completed; the backhaul case sums the edge and the worker daemon. "
        "user-cpu-per-req: the user part alone (the proxy's own code; the rest is the "
        "kernel's: system calls and the TCP stack they run).",
        "One worker process each: edgeproxy is one asyncio process (uvloop); nginx "
        "worker_processes 1; HAProxy nbthread 1. The edgeproxy worker daemon (backhaul "
        "side) is a second process, as an nginx/HAProxy remote case has none.",
        "python-floor: one uvloop process relaying bodiless requests and Content-Length "
        "responses as bytes over a pooled upstream (tools/edgebench/pyfloor.py): no header "
        "rules, routing, limits or checks. It bounds what any Python proxy design could "
        "reach here, and is not a product.",
        "peak RSS = VmHWM over the whole scenario (the 100 MB transfers ran last); "
        "for nginx, its one worker process. " + "; ".join(
            f"{k}: idle {v['idle_mib']:.1f} → peak {v['peak_mib']:.1f} MiB"
            for k, v in rss.items()) + ".",
    ]
