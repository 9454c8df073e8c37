"""What every scenario shares: rows of repeated measurements, their summary, the
machine description, and processes that are always stopped by pid."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench-results"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
STOP_GRACE_S = 5.0


class BenchError(RuntimeError):
    """A scenario cannot run here; the message says why."""


# ---------------------------------------------------------------- numbers


@dataclass
class Summary:
    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values")
    vs = sorted(values)
    if len(vs) >= 2:
        q1, _, q3 = statistics.quantiles(vs, n=4, method="inclusive")
    else:
        q1 = q3 = vs[0]
    return Summary(statistics.median(vs), vs[0], vs[-1], q1, q3, len(vs))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of raw samples."""
    vs = sorted(values)
    if not vs:
        raise ValueError("no values")
    k = max(0, min(len(vs) - 1, round(p / 100 * len(vs) + 0.5) - 1))
    return vs[k]


@dataclass
class Row:
    """One measured quantity: every run's value, its summary, the ratio to its peer.

    ``better`` is "lower" (costs, latencies) or "higher" (rates). ``ratio`` is this
    row's median over the peer's median; ``target`` is the issue's bound on that
    ratio, ``met`` whether the median ratio honours it.
    """

    name: str
    metric: str
    unit: str
    values: list[float]
    better: str = "higher"
    peer: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    summary: Summary | None = None

    def finish(self) -> Row:
        self.summary = summarize(self.values)
        return self


def relate(rows: list[Row], name: str, peer: str, metric: str,
           bound: tuple[str, float] | None = None) -> None:
    """Set ``ratio`` of row (name, metric) to peer's median; judge it against
    ``bound`` = ("<=" | ">=", factor)."""
    mine = find(rows, name, metric)
    other = find(rows, peer, metric)
    if mine is None or other is None or mine.summary is None or other.summary is None:
        return
    if other.summary.median == 0:
        return
    mine.peer = peer
    mine.ratio = mine.summary.median / other.summary.median
    if bound is not None:
        op, factor = bound
        mine.target = f"{op} {factor:g}x {peer}"
        mine.met = mine.ratio <= factor if op == "<=" else mine.ratio >= factor


def find(rows: list[Row], name: str, metric: str) -> Row | None:
    for r in rows:
        if r.name == name and r.metric == metric:
            return r
    return None


# ---------------------------------------------------------------- results


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "cpu": cpu,
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


@dataclass
class Result:
    scenario: str
    command: str
    quick: bool
    runs: int
    started: str
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # e.g. latency CDFs
    duration_s: float = 0.0
    skipped: str | None = None
    loadavg_at_end: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path = RESULTS_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.scenario}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path


def load_result(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# ---------------------------------------------------------------- processes


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """argv run in network namespace ``netns`` only. nsenter execs the command (so the
    pid we hold is the command's own) and, unlike `ip netns exec`, leaves /sys alone,
    so bpffs at /sys/fs/bpf stays reachable for the daemons."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv] if netns else argv


class Processes:
    """Processes this run started; each is stopped by its own pid, never by name."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], netns: str | None = None, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full = in_netns(netns, argv)
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self.started.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=STOP_GRACE_S)
        if p in self.started:
            self.started.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.started)):
            self.stop(p)


def run(argv: list[str], netns: str | None = None, timeout: float = 60.0,
        check: bool = True) -> str:
    """Run to completion (bounded by ``timeout``); returns stdout."""
    full = in_netns(netns, argv)
    cp = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if check and cp.returncode != 0:
        raise BenchError(f"{' '.join(full)} exited {cp.returncode}: "
                         f"{(cp.stderr or cp.stdout).strip()[-600:]}")
    return cp.stdout


def wait_for(what: str, probe: Any, timeout: float, interval: float = 0.05) -> None:
    """Poll ``probe()`` until true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(interval)
    raise BenchError(f"{what} not ready after {timeout:.0f}s")


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *_descendants(int(child))]
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` and every process below
    them (a multi-process proxy's workers count as the proxy's)."""
    user, system = cpu_split(pids)
    return user + system


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """``cpu_seconds`` as (user, system): the proxy's own code, and the kernel's
    work on its behalf (system calls, and the TCP stack they run)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in {q for p in pids for q in (p, *_descendants(p))}:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
    return user / tick, system / tick


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB; HWM is its peak RSS."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm
