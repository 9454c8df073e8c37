"""The words on the results page: the header, each scenario's method, and where
edgeproxy loses (written from the rows, so it only says what was measured)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

METHOD = {
    "xdp": (
        "BPF_PROG_TEST_RUN on the edge program (`bpf/edge.bpf.c`, loaded by "
        "`dataplane.py`, one service with 3 machines) and on a no-op XDP program, in the "
        "same run. The edge program rewrites and grows the packet, so the rewriting cases "
        "run at repeat=100,000 through a wrapper program that, every iteration, checks "
        "the previous output against the expected forward, restores the original packet "
        "(SYN: deletes its conntrack entry first; new flows: writes the next 5-tuple) and "
        "tail-calls the edge program; the same wrapper around the no-op is timed and "
        "subtracted, and the edge program's verdict counters must show every iteration "
        "forwarded with no anomaly. No-op and pass-through (which leaves the packet "
        "alone) run at repeat=1,000,000. The `*-repeat1` rows are the older method: "
        "100,000 repeat=1 calls with the original packet each call, kernel `duration` "
        "summed, the per-call ktime overhead (no-op at repeat=1 minus no-op at "
        "repeat=1,000,000, same run) subtracted; every call's verdict and output checked."
    ),
    "tcp": (
        "Own namespaces `epb<pid>c|e|w` (client -> edge -> worker, plain veths as between "
        "the lab's client, edge-ord and worker-ord, edge-worker MTU 1600), addresses "
        "198.18.220.0/24, not the shared lab. Every path ends at the same servers on the "
        "worker's machine address: `iperf3 -s` (one stream, `iperf3 -c ... -t T`) and nginx "
        "(1 worker) answering a tiny HTTP response. Connection rate: `wrk -t1 -c32` with "
        "`Connection: close`, i.e. connect, one small request/response, close, repeated for "
        "T seconds (a TCP proxy sees short-lived TCP connections). Paths: **routed** (client "
        "-> the machine address, forwarded by the edge's kernel), **fast-path** (client -> "
        "VIP, edge XDP + worker XDP/TC loaded by `dataplane.py`), **haproxy** (`mode tcp`, "
        "nbthread 1) and **nginx-stream** (1 worker) in the edge namespace. Routed, HAProxy "
        "and nginx run first with no XDP program anywhere; then the edgeproxy programs are "
        "attached and the fast path and **routed+xdp** (plain forwarding with the programs "
        "attached) are measured, in the same invocation. Each path dials from its own client "
        "port range."
    ),
    "http": (
        "Own namespaces (client → edge → worker). Upstream on each machine address: nginx "
        "(1 worker) answering `GET /` with a 13-byte body. Proxies in the edge namespace, one "
        "worker process each: the edgeproxy daemon (role `both`, so the `local` app's machine "
        "is on the edge host and is reached directly, the `remote` app's machine is on the "
        "worker, reached over the HTTP/2 backhaul through the worker's edgeproxy daemon), "
        "nginx `proxy_pass` with upstream keep-alive, HAProxy `mode http` (nbthread 1), "
        "and `python-floor` (a bench-only uvloop forwarder with no HTTP semantics: the least "
        "any Python proxy spends per request). "
        "Load: `wrk -t1 -cC -dT` keep-alive GETs (latency percentiles from wrk's own "
        "histogram) and `h2load` (h2c prior knowledge) for edgeproxy. Transfer: one 100 MB "
        "GET through each proxy (curl, to /dev/null), with the proxy's peak RSS (VmHWM). "
        "CPU per request: user + system time of each proxy's processes across its run."
    ),
    "h1core": (
        "One process, no network: each step of a keep-alive GET's HTTP/1 byte work run "
        "by the compiled core (`proxy/_http1.pyx`) and by its pure-Python twin on the same "
        "inputs (checked equal first); wall time by timeit, instructions by callgrind."
    ),
    "scale": (
        "A synthetic state (`edgebench.synth`): 200,000 apps, 600,000 machines, 30 regions, "
        "one raw-TCP service per app, written to SQLite and bulk-loaded into a single-member "
        "etcd on loopback by a separate process. The measured process is the control plane "
        "as the daemon runs it: SQLite source (validate) -> place for one edge -> a real edge "
        "program (large limits, attached to no interface) -> `Dataplane.sync` in growing "
        "steps -> one-machine changes through SQLite; RSS after each stage and its peak "
        "(VmHWM); kernel map memory (bpftool). The etcd source followed in its own process "
        "(as a daemon runs it); the YAML file source at 100, 1,000 and 200,000 apps, each "
        "in its own process."
    ),
    "scrape": (
        "The scale scenario's 200,000 apps synced into a real edge program; per-CPU counters "
        "written straight into the stats maps for every machine and service of 10% of the "
        "apps (realistic) and of every app (worst case); GET /metrics over loopback from the "
        "daemon's endpoint and collector, timed end to end."
    ),
}


def method(name: str) -> str:
    return "**Method.** " + METHOD.get(name, "")


def header(results: dict[str, dict[str, Any]]) -> str:
    machine = next((r["machine"] for r in results.values()), None)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `tools/bench report` from `bench-results/*.json` (written by "
        "`tools/bench SCENARIO|all`). Every figure is the median over runs, with the "
        "min-max spread and the ratio to the peer **measured in the same run**. "
        "Only what was measured is reported.",
        "",
    ]
    if machine:
        lines += [
            "| machine | |",
            "|---|---|",
            f"| CPU | {machine['cpu']} |",
            f"| cores (nproc) | {machine['nproc']} |",
            f"| memory | {machine['memory_gib']} GiB |",
            f"| kernel | {machine['kernel']} |",
            f"| Python | {machine['python']} |",
            "",
        ]
    busy = [n for n, r in results.items()
            if max(r["machine"]["loadavg_at_start"][0], *(r.get("loadavg_at_end") or [0])[:1])
            > 0.5]
    if busy:
        lines += [
            "**Machine load was not controlled.** The 2-core machine was shared with other "
            "engineers' test runs; the load average was above 0.5 around "
            f"{', '.join(busy)} (figures per scenario below). Treat absolute numbers with "
            "care; ratios within one run are the more robust figure.",
            "",
        ]
    return "\n".join(lines)


def _median(res: dict[str, Any], name: str, metric: str) -> float | None:
    for r in res["rows"]:
        if r["name"] == name and r["metric"] == metric:
            return float(r["summary"]["median"])
    return None


def why(name: str, res: dict[str, Any]) -> list[str]:
    """Plain words on the losses, each tied to figures in this result."""
    def m(case: str, metric: str) -> float | None:
        return _median(res, case, metric)

    out = []
    if name == "xdp":
        noop, est = m("noop", "cost"), m("established", "cost")
        pt, pta = m("pass-through-repeat1", "cost"), m("pass-through", "cost")
        if noop and est:
            out.append(
                f"The no-op costs {noop:.1f} ns, so every ratio is large in absolute terms: an "
                f"established packet is {est:.0f} ns, {est - noop:.0f} ns more than doing "
                "nothing (parse, VIP pre-filter, key-epoch and conntrack lookups, counters, "
                "DNAT + checksum fix-ups, `bpf_xdp_adjust_head` and the IPIP header with its "
                "8-byte option). New flows add the Maglev choice, an atomic reserve and an LRU "
                "insert into a table that grows to 100,000 entries during the run.")
        if pt and pta:
            out.append(
                f"Pass-through costs {pt:.0f} ns per repeat=1 call but {pta:.0f} ns at "
                "repeat=1,000,000: a repeat=1 call starts with caches the syscall path has "
                "cooled, which is why the `*-repeat1` rows are higher than the repeat=100,000 "
                "figures. Live frames were not used: they would inject XDP_PASS packets into "
                "a real stack and do not restore rewritten bytes.")
    if name == "tcp":
        out.extend(_tcp_why(m))
    if name == "http":
        el, nl = m("edgeproxy-local", "req-rate"), m("nginx-local", "req-rate")
        ec, nc = m("edgeproxy-local", "cpu-per-req"), m("nginx-local", "cpu-per-req")
        if el and nl:
            cpu = (f" and spends {ec:.0f} µs of CPU per request against nginx's {nc:.0f} µs "
                   f"({ec / nc:.2f}x)" if ec and nc else "")
            out.append(
                f"HTTP: edgeproxy serves {el:,.0f} req/s against nginx's {nl:,.0f} "
                f"({el / nl:.0%}){cpu}. It is one Python (asyncio/uvloop) process per core "
                "with a compiled core: these GETs go to a machine on the edge's own host, so "
                "the fast lane serves them on protocol callbacks, and the byte work of each "
                "(request head parse and checks, the machine's head, the response head, the "
                "client's head) is four calls into the Cython module `proxy/_http1.pyx`. "
                "What remains is the four socket system calls both proxies make, uvloop's "
                "callbacks, and the policy in Python (routing, admission, the balancing "
                "rule, counters). The backhaul case adds a second daemon (the worker's) "
                "and HTTP/2 framing (libnghttp2) on both.")
            pf = m("python-floor", "req-rate")
            if pf:
                out.append(
                    f"The floor: a uvloop forwarder on protocol callbacks that only relays "
                    f"bytes over a pooled upstream reached {pf:,.0f} req/s ({pf / nl:.0%} "
                    f"of nginx) in the same run: what any proxy built on this event loop "
                    "could reach with no HTTP rules at all.")
    return out


def _tcp_why(m: Callable[[str, str], float | None]) -> list[str]:
    """The TCP scenario's losses in words: the attach modes, then the HAProxy targets
    set against what the plain routed path itself reaches in the same run."""
    out = []
    fp, rt = m("fast-path", "throughput"), m("routed", "throughput")
    fx, rx = m("fast-path-xdp", "throughput"), m("routed+xdp", "throughput")
    if fp and rt and fx and rx:
        out.append(
            f"Throughput: in TC mode (the default) the fast path moves {fp:.1f} Gbit/s, "
            f"{fp / rt:.0%} of plain forwarding ({rt:.1f} Gbit/s). In XDP mode it moves "
            f"{fx:.1f} Gbit/s, near plain forwarding with the XDP programs attached "
            f"({rx:.1f} Gbit/s): attaching XDP to a veth turns TSO off on its peer "
            "(NOTES.md; ethtool -k), so bulk TCP then crosses the edge as MTU-sized "
            "packets instead of 64 KB GSO segments. On a NIC with native XDP and "
            "hardware GRO that would differ; it is not measured here.")
    for metric, unit, digits, target in (("throughput", "Gbit/s", 1, 2.0),
                                         ("conn-rate", "conn/s", 0, 1.5)):
        hp, routed, fast = m("haproxy", metric), m("routed", metric), m("fast-path", metric)
        if not (hp and routed and fast) or routed >= target * hp:
            continue
        out.append(
            f"The {target:g}x HAProxy {metric} target asks for {target * hp:,.{digits}f} "
            f"{unit}, more than plain kernel forwarding with no proxy reached in the same "
            f"run ({routed:,.{digits}f} {unit}, {routed / hp:.2f}x HAProxy): the load "
            "generator, the servers and every path share the machine's 2 cores, so "
            "HAProxy's own cost is a small share of the total. Meeting it here would take "
            f"a path through the edge {target * hp / routed - 1:.0%} faster than no proxy "
            f"at all; the fast path reached {fast / routed:.0%} of routed.")
    return out


def verdict(name: str, res: dict[str, Any]) -> str:
    if res.get("skipped"):
        return ""
    missed = [r for r in res["rows"] if r.get("met") is False]
    met = [r for r in res["rows"] if r.get("met") is True]
    out = []

    def said(r: dict[str, Any]) -> str:
        got = (f"{r['ratio']:.2f}x" if r["ratio"] is not None
               else f"{r['summary']['median']:,.2f} {r['unit']}")
        return f"{r['name']} {r['metric']} {got} ({r['target']})"

    shaky = []
    for r in met + missed:
        peer = next((p for p in res["rows"] if p["name"] == r.get("peer")
                     and p["metric"] == r["metric"]), None)
        for row in (r, peer):
            if row and row["summary"]["min"] > 0 and \
                    row["summary"]["max"] / row["summary"]["min"] > 5:
                shaky.append(f"{row['name']} {row['metric']} ranged "
                             f"{row['summary']['min']:,.2f}-{row['summary']['max']:,.2f} "
                             f"{row['unit']}")
    if met:
        out.append("**Targets met:** " + "; ".join(said(r) for r in met) + ".")
    if missed:
        out.append("**Where edgeproxy loses:** " + "; ".join(said(r) for r in missed) + ".")
    if shaky:
        out.append("**Not trustworthy:** " + "; ".join(dict.fromkeys(shaky)) + " across runs "
                   "(more than 5x): other work on the shared machine disturbed these runs, so "
                   "a verdict that rests on them may flip on a quiet machine.")
    out += why(name, res)
    return "\n\n".join(out)
