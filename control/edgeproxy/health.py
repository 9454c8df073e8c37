"""Health checks: which started machines are candidates for new work.

Each started machine runs the checks of every service of its app (``Service.checks``)
against ``address:internal_port``, every ``interval_ms``, each bounded by
``timeout_ms``. The daemon runs inside an edge's network namespace, where machine
addresses are routed, so it checks machines directly.

- ``tcp``: the connection opens.
- ``http``: ``GET <path>`` answers with a 2xx or 3xx status.

Thresholds, per check: ``FAILURES_TO_FAIL`` (2) consecutive failures take it down,
``SUCCESSES_TO_PASS`` (1) success brings it back; a machine is healthy when all its
checks are up. One failure is not enough because a single lost SYN or a slow GC
pause is not an outage, and every flip rewrites kernel maps; one success is enough
because a machine that answers is worth using again at once.

A machine is presumed healthy when it appears (or reappears: started again, moved,
or its checks changed), and failures only count once ``grace_ms`` has passed since.
So a daemon that just started keeps full tables instead of emptying every service
until the first round completes (SPEC: never a window without backends), and a
booting machine gets ``grace_ms`` to start listening before it is taken out.

Scheduling: one dispatcher keeps a heap of (due time, check); at most
``max_concurrent`` checks run at once, so a state with very many machines queues
checks rather than opening unbounded sockets. Memory is one small record per
(machine, check), not a task per check.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edgeproxy.state import Check, ClusterState

log = logging.getLogger(__name__)

FAILURES_TO_FAIL = 2  # consecutive failures that take a check down
SUCCESSES_TO_PASS = 1  # consecutive successes that bring it back up
DEFAULT_MAX_CONCURRENT = 256  # checks in flight at once, across all machines
MAX_STATUS_LINE = 8192  # bytes: an HTTP status line longer than this is a failure
DEFAULT_HTTP_PATH = "/"


@dataclass(frozen=True, slots=True)
class Target:
    """One check of one machine: what to connect to and how to judge it."""

    address: str
    port: int
    check: Check


@dataclass(eq=False)
class _Probe:
    """A target's running tally. ``retired`` stops it being scheduled again."""

    machine_id: str
    target: Target
    counts_after: float  # loop time when grace ends and failures start to count
    up: bool = True
    failures: int = 0
    successes: int = 0
    last_error: str | None = None
    retired: bool = False


@dataclass
class _Machine:
    plan: tuple[Target, ...]  # what this machine is checked with; a new plan is a new record
    probes: list[_Probe] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(p.up for p in self.probes)


def machine_targets(state: ClusterState) -> dict[str, tuple[Target, ...]]:
    """Every started machine that has checks, and its targets (services by id)."""
    plans: dict[str, tuple[Target, ...]] = {}
    for machine in state.machines.values():
        if machine.state != "started":
            continue
        services = sorted(state.services_by_app.get(machine.app, ()), key=lambda s: s.id)
        targets = tuple(
            Target(str(machine.address), service.internal_port, check)
            for service in services
            for check in service.checks
        )
        if targets:
            plans[machine.id] = targets
    return plans


async def run_check(target: Target) -> str | None:
    """Run one check, bounded by its timeout; None when it passes, else why it failed."""
    timeout = target.check.timeout_ms / 1000
    try:
        async with asyncio.timeout(timeout):
            if target.check.type == "http":
                return await _http_check(target)
            return await _tcp_check(target)
    except TimeoutError:
        return f"no answer within {target.check.timeout_ms} ms"
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"


async def _tcp_check(target: Target) -> str | None:
    _, writer = await asyncio.open_connection(target.address, target.port)
    await _close(writer)
    return None


async def _http_check(target: Target) -> str | None:
    reader, writer = await asyncio.open_connection(
        target.address, target.port, limit=MAX_STATUS_LINE
    )
    try:
        path = target.check.path or DEFAULT_HTTP_PATH
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {target.address}:{target.port}\r\n"
            "User-Agent: edgeproxy-health\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            return "status line too long"
        except asyncio.IncompleteReadError:
            return "connection closed before a status line"
    finally:
        await _close(writer)
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return f"not an HTTP status line: {line[:80]!r}"
    status = int(parts[1])
    return None if 200 <= status < 400 else f"HTTP {status}"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class HealthChecker:
    """Runs every started machine's checks and keeps who is healthy.

    ``update(state)`` says what to check (call it with every new state, before or
    after ``start()``); ``healthy`` answers for placement; ``changed`` is set
    whenever the healthy set changes, so the daemon re-runs placement and clears it.
    ``on_change(machine_id, healthy)``, if given, hears each flip. ``check`` replaces
    the network check (for tests of the bookkeeping).
    """

    def __init__(
        self,
        state: ClusterState | None = None,
        *,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        on_change: Callable[[str, bool], None] | None = None,
        check: Callable[[Target], Awaitable[str | None]] | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.changed = asyncio.Event()
        self._on_change = on_change
        self._check = check or run_check
        self._slots = asyncio.Semaphore(max_concurrent)
        self._machines: dict[str, _Machine] = {}
        self._due: list[tuple[float, int, _Probe]] = []  # heap by due time
        self._order = itertools.count()  # heap tie-break: probes do not compare
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._pending_state = state
        self._stopping = False

    # ------------------------------------------------------------------ queries

    def healthy(self, machine_id: str) -> bool:
        """False only for a machine whose checks are failing.

        A machine without checks, not started, or not known is not judged here:
        placement decides on ``state`` and presumes health (see module doc).
        """
        machine = self._machines.get(machine_id)
        return machine is None or machine.healthy

    def unhealthy(self) -> frozenset[str]:
        """Machines currently failing their checks (for metrics and the CLI)."""
        return frozenset(mid for mid, m in self._machines.items() if not m.healthy)

    def last_error(self, machine_id: str) -> str | None:
        """Why the machine's most recent failing check failed, if one is failing now."""
        machine = self._machines.get(machine_id)
        if machine is None:
            return None
        return next((p.last_error for p in machine.probes if p.last_error), None)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._dispatcher is not None:
            return
        self._stopping = False
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.update(state)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="health-dispatch")

    async def stop(self) -> None:
        """Cancel the dispatcher and every check in flight; waits for them to end.

        The flag ends the dispatcher's loop even if a cancellation is lost in a race
        with a timeout (possible on Python 3.11).
        """
        self._stopping = True
        self._wake.set()
        tasks = [*self._running]
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
            self._dispatcher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()

    def update(self, state: ClusterState) -> None:
        """Check what ``state`` says: new machines start, gone ones stop, others go on."""
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # no loop yet: schedule when start() runs
            self._pending_state = state
            return
        before = self.unhealthy()
        wanted = machine_targets(state)
        for machine_id in [mid for mid in self._machines if mid not in wanted]:
            self._retire(self._machines.pop(machine_id))
        for machine_id, plan in wanted.items():
            current = self._machines.get(machine_id)
            if current is not None and current.plan == plan:
                continue  # unchanged: keep its tally and its schedule
            if current is not None:
                self._retire(current)
            self._machines[machine_id] = self._new_machine(machine_id, plan, now)
        self._wake.set()
        if self.unhealthy() != before:
            self.changed.set()

    def _new_machine(self, machine_id: str, plan: tuple[Target, ...], now: float) -> _Machine:
        machine = _Machine(plan)
        for target in plan:
            probe = _Probe(machine_id, target, counts_after=now + target.check.grace_ms / 1000)
            machine.probes.append(probe)
            # First run spread over one interval, so a big state does not check
            # every machine in the same instant.
            first = now + random.uniform(0, target.check.interval_ms / 1000)
            self._schedule(probe, first)
        return machine

    def _retire(self, machine: _Machine) -> None:
        for probe in machine.probes:
            probe.retired = True  # its heap entry is skipped when it comes due

    def _schedule(self, probe: _Probe, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._order), probe))

    # --------------------------------------------------------------- scheduling

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            now = loop.time()
            while self._due and self._due[0][0] <= now:
                due, _, probe = heapq.heappop(self._due)
                if probe.retired:
                    continue
                await self._slots.acquire()
                if self._stopping:
                    self._slots.release()
                    return  # bounded concurrency: wait for a free slot
                task = asyncio.create_task(self._probe_once(probe, due))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                now = loop.time()
            self._wake.clear()
            # A timer sets the same event as update() and finished checks do; a plain
            # Event.wait is simpler to cancel than wait_for, which on Python 3.11 can
            # lose a cancellation that races its timeout.
            timer = loop.call_at(self._due[0][0], self._wake.set) if self._due else None
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _probe_once(self, probe: _Probe, due: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            error = await self._check(probe.target)
        finally:
            self._slots.release()
        if probe.retired:
            return
        self._record(probe, error, loop.time())
        # Keep the cadence; if we fell behind (slots all busy), go again as soon as
        # possible rather than catching up with a burst.
        interval = probe.target.check.interval_ms / 1000
        self._schedule(probe, max(due + interval, loop.time()))
        self._wake.set()

    def _record(self, probe: _Probe, error: str | None, now: float) -> None:
        machine = self._machines.get(probe.machine_id)
        was_healthy = machine.healthy if machine is not None else True
        if error is None:
            probe.failures, probe.last_error = 0, None
            probe.successes += 1
            if not probe.up and probe.successes >= SUCCESSES_TO_PASS:
                probe.up = True
        else:
            probe.successes, probe.last_error = 0, error
            if now < probe.counts_after:
                return  # in grace: the machine may still be starting
            probe.failures += 1
            if probe.up and probe.failures >= FAILURES_TO_FAIL:
                probe.up = False
        if machine is not None and machine.healthy != was_healthy:
            self._announce(probe.machine_id, machine.healthy, probe)

    def _announce(self, machine_id: str, healthy: bool, probe: _Probe) -> None:
        target = probe.target
        if healthy:
            log.info("machine %s healthy again", machine_id)
        else:
            log.warning(
                "machine %s unhealthy: %s check on %s:%d: %s",
                machine_id,
                target.check.type,
                target.address,
                target.port,
                probe.last_error,
            )
        self.changed.set()
        if self._on_change is not None:
            self._on_change(machine_id, healthy)
