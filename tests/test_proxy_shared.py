"""The shared in-flight counters (proxy/_shared.pyx) without root: exactness of a
limit under two real processes hammering one key, and crash cleanup."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from edgeproxy.proxy._shared import SharedBudgets, key_of, segment_size
from edgeproxy.proxy.processes import merge_snapshots
from edgeproxy.proxy.stats import ProxySnapshot

FORK = multiprocessing.get_context("fork")
LIMIT = 3
HAMMER_S = 1.5


@pytest.fixture
def budgets() -> Iterator[SharedBudgets]:
    b = SharedBudgets.create(1 << 10, 3)
    try:
        yield b
    finally:
        b.close()
        os.close(b.fd)


def test_rows_limits_and_counts(budgets: SharedBudgets) -> None:
    assert key_of("web-ord-1") == key_of("web-ord-1") != key_of("web-ord-2")
    assert os.fstat(budgets.fd).st_size == segment_size(1 << 10, 3)
    assert budgets.find("web-ord-1") == -1
    row = budgets.row("web-ord-1")
    assert row >= 0 and budgets.row("web-ord-1") == row == budgets.find("web-ord-1")
    assert budgets.row("web-ord-2") != row
    assert [budgets.try_acquire(row, 2) for _ in range(3)] == [True, True, False]
    other = SharedBudgets(budgets.fd, 2)  # a second handle on the same memory, column 2
    assert other.row("web-ord-1") == row and not other.try_acquire(row, 2)
    budgets.release(row)
    assert other.try_acquire(row, 2)
    assert budgets.total(row) == 2 and budgets.counts(row) == [1, 0, 1]
    other.acquire(row)  # a grant above the limit is possible only on purpose
    assert budgets.total(row) == 3 and budgets.used_rows() == 2
    other.close()
    with pytest.raises(ValueError, match="outside"):
        SharedBudgets(budgets.fd, 3)


def test_not_a_segment(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "junk")
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="magic"):
            SharedBudgets(fd, 0)
    finally:
        os.close(fd)


def test_full_table_says_no_room() -> None:
    b = SharedBudgets.create(4, 1)
    try:
        rows = [b.row(f"m{i}") for i in range(4)]
        assert sorted(rows) == [0, 1, 2, 3] and b.row("m-extra") == -1
    finally:
        b.close()
        os.close(b.fd)


def _hammer(fd: int, process: int, machine: str, seconds: float, out: Connection) -> None:
    """Take slots greedily up to the limit, check the host-wide total after each
    success, give them all back; repeat."""
    b = SharedBudgets(fd, process)
    row = b.row(machine)
    taken = worst = rounds = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        held = 0
        while b.try_acquire(row, LIMIT):
            held += 1
            taken += 1
            worst = max(worst, b.total(row))
        for _ in range(held):
            b.release(row)
        rounds += 1
    out.send((taken, worst, rounds))
    out.close()


def test_two_processes_never_exceed_the_limit(budgets: SharedBudgets) -> None:
    row = budgets.row("flood-ord-1")
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    procs = [FORK.Process(target=_hammer, args=(budgets.fd, i + 1, "flood-ord-1", HAMMER_S, w))
             for i, (_, w) in enumerate(pipes)]
    for p in procs:
        p.start()
    samples, above = 0, 0
    seen: set[int] = set()
    try:
        while any(p.is_alive() for p in procs):
            total = budgets.total(row)
            samples += 1
            seen.add(total)
            above += total > LIMIT
        results = [r.recv() for r, _ in pipes]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    print(f"samples {samples}, totals seen {sorted(seen)}, per process (taken, worst, rounds) "
          f"{results}")
    assert all(p.exitcode == 0 for p in procs)
    assert above == 0 and max(seen) <= LIMIT
    for taken, worst, rounds in results:
        assert taken > 10_000 and rounds > 1_000  # both really contended
        assert worst <= LIMIT
    assert LIMIT in seen  # the limit was reached, and held
    assert budgets.total(row) == 0 and budgets.counts(row) == [0, 0, 0]


def _hold_and_die(fd: int, process: int, ready: Connection) -> None:
    b = SharedBudgets(fd, process)
    for machine, n in (("a", 2), ("b", 1)):
        row = b.row(machine)
        for _ in range(n):
            assert b.try_acquire(row, 10)
    ready.send("held")
    time.sleep(60)


def test_a_dead_process_slots_are_given_back(budgets: SharedBudgets) -> None:
    a, b = budgets.row("a"), budgets.row("b")
    assert budgets.try_acquire(a, 10)  # process 0's own slot stays
    r, w = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_hold_and_die, args=(budgets.fd, 2, w))
    proc.start()
    try:
        assert r.poll(10) and r.recv() == "held"
        assert (budgets.total(a), budgets.total(b)) == (3, 1)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    assert (budgets.total(a), budgets.total(b)) == (3, 1)  # the dead still count ...
    assert budgets.reap(2) == 3  # ... until the supervisor gives their slots back
    assert (budgets.total(a), budgets.total(b)) == (1, 0)
    assert budgets.counts(a) == [1, 0, 0] and budgets.counts(b) == [0, 0, 0]
    assert budgets.reap(2) == 0


def test_host_metrics_sum_every_process() -> None:
    def snap(n: int) -> ProxySnapshot:
        return ProxySnapshot(
            responses={("web", 200): n}, in_flight={("web", "m1"): n}, queue_depth={"web": 1},
            retries={"web": n}, replays={}, response_seconds={"web": ((0.1, n), (float("inf"), n))},
            response_seconds_sum={"web": 0.5 * n}, backhaul={}, cpu_seconds={"web": 0.25},
            lane_requests=n, general_requests=1, backhaul_refused=n)

    total = merge_snapshots([snap(1), snap(2), snap(4)])
    assert total.responses == {("web", 200): 7} and total.in_flight == {("web", "m1"): 7}
    assert total.queue_depth == {"web": 3} and total.retries == {"web": 7}
    assert total.response_seconds == {"web": ((0.1, 7), (float("inf"), 7))}
    assert total.response_seconds_sum == {"web": 3.5} and total.cpu_seconds == {"web": 0.75}
    assert (total.lane_requests, total.general_requests, total.backhaul_refused) == (7, 3, 7)
    assert total.cpu_throttled == {}
