"""Load generators (Debian's wrk, h2load, iperf3, curl), run in the client
namespace, bounded in time, output parsed into plain numbers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgebench.common import BenchError, run

# wrk's done() hook prints totals and its latency histogram's percentiles (µs)
WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('EPB-JSON {"requests":%d,"duration_us":%d,"connect":%d,'
    .. '"read":%d,"write":%d,"status":%d,"timeout":%d,"pct":[',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  for i = 1, 199 do
    if i > 1 then io.write(",") end
    io.write(string.format("%d", latency:percentile(i / 2)))
  end
  io.write(string.format(',%d,%d]}\\n', latency:percentile(99.9), latency.max))
end
"""
PCT_POINTS = [i / 2 for i in range(1, 200)] + [99.9, 100.0]


@dataclass
class WrkResult:
    rate: float  # requests (or connections) per second
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    pct_ms: list[float] = field(default_factory=list)  # at PCT_POINTS


def wrk(ns: str, url: str, seconds: float, conns: int, workdir: Path,
        headers: tuple[str, ...] = (), post_bytes: int = 0) -> WrkResult:
    """Keep-alive GETs, or POSTs of ``post_bytes`` each (Content-Length framed)."""
    script = workdir / (f"epb-post{post_bytes}.lua" if post_bytes else "epb.lua")
    if not script.exists():
        prelude = (f'wrk.method = "POST"\nwrk.body = string.rep("x", {post_bytes})\n'
                   if post_bytes else "")
        script.write_text(prelude + WRK_LUA)
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
            "-s", str(script)]
    for h in headers:
        argv += ["-H", h]
    out = run([*argv, url], netns=ns, timeout=seconds + 30)
    m = re.search(r"EPB-JSON (\{.*\})", out)
    if not m:
        raise BenchError(f"wrk printed no result: {out[-400:]}")
    d = json.loads(m.group(1))
    pct = [v / 1000 for v in d["pct"]]
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return WrkResult(d["requests"] / (d["duration_us"] / 1e6), d["requests"], errors,
                     pct[PCT_POINTS.index(50.0)], pct[PCT_POINTS.index(99.0)], pct)


def h2load(ns: str, url: str, seconds: float, clients: int, streams: int,
           host: str | None = None) -> WrkResult:
    argv = ["h2load", f"-c{clients}", f"-m{streams}", "-t1", f"-D{max(1, round(seconds))}"]
    if host:
        argv += ["-H", f":authority: {host}"]
    out = run([*argv, url], netns=ns, timeout=seconds + 30)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out)
    lat = re.search(r"time for request:\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", out)
    if not rate or not done:
        raise BenchError(f"h2load output not understood: {out[-400:]}")
    mean_ms = _ms(float(lat.group(5)), lat.group(6)) if lat else float("nan")
    return WrkResult(float(rate.group(1)), int(done.group(1)),
                     int(done.group(3)) + int(done.group(4)), mean_ms, float("nan"))


def _ms(v: float, unit: str) -> float:
    return {"us": v / 1000, "ms": v, "s": v * 1000}.get(unit, float("nan"))


def iperf3(ns: str, address: str, port: int, seconds: float) -> float:
    """One stream for ``seconds``; the receiver's Gbit/s."""
    out = run(["iperf3", "-c", address, "-p", str(port), "-t", str(max(1, round(seconds))),
               "-J", "--connect-timeout", "3000"], netns=ns, timeout=seconds + 30, check=False)
    try:
        d = json.loads(out)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 to {address}:{port}: {out[-300:]}") from exc
    if "error" in d:
        raise BenchError(f"iperf3 to {address}:{port}: {d['error']}")
    return float(d["end"]["sum_received"]["bits_per_second"]) / 1e9


def curl_download(ns: str, url: str, host: str | None, timeout: float) -> tuple[float, int]:
    """(MB/s, bytes) of one GET to /dev/null."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
            "--max-time", str(int(timeout))]
    if host:
        argv += ["-H", f"Host: {host}"]
    out = run([*argv, url], netns=ns, timeout=timeout + 10).split()
    size, secs = int(out[0]), float(out[1])
    return size / secs / 1e6, size
