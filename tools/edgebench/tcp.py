"""tcp: iperf3 throughput and new connections/s through the edge, four ways.

Paths (all to the same servers on the worker's machine address):
- routed: client → the machine address; the edge kernel forwards (no XDP loaded)
- fast-path: client → VIP; edgeproxy's programs in TC mode (the loader's default:
  clsact ingress on edge and worker, GSO super-packets stay whole) steer it
- fast-path-xdp: the same in XDP mode (edge XDP, worker XDP ingress + TC egress)
- haproxy: HAProxy `mode tcp` in the edge namespace (no XDP loaded)
- nginx-stream: nginx `stream` proxy in the edge namespace (no XDP loaded)
- routed+tc / routed+xdp: the routed path again while the edgeproxy programs are
  attached in that mode (what attaching costs plain forwarding: XDP turns TSO off
  on the veth peer, TC does not)

Connection rate: wrk with `Connection: close` (connect, one tiny HTTP request and
response, close; C concurrent connections, one thread) against nginx on the
machine; to a TCP proxy that is just a short-lived TCP connection.
"""

from __future__ import annotations

from edgebench import load, peers
from edgebench.common import Result, Row, find, relate, run
from edgebench.net import EDGE_HOST, VIP, WORKER_MACHINE, BenchNet

IPERF_PORT = 5201
WEB_PORT = 8080
HAPROXY_OFFSET = 10000  # haproxy listens on EDGE_HOST:port+10000, nginx on +20000
NGINX_OFFSET = 20000
CONNS = 32

UPSTREAM = f"""http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen {WORKER_MACHINE}:{WEB_PORT} reuseport backlog=4096;
    location / {{ return 200 "hello, world\\n"; }}
  }}
}}"""


CASES = ("routed", "haproxy", "nginx-stream", "fast-path", "routed+tc", "fast-path-xdp",
         "routed+xdp")


def _port_range(net: BenchNet, case: str) -> None:
    """Each case dials from its own client port range. Otherwise a 4-tuple left in
    TIME_WAIT on the server by one path (the machine sees the client's own address
    on every path) meets the next path's SYN with another ISN and costs a 1 s SYN
    retransmit, and a worker_flows entry left by the fast path would re-NAT a later
    routed connection that reuses its tuple."""
    lo = 2000 + 9000 * CASES.index(case)
    run(["sysctl", "-qw", f"net.ipv4.ip_local_port_range={lo} {lo + 8999}"], netns=net.client)


def _targets(case: str) -> tuple[str, int, int]:
    """(address, iperf3 port, web port) the client dials for ``case``."""
    if case.startswith("routed"):
        return WORKER_MACHINE, IPERF_PORT, WEB_PORT
    if case.startswith("fast-path"):
        return VIP, IPERF_PORT, WEB_PORT
    off = HAPROXY_OFFSET if case == "haproxy" else NGINX_OFFSET
    return EDGE_HOST, IPERF_PORT + off, WEB_PORT + off


def measure(result: Result, runs: int, quick: bool) -> None:
    secs = 2.0 if quick else 5.0
    values: dict[tuple[str, str], list[float]] = {}
    errors: dict[str, int] = {}
    cdf: dict[str, list[float]] = {}

    def one(net: BenchNet, case: str) -> None:
        addr, iport, wport = _targets(case)
        _port_range(net, case)
        gbps = load.iperf3(net.client, addr, iport, secs)
        w = load.wrk(net.client, f"http://{addr}:{wport}/", secs, CONNS, net.dir,
                     headers=("Connection: close",))
        values.setdefault((case, "throughput"), []).append(gbps)
        values.setdefault((case, "conn-rate"), []).append(w.rate)
        values.setdefault((case, "conn-p99"), []).append(w.p99_ms)
        errors[case] = errors.get(case, 0) + w.errors
        cdf[f"connection time:{case}"] = w.pct_ms
        print(f"[bench] tcp {case}: {gbps:.2f} Gbit/s, {w.rate:,.0f} conn/s "
              f"(p99 {w.p99_ms:.2f} ms, errors {w.errors})", flush=True)

    with BenchNet() as net:
        peers.iperf3_server(net, net.worker, WORKER_MACHINE, IPERF_PORT)
        peers.nginx(net, net.worker, "upstream", UPSTREAM, [(WORKER_MACHINE, WEB_PORT)])
        peers.haproxy(net, net.edge, "haproxy", "\n".join([
            f"listen iperf\n  bind {EDGE_HOST}:{IPERF_PORT + HAPROXY_OFFSET}\n"
            f"  server s1 {WORKER_MACHINE}:{IPERF_PORT}",
            f"listen web\n  bind {EDGE_HOST}:{WEB_PORT + HAPROXY_OFFSET}\n"
            f"  server s1 {WORKER_MACHINE}:{WEB_PORT}",
        ]), [(EDGE_HOST, IPERF_PORT + HAPROXY_OFFSET)], mode="tcp")
        peers.nginx(net, net.edge, "nginx-stream", "stream {\n" + "\n".join(
            f"  server {{ listen {EDGE_HOST}:{p + NGINX_OFFSET} backlog=4096; "
            f"proxy_pass {WORKER_MACHINE}:{p}; }}" for p in (IPERF_PORT, WEB_PORT)) + "\n}",
            [(EDGE_HOST, IPERF_PORT + NGINX_OFFSET)], stream=True)
        for _ in range(runs):  # phase 1: no XDP anywhere; cases interleaved per run
            for case in ("routed", "haproxy", "nginx-stream"):
                one(net, case)
        opened = forwarded = 0
        # phase 2: edgeproxy programs attached in XDP mode, phase 3 in TC mode
        for attach, cases in (("xdp", ("fast-path-xdp", "routed+xdp")),
                              ("tc", ("fast-path", "routed+tc"))):
            net.load_fast_path([("bench-iperf", IPERF_PORT, IPERF_PORT),
                                ("bench-web", WEB_PORT, WEB_PORT)], attach=attach)
            for _ in range(runs):
                for case in cases:
                    one(net, case)
            counters = net.dataplanes[0].read_counters()
            opened += sum(m.opened for m in counters.machines)
            forwarded += counters.stats.get("forwarded", 0)
            net.unload_fast_path()

    units = {"throughput": ("Gbit/s", "higher"), "conn-rate": ("conn/s", "higher"),
             "conn-p99": ("ms", "lower")}
    for (case, metric), vs in values.items():
        unit, better = units[metric]
        result.rows.append(Row(case, metric, unit, vs, better=better,
                               extra={"errors": errors.get(case, 0)}).finish())
    result.rows.sort(key=lambda r: (list(units).index(r.metric), r.name))
    relate(result.rows, "fast-path", "routed", "throughput", (">=", 0.8))
    relate(result.rows, "fast-path", "haproxy", "conn-rate", (">=", 1.5))
    relate(result.rows, "fast-path-xdp", "routed", "throughput")
    relate(result.rows, "fast-path-xdp", "haproxy", "conn-rate")
    relate(result.rows, "routed+tc", "routed", "throughput")
    relate(result.rows, "routed+xdp", "routed", "throughput")
    relate(result.rows, "routed+xdp", "routed", "conn-rate")
    relate(result.rows, "haproxy", "routed", "conn-rate")
    relate(result.rows, "nginx-stream", "haproxy", "throughput")
    relate(result.rows, "nginx-stream", "haproxy", "conn-rate")
    # the second bound on fast-path throughput (>= 2x HAProxy) as a separate row
    fp, hx = find(result.rows, "fast-path", "throughput"), find(result.rows, "haproxy",
                                                                 "throughput")
    if fp and hx and fp.summary and hx.summary and hx.summary.median:
        r = fp.summary.median / hx.summary.median
        result.rows.append(Row("fast-path vs haproxy", "throughput", "Gbit/s", fp.values,
                               peer="haproxy", ratio=r, target=">= 2x haproxy", met=r >= 2.0,
                               ).finish())
    result.samples.update(cdf)
    result.notes += [
        f"iperf3: one stream, {secs:.0f} s per measurement; wrk: -t1 -c{CONNS}, "
        f"{secs:.0f} s, `Connection: close` (a new TCP connection per request).",
        "Load generator, proxies and servers share the machine's 2 cores, so a path that "
        "costs CPU on the edge also takes it from the client and the server.",
        f"Connection errors seen by wrk, summed over runs: {errors}.",
    ]
    result.notes.append("Each path dials from its own client port range (10,000 ports), so "
                        "no 4-tuple is reused across paths.")
    result.notes.append("fast-path = TC attach mode (the loader's default), measured after "
                        "fast-path-xdp/routed+xdp with the XDP programs detached again.")
    result.notes.append(f"Fast path kernel counters over phases 2 and 3: {opened:,} connections "
                        f"opened, {forwarded:,} packets forwarded (it really steered them).")
