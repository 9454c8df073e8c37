"""Health checks against small asyncio TCP/HTTP servers on loopback (127.0.0.x).

Intervals are 50 ms; waits are generous bounds (seconds), never exact timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field

import pytest

from edgeproxy.health import FAILURES_TO_FAIL, HealthChecker, Target, machine_targets
from edgeproxy.state import ClusterState, parse_state

INTERVAL_MS = 50
WAIT = 3.0  # seconds: a generous bound for anything that should take a few intervals
_addresses = itertools.count(2)


def loopback_address() -> str:
    """A fresh 127.0.0.x per machine, so tests never share a listener."""
    n = next(_addresses)
    return f"127.0.{n // 250}.{n % 250 + 2}"


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def cluster(
    machines: dict[str, str],
    port: int,
    check: dict[str, object],
    stopped: frozenset[str] = frozenset(),
) -> ClusterState:
    """One region, one worker, one app with one service checked by ``check``."""
    return parse_state(
        {
            "version": 1,
            "regions": [{"code": "lo", "position": [0, 0]}],
            "hosts": [{"id": "w1", "role": "worker", "region": "lo", "address": "10.255.1.1"}],
            "apps": [{"name": "app", "addresses": ["10.255.0.1"]}],
            "services": [
                {
                    "id": "app-svc",
                    "app": "app",
                    "protocol": "tcp",
                    "ports": [80],
                    "internal_port": port,
                    "handlers": [],
                    "concurrency": {"type": "connections", "soft_limit": 10, "hard_limit": 20},
                    "checks": [check],
                }
            ],
            "machines": [
                {
                    "id": machine_id,
                    "app": "app",
                    "host": "w1",
                    "address": address,
                    "state": "stopped" if machine_id in stopped else "started",
                }
                for machine_id, address in machines.items()
            ],
        },
        "test",
    )


def tcp_check(**extra: object) -> dict[str, object]:
    return {"type": "tcp", "interval_ms": INTERVAL_MS, "timeout_ms": 40, "grace_ms": 0, **extra}


def http_check(**extra: object) -> dict[str, object]:
    check = {"type": "http", "path": "/healthz", "interval_ms": INTERVAL_MS, "timeout_ms": 40}
    return {**check, "grace_ms": 0, **extra}


@dataclass
class Machine:
    """A listener standing in for a machine: TCP accept, HTTP status, or silence."""

    address: str
    port: int
    mode: str = "tcp"  # "tcp", "http" or "silent" (accepts, reads, never answers)
    status: int = 200
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.address, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.mode == "http":
                self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                await writer.drain()
            elif self.mode == "silent":
                await reader.read()  # until the checker gives up and closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def wait_until(condition: Callable[[], bool], what: str, bound: float = WAIT) -> float:
    """Poll ``condition`` until true; returns how long it took. Fails after ``bound``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < bound, f"not {what} within {bound} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def checking(
    state: ClusterState,
    *,
    on_change: Callable[[str, bool], None] | None = None,
    max_concurrent: int = 64,
    check: Callable[[Target], Awaitable[str | None]] | None = None,
) -> AsyncIterator[HealthChecker]:
    checker = HealthChecker(state, on_change=on_change, max_concurrent=max_concurrent, check=check)
    await checker.start()
    try:
        yield checker
    finally:
        await checker.stop()


def run(scenario: Callable[[], Coroutine[object, object, None]]) -> None:
    asyncio.run(scenario())


# -------------------------------------------------------------------------- tests


def test_targets_are_started_machines_times_their_services_checks() -> None:
    state = cluster({"a": "127.0.0.2", "b": "127.0.0.3"}, 8080, tcp_check(), frozenset({"b"}))
    targets = machine_targets(state)
    assert list(targets) == ["a"]
    (target,) = targets["a"]
    assert (target.address, target.port, target.check.type) == ("127.0.0.2", 8080, "tcp")


def test_tcp_machine_passes_leaves_when_stopped_and_returns() -> None:
    async def scenario() -> None:
        address = loopback_address()
        machine = Machine(address, free_port(address))
        await machine.start()
        flips: list[tuple[str, bool]] = []
        state = cluster({"m1": address}, machine.port, tcp_check())
        async with checking(state, on_change=lambda mid, ok: flips.append((mid, ok))) as checker:
            await asyncio.sleep(6 * INTERVAL_MS / 1000)  # several rounds, all passing
            assert checker.healthy("m1") and flips == [] and not checker.changed.is_set()

            await machine.stop()
            down = await wait_until(lambda: not checker.healthy("m1"), "unhealthy")
            assert checker.changed.is_set() and flips == [("m1", False)]
            assert checker.unhealthy() == {"m1"}
            assert "ConnectionRefusedError" in (checker.last_error("m1") or "")
            checker.changed.clear()

            await machine.start()
            up = await wait_until(lambda: checker.healthy("m1"), "healthy again")
            assert checker.changed.is_set() and flips == [("m1", False), ("m1", True)]
            print(f"tcp: down after {down * 1000:.0f} ms, up after {up * 1000:.0f} ms")
        await machine.stop()

    run(scenario)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (302, True), (500, False)])
def test_http_check_wants_2xx_or_3xx(status: int, healthy: bool) -> None:
    async def scenario() -> None:
        address = loopback_address()
        machine = Machine(address, free_port(address), mode="http", status=status)
        await machine.start()
        async with checking(cluster({"m1": address}, machine.port, http_check())) as checker:
            await wait_until(lambda: len(machine.requests) >= FAILURES_TO_FAIL + 1, "checked")
            await asyncio.sleep(INTERVAL_MS / 1000)  # the last answer is recorded
            assert checker.healthy("m1") is healthy
            if not healthy:
                assert checker.last_error("m1") == f"HTTP {status}"
        await machine.stop()
        assert machine.requests[0].startswith(b"GET /healthz HTTP/1.1\r\n")

    run(scenario)


def test_http_machine_recovers_when_it_answers_200_again() -> None:
    async def scenario() -> None:
        address = loopback_address()
        machine = Machine(address, free_port(address), mode="http", status=500)
        await machine.start()
        async with checking(cluster({"m1": address}, machine.port, http_check())) as checker:
            await wait_until(lambda: not checker.healthy("m1"), "unhealthy")
            machine.status = 204
            await wait_until(lambda: checker.healthy("m1"), "healthy again")
        await machine.stop()

    run(scenario)


def test_a_machine_that_never_answers_times_out() -> None:
    async def scenario() -> None:
        address = loopback_address()
        machine = Machine(address, free_port(address), mode="silent")
        await machine.start()
        check = http_check(timeout_ms=100, interval_ms=150)
        checker = HealthChecker(cluster({"m1": address}, machine.port, check))
        await checker.start()
        try:
            await wait_until(lambda: not checker.healthy("m1"), "unhealthy")
            assert checker.last_error("m1") == "no answer within 100 ms"
        finally:
            started = time.monotonic()
            await checker.stop()  # with a check likely hanging in flight
            assert time.monotonic() - started < 1.0
        await machine.stop()

    run(scenario)


def test_tcp_connect_timeout_is_bounded() -> None:
    """A listener whose accept queue is full drops SYNs: the connect hangs, the check not."""

    async def scenario() -> None:
        address = loopback_address()
        listener = socket.socket()
        fillers: list[socket.socket] = []
        try:
            listener.bind((address, 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            for _ in range(3):  # fill the queue; never accepted
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect((address, port))
                fillers.append(filler)
            await asyncio.sleep(0.05)
            try:
                await asyncio.wait_for(asyncio.open_connection(address, port), 0.3)
            except TimeoutError:
                pass  # as intended: the SYN is dropped
            else:
                pytest.skip("this kernel accepted beyond a full backlog")
            check = tcp_check(timeout_ms=80, interval_ms=100)
            async with checking(cluster({"m1": address}, port, check)) as checker:
                await wait_until(lambda: not checker.healthy("m1"), "unhealthy")
                assert checker.last_error("m1") == "no answer within 80 ms"
        finally:
            for filler in fillers:
                filler.close()
            listener.close()

    run(scenario)


def test_failures_do_not_count_during_grace() -> None:
    async def scenario() -> None:
        address = loopback_address()  # nothing listens: every check fails
        state = cluster({"m1": address}, free_port(address), tcp_check(grace_ms=800))
        started = time.monotonic()
        async with checking(state) as checker:
            await asyncio.sleep(0.4)  # eight failed rounds, all in grace
            assert checker.healthy("m1")
            assert checker.last_error("m1") is not None  # it did fail; it just did not count
            await wait_until(lambda: not checker.healthy("m1"), "unhealthy after grace")
            assert time.monotonic() - started >= 0.8

    run(scenario)


def test_update_restarts_checks_for_changed_machines() -> None:
    async def scenario() -> None:
        address = loopback_address()
        port = free_port(address)
        failing = cluster({"m1": address}, port, tcp_check())
        async with checking(failing) as checker:
            await wait_until(lambda: not checker.healthy("m1"), "unhealthy")
            checker.changed.clear()

            # Stopped: not judged by health any more, and the unhealthy set changed.
            checker.update(cluster({"m1": address}, port, tcp_check(), frozenset({"m1"})))
            assert checker.healthy("m1") and checker.unhealthy() == frozenset()
            assert checker.changed.is_set()

            # Started again with a grace period: presumed healthy until it runs out.
            checker.update(cluster({"m1": address}, port, tcp_check(grace_ms=500)))
            await asyncio.sleep(0.2)
            assert checker.healthy("m1")
            await wait_until(lambda: not checker.healthy("m1"), "unhealthy after grace")

            # The same state again changes nothing: the tally carries on.
            checker.changed.clear()
            checker.update(cluster({"m1": address}, port, tcp_check(grace_ms=500)))
            assert not checker.healthy("m1") and not checker.changed.is_set()

    run(scenario)


def test_checks_in_flight_never_exceed_the_bound() -> None:
    in_flight = 0
    most = 0
    checked: set[str] = set()

    async def slow_pass(target: Target) -> str | None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        checked.add(target.address)
        return None

    async def scenario() -> None:
        machines = {f"m{i}": f"127.0.9.{i + 1}" for i in range(30)}
        state = cluster(machines, 8080, tcp_check())
        async with checking(state, max_concurrent=3, check=slow_pass):
            await wait_until(lambda: len(checked) == len(machines), "every machine checked")

    run(scenario)
    assert most == 3


def test_stop_is_clean_and_start_after_update_without_a_loop() -> None:
    address = loopback_address()  # nothing listens
    state = cluster({"m1": address}, free_port(address), tcp_check())
    checker = HealthChecker()
    checker.update(state)  # no loop yet: kept until start()

    async def scenario() -> None:
        await checker.start()
        await wait_until(lambda: not checker.healthy("m1"), "checked and found down")
        await checker.stop()
        await checker.stop()  # twice is fine

    run(scenario)
