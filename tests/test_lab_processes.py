"""Several HTTP processes per host in the lab (docs/DESIGN.md, "Several processes").

The lab's hosts have 2 CPUs, so every daemon runs two HTTP processes: itself
(process 0) and one child. Both serve the same listeners (SO_REUSEPORT), so a
client's connections land on either; `ss -p` in edge-ord's namespace tells which
process holds each one. The lab's HTTP machines answer with `X-Lab-In-Flight`,
the requests they had open when the request arrived, which is how a test counts
concurrency at the machines themselves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from conftest import LabHandle
from edgeproxy.metrics import http_responses_from_exposition
from edgeproxy.proxy._shared import SharedBudgets
from lab_client import daemon_log, wait_until

FLOOD_LIMIT = 4  # flood-http's hard_limit in the default state (per machine)
# How long after a kill a reconnect may still land on the dying listener.
EXIT_WINDOW_S = 0.3
READY_WITHIN_S = 2.0

# `flood` from many keep-alive connections (one thread each), slow requests, until
# a deadline; prints every answer's status, machine and the machine's in-flight count.
FLOOD = r"""
import http.client, json, sys, threading, time
conns, delay_ms, duration = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
out, lock = [], threading.Lock()
end = time.time() + duration
def worker():
    conn = http.client.HTTPConnection("198.19.0.80", 80, timeout=15,
                                      source_address=("198.18.0.2", 0))
    while time.time() < end:
        try:
            conn.request("GET", "/flood", headers={"Host": "flood.lab",
                                                   "X-Lab-Delay-Ms": delay_ms})
            resp = conn.getresponse()
            resp.read()
            row = [resp.status, resp.getheader("X-Machine-Id"),
                   resp.getheader("X-Lab-In-Flight")]
        except (OSError, http.client.HTTPException) as exc:
            row = [0, repr(exc), None]
            conn.close()
            conn = http.client.HTTPConnection("198.19.0.80", 80, timeout=15,
                                              source_address=("198.18.0.2", 0))
        with lock:
            out.append(row)
threads = [threading.Thread(target=worker) for _ in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""

# Steady keep-alive GETs on N connections (one thread each) for a fixed time; the
# local port of every connection is printed first (one line), then, at the end,
# every request: [connection, local port, sent time, status or 0, error].
STEADY = r"""
import http.client, json, sys, threading, time
conns, rate, duration = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
def connect():
    c = http.client.HTTPConnection("198.19.0.80", 80, timeout=10,
                                   source_address=("198.18.0.2", 0))
    c.connect()
    return c
pool = [connect() for _ in range(conns)]
print(json.dumps([c.sock.getsockname()[1] for c in pool]), flush=True)
out, lock = [], threading.Lock()
start = time.time()
def worker(k):
    conn, n = pool[k], 0
    while True:
        due = start + n / rate
        if due - start >= duration:
            break
        time.sleep(max(0.0, due - time.time()))
        n += 1
        port, sent = conn.sock.getsockname()[1] if conn.sock else 0, time.time()
        try:
            conn.request("GET", "/steady", headers={"Host": "web.lab"})
            resp = conn.getresponse()
            resp.read()
            row = [k, port, sent, resp.status, None]
        except (OSError, http.client.HTTPException) as exc:
            row = [k, port, sent, 0, repr(exc)]
            conn.close()
            conn = connect()
        with lock:
            out.append(row)
threads = [threading.Thread(target=worker, args=(k,)) for k in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""

# Opens N new connections, one GET each, and keeps them open until stdin closes.
HOLD = r"""
import http.client, json, sys
held, out = [], []
for _ in range(int(sys.argv[1])):
    c = http.client.HTTPConnection("198.19.0.80", 80, timeout=10,
                                   source_address=("198.18.0.2", 0))
    c.request("GET", "/new", headers={"Host": "web.lab"})
    r = c.getresponse()
    r.read()
    out.append([c.sock.getsockname()[1], r.status])
    held.append(c)
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


@dataclass(frozen=True)
class EdgeProcesses:
    daemon: int  # HTTP process 0
    child: int  # HTTP process 1
    budgets: str  # /proc/<daemon>/fd/<n>: the shared segment (debug reads)
    log_offset: int  # where the daemon's log was when they were found


def edge_processes(node: str = "edge-ord") -> EdgeProcesses:
    """The running daemon's HTTP processes, from its log (the last start)."""
    text = daemon_log(node).read_bytes().decode(errors="replace")
    starts = list(re.finditer(r"shared budgets: \d+ rows, fd \d+ \((/proc/(\d+)/fd/\d+)\)", text))
    assert starts, f"{node}'s daemon runs one HTTP process (no shared budgets in its log)"
    last = starts[-1]
    ready = re.findall(r"http process 1 ready: pid (\d+)", text[last.end():])
    assert ready, f"{node}'s HTTP process 1 never became ready"
    return EdgeProcesses(int(last.group(2)), int(ready[-1]), last.group(1), len(text.encode()))


def owners(lab: LabHandle, node: str = "edge-ord") -> dict[int, int]:
    """Client port -> pid of the process holding the connection, on port 80."""
    done = lab.exec(node, "ss", "-Htnp", "state", "established", "( sport = :80 )")
    assert done.returncode == 0, done.stderr
    out: dict[int, int] = {}
    for line in done.stdout.splitlines():
        peer = re.search(r"198\.18\.0\.2:(\d+)", line)
        pid = re.search(r"pid=(\d+)", line)
        if peer and pid:
            out[int(peer.group(1))] = int(pid.group(1))
    return out


def flood_responses(lab: LabHandle, node: str = "edge-ord") -> dict[str, int]:
    """flood's responses by status on the node's one /metrics (every process summed)."""
    done = lab.exec(node, "curl", "-s", "--max-time", "5", "http://127.0.0.1:9109/metrics")
    assert done.returncode == 0, done.stderr
    return http_responses_from_exposition(done.stdout).get("flood", {})


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def default_state(lab: LabHandle) -> None:
    lab.reset_state()


@pytest.mark.root
@pytest.mark.lab
def test_two_processes_share_one_hard_limit_exactly(lab: LabHandle,
                                                    default_state: None) -> None:
    procs = edge_processes()
    assert procs.daemon != procs.child
    fd = os.open(procs.budgets, os.O_RDWR)
    budgets = SharedBudgets(fd, 0)  # reads only
    samples: list[tuple[int, list[int]]] = []
    stop = threading.Event()

    def sample() -> None:  # the shared counters of flood-ord-1, throughout the flood
        while not stop.is_set():
            row = budgets.find("flood-ord-1")
            if row >= 0:
                samples.append((budgets.total(row), budgets.counts(row)))
            time.sleep(0.002)

    before = flood_responses(lab)
    # 24 connections of 300 ms requests against a hard_limit of 4 per machine:
    # six times what the app may have in flight at the nearest machine.
    flood = lab.popen("client", sys.executable, "-c", FLOOD, "24", "300", "6",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(2.0)
        held = owners(lab)
        out, err = flood.communicate(timeout=60)
    finally:
        stop.set()
        sampler.join(timeout=10)
        _stop(flood)
        budgets.close()
        os.close(fd)
    assert flood.returncode == 0, err
    after = flood_responses(lab)
    rows = json.loads(out)
    pids = set(held.values())
    ok = [r for r in rows if r[0] == 200]
    by_machine: dict[str, list[int]] = {}
    for _, machine, in_flight in ok:
        by_machine.setdefault(machine, []).append(int(in_flight))
    statuses: dict[int, int] = {}
    for r in rows:
        statuses[r[0]] = statuses.get(r[0], 0) + 1
    figures = (f"statuses {statuses}; in-flight at the machines, max "
               f"{ {m: max(v) for m, v in by_machine.items()} }; connections per pid "
               f"{ {p: list(held.values()).count(p) for p in pids} }; shared samples "
               f"{len(samples)}, totals seen {sorted({t for t, _ in samples})}")
    print(figures)
    # the machines never had more than hard_limit in flight, and the limit was reached
    assert set(by_machine) <= {"flood-ord-1", "flood-ams-1"}, figures
    for counts in by_machine.values():
        assert max(counts) <= FLOOD_LIMIT, figures
    assert max(by_machine["flood-ord-1"]) == FLOOD_LIMIT, figures
    # both HTTP processes held flood connections, and both took shared slots
    assert {procs.daemon, procs.child} <= pids, figures
    assert any(c[0] > 0 for _, c in samples) and any(c[1] > 0 for _, c in samples), figures
    # the shared count of the nearest machine, sampled every ~2 ms: never above either
    assert len(samples) > 500, figures
    assert max(t for t, _ in samples) <= FLOOD_LIMIT, figures
    assert max(t for t, _ in samples) == FLOOD_LIMIT, figures
    assert set(statuses) <= {200, 503} and statuses.get(200, 0) > 50, figures
    # one /metrics counts every process's answers: exactly what the client got
    counted = {int(k): v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert counted == statuses, (counted, figures)


@pytest.mark.root
@pytest.mark.lab
def test_killed_http_process_is_replaced_and_others_keep_serving(
        lab: LabHandle, default_state: None) -> None:
    procs = edge_processes()
    conns, rate, seconds = 12, 20.0, 8.0
    load = lab.popen("client", sys.executable, "-c", STEADY, str(conns), str(rate), str(seconds),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hold: subprocess.Popen[str] | None = None
    try:
        assert load.stdout is not None
        ports = json.loads(load.stdout.readline())
        held = owners(lab)
        on = {port: held.get(port) for port in ports}
        time.sleep(3.0)
        killed_at = time.monotonic()
        os.kill(procs.child, signal.SIGKILL)  # the HTTP child this test's lab started

        def replacement() -> int | None:
            text = daemon_log().read_bytes()[procs.log_offset:].decode(errors="replace")
            found = re.findall(r"http process 1 ready: pid (\d+)", text)
            return int(found[-1]) if found else None

        new_pid = wait_until("a replacement HTTP process is ready", replacement,
                             READY_WITHIN_S + 1.0, every_s=0.02)
        ready_after = time.monotonic() - killed_at
        # the replacement serves: new connections land on it too
        hold = lab.popen("client", sys.executable, "-c", HOLD, "16",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert hold.stdout is not None
        fresh = json.loads(hold.stdout.readline())
        fresh_owners = owners(lab)
        out, err = load.communicate(timeout=60)
    finally:
        _stop(load)
        if hold is not None:
            _stop(hold)
    assert load.returncode == 0, err
    rows = json.loads(out.splitlines()[-1])
    errors = [r for r in rows if r[3] != 200]
    survivors = [k for k, port in enumerate(ports) if on[port] == procs.daemon]
    victims = [k for k, port in enumerate(ports) if on[port] == procs.child]
    figures = (f"{len(rows)} requests, {len(errors)} errors {errors[:6]}; connections on "
               f"process 0: {survivors}, on the killed child: {victims}; replacement pid "
               f"{new_pid} ready {ready_after:.2f}s after the kill; new connections "
               f"{[(s, fresh_owners.get(p)) for p, s in fresh]}")
    print(figures)
    assert survivors and victims, figures  # 12 connections spread over both processes
    assert ready_after <= READY_WITHIN_S, figures
    assert new_pid not in (procs.daemon, procs.child), figures
    # no error on a connection the surviving process held; the killed child's
    # connections failed once each (then reconnected and carried on). One more reset
    # is possible for a reconnect made while the killed process still exits: the
    # kernel closes a process's sockets after freeing its memory, and until then
    # SO_REUSEPORT still hashes new connections to its listener (seen once: 50 ms).
    assert not [r for r in errors if r[0] in survivors], figures
    assert all(r[0] in victims for r in errors), figures
    for k in victims:
        times = sorted(r[2] for r in errors if r[0] == k)
        assert len(times) <= 1 or (len(times) == 2 and times[1] - times[0] <= EXIT_WINDOW_S), (
            figures)
    assert len(rows) - len(errors) >= 0.9 * conns * rate * seconds - conns, figures
    # the replacement holds some of 16 new connections, and every one was answered
    assert all(s == 200 for _, s in fresh), figures
    assert new_pid in {fresh_owners.get(p) for p, _ in fresh}, figures
    # every connection, the killed child's reconnected ones too, served to the end
    end = max(r[2] for r in rows)
    assert all(any(r[0] == k and r[3] == 200 and r[2] > end - 2 for r in rows)
               for k in range(conns)), figures
