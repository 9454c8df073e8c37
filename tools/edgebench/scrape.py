"""scrape: /metrics scrape time at 200,000 apps.

Runs in a child process (`python -m edgebench.scrape`): the synthetic state of the
scale scenario (200,000 apps, 600,000 machines) is validated, placed and synced into
a real edge program (loaded with large limits, attached to no interface); then the
kernel counters of a fraction of the apps are made non-zero by writing the per-CPU
stats maps directly (every machine and the service of each chosen app), and the
daemon's endpoint (``metrics.MetricsEndpoint`` with ``EdgeproxyCollector``) is
scraped over HTTP on loopback. Timed: the whole GET (collect: batch map reads,
summing per-CPU values, labels; exposition and transfer, overlapped). Each case
starts as after the daemon applied a whole state (a new state object, ``warm()``),
so its first scrape is the first after ``warm()``.

Cases: 10% of apps with traffic (a realistic edge: most apps see no raw TCP at a
given edge) and every app with traffic (the worst case).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from edgebench.common import REPO, VENV_PYTHON, BenchError, Result, Row, rss_kib

PIN_ROOT = Path("/sys/fs/bpf/edgeproxy")
CASES = (("10% of apps with traffic", 0.10), ("every app with traffic", 1.0))


def _set_traffic(dp: Any, fraction: float) -> tuple[int, int]:
    """Non-zero counters for every machine and service of ``fraction`` of the apps."""
    import ctypes as ct

    from edgeproxy import bpfmaps as bm

    step = max(1, round(1 / fraction))
    apps = {svc.app for i, (_, svc) in enumerate(sorted(dp._services.items())) if i % step == 0}
    mids = sorted(mid for mid, (app, _, _) in dp._machines.items() if app in apps)
    sids = sorted(svc.id for svc in dp._services.values() if svc.app in apps)
    keys = b"".join(mid.to_bytes(4, "little") for mid in mids)
    stats = b"".join(bytes(bm.MachineStats(opened=mid % 97 + 1, closed=mid % 89,
                                           packets_in=mid % 1009 + 10, bytes_in=mid * 13,
                                           packets_out=mid % 1013 + 9, bytes_out=mid * 29))
                     for mid in mids)
    dp.maps["machine_stats"].update_batch(keys, stats)
    dp.maps["machine_active"].update_batch(
        keys, b"".join((mid % 5).to_bytes(8, "little") for mid in mids))
    skeys = b"".join(sid.to_bytes(4, "little") for sid in sids)
    dp.maps["service_stats"].update_batch(
        skeys, bytes(ct.sizeof(bm.ServiceStats)).replace(b"\0", b"\1", 1) * len(sids))
    return len(mids), len(sids)


def child(apps: int, runs: int) -> dict[str, Any]:
    from edgebench import synth
    from edgeproxy.dataplane import Dataplane, DataplaneConfig
    from edgeproxy.metrics import EdgeproxyCollector, MetricsEndpoint
    from edgeproxy.placement import place
    from edgeproxy.state import ClusterState, parse_state

    out: dict[str, Any] = {"apps": apps}
    state = parse_state(synth.build(apps), "synthetic")
    tables = place(state, synth.EDGE_ID)
    out["machines"] = len(state.machines)
    cfg = DataplaneConfig(
        instance=f"bench-{os.getpid()}-scrape", role="edge",
        host_address=IPv4Address("10.255.0.0"), max_services=262_144,
        max_machines=1 << 20, max_flows=1 << 16, max_maglev_slots=1 << 22,
        max_backend_entries=1 << 21)
    dp = Dataplane(cfg)

    served = [state]

    class View:
        rejected = 0

        def current(self) -> ClusterState:
            return served[0]

    endpoint = None
    try:
        dp.load()
        t0 = time.perf_counter()
        dp.sync(tables)
        out["sync_s"] = time.perf_counter() - t0
        del tables
        collector = EdgeproxyCollector(dataplane=dp, source=View(), last_applied=time.time)
        endpoint = MetricsEndpoint.start("127.0.0.1:0", collector)
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        cases = []
        for name, fraction in CASES:
            # as the daemon does after applying a whole state (a new state object, the
            # same content), so the first scrape of each case is the first after warm()
            served[0] = copy.copy(state)
            t0 = time.perf_counter()
            out["warmed"] = collector.warm()
            warm_s = time.perf_counter() - t0
            out.setdefault("warm_s", warm_s)
            machines, services = _set_traffic(dp, fraction)
            times, size, lines = [], 0, 0
            t_read = []
            for _ in range(runs):
                t1 = time.perf_counter()
                dp.read_counters(skip_idle=True)
                t_read.append(time.perf_counter() - t1)
                t1 = time.perf_counter()
                with urllib.request.urlopen(url, timeout=120) as resp:
                    body = resp.read()
                times.append(time.perf_counter() - t1)
                size, lines = len(body), body.count(b"\n")
            cases.append({"name": name, "fraction": fraction, "machines": machines,
                          "services": services, "scrape_s": times, "read_s": t_read,
                          "bytes": size, "lines": lines, "warm_s": warm_s})
        out["cases"] = cases
        out["rss_mib"] = rss_kib(os.getpid())[0] / 1024
    finally:
        if endpoint is not None:
            endpoint.close()
        dp.unload()
    return out


def measure(result: Result, runs: int, quick: bool) -> None:
    if os.geteuid() != 0:
        raise BenchError("scrape needs root (loads a BPF program)")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tools'}"}
    p = subprocess.run([str(VENV_PYTHON), "-m", "edgebench.scrape", "200000", str(runs)],
                       capture_output=True, text=True, env=env, timeout=1800, check=False)
    for d in PIN_ROOT.glob("bench-*-scrape") if PIN_ROOT.exists() else ():
        pid = d.name.split("-")[1]
        if not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
    if p.returncode != 0:
        raise BenchError(f"scrape child exited {p.returncode}: {p.stderr[-800:]}")
    s = json.loads(p.stdout.strip().splitlines()[-1])
    for case in s["cases"]:
        met = max(case["scrape_s"]) <= 2
        result.rows.append(Row(case["name"], "scrape (GET /metrics)", "s", case["scrape_s"],
                               better="lower", target="<= 2 s", met=met).finish())
        result.rows.append(Row(case["name"], "read_counters", "s", case["read_s"],
                               better="lower").finish())
    result.notes += [
        f"{s['apps']:,} apps, {s['machines']:,} machines synced into an edge program "
        f"({s['sync_s']:.1f} s); per-CPU counters written straight into the stats maps "
        "for every machine and the service of the chosen apps; scraped over HTTP on "
        "loopback through the daemon's endpoint and collector. Before each case the "
        "collector is handed a new state object (same content) and warm() runs, as the "
        "daemon does in a thread after it applies a whole state, so the first value of "
        "each case is the first scrape after warm(): warm() built the label text of all "
        f"{s.get('warmed', 0):,} machines in use before the first case "
        f"({s.get('warm_s', 0):.1f} s), "
        + ", ".join(f"{c['warm_s']:.1f} s before {c['name']}" for c in s["cases"][1:]
                    if "warm_s" in c) + " (labels re-checked against the new state).",
        *(f"{c['name']}: {c['machines']:,} machines and {c['services']:,} services with "
          f"non-zero counters; {c['lines']:,} lines, {c['bytes'] / 2**20:.1f} MiB per scrape."
          for c in s["cases"]),
        "read_counters = Dataplane.read_counters(skip_idle=True) alone: one "
        "BPF_MAP_LOOKUP_BATCH per 65,536 keys of each stats map into one buffer, per-CPU "
        "copies summed and idle ids masked by numpy, rows kept in columns; "
        "the rest of a scrape is the text exposition (label text cached per machine id "
        "as a %-template; connects and active per machine, disconnects, bytes and packets "
        "per service; 4,096 lines per C-level `template % values`) and the transfer, "
        "which overlaps it: the body is sent in 512 KiB pieces as they are written, with "
        "its Content-Length computed beforehand.",
        f"Child RSS after the scrapes: {s['rss_mib']:.0f} MiB.",
    ]


def main() -> int:
    apps, runs = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps(child(apps, runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
