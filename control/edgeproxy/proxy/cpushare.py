"""Per-app CPU time for the HTTP proxy: measured, exported, and bounded.

Every app's requests run on one event loop, so without a bound an app that sends
cheap-to-refuse or expensive-to-parse requests fast enough takes the loop from
everyone else, even while its concurrency limit keeps its machines safe.

Measurement (``CpuMeter``): the task serving a request is tagged with its app (the
task's name, set when the request is routed). The meter installs a task factory
that wraps each task's coroutine, so every step of every task is timed while the
process is busy (above ``BUSY`` of a core; below that nothing needs bounding and
a step costs one attribute check). Each tick (``TICK``) the process CPU time
spent since the last tick is shared among the apps in proportion to their
timed steps: work no step is tagged for (loop internals, the shared backhaul
reader, protocol callbacks) is shared out in the same proportion, as it is work
done for the apps being served. A sampling thread was tried first and rejected:
it can only look while holding the GIL, which the loop thread hands over mostly
in epoll, between task steps, so its samples missed the work they should count.

Policy (``CpuBudgets``, sans-IO): while at least two apps had requests within
``CONTENDED_FOR`` (0.25) seconds, each app may use at most ``limit`` of one core: a
token bucket per app, refilled at ``limit`` CPU-seconds per second, holding at
most ``limit * BURST`` seconds (and owing at most ``limit`` seconds). An app whose bucket
is below zero is throttled: its new requests wait (the connection is not read
meanwhile, so the kernel's socket buffers absorb the client's pressure, not our
memory) until a tick refills it, and give up with 503 + Retry-After after the
queue timeout. An app alone on the proxy is never throttled: CPU nobody else
asks for is not withheld.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

TICK = 0.1  # seconds between accounting passes (on the loop)
# Process CPU share (of one core) above which task steps are timed. Well below
# MIN_LIMIT, or an app held at its limit would drop the process under BUSY, go
# unmeasured for a tick and run free: the throttle would oscillate.
BUSY = 0.05
MIN_LIMIT = 0.1
BURST = 0.25  # seconds of ``limit`` an idle app may spend at once
# An app's requests count as competing for this long. 1 s was tried: an app that
# had just stopped kept the next one throttled for a second (the http bench's
# backhaul case, right after the local one, saw p99 35-75 ms instead of ~10 ms).
CONTENDED_FOR = 0.25
TAG_PREFIX = "app:"


@dataclass(slots=True)
class _Bucket:
    tokens: float  # CPU seconds the app may still spend now (negative: in debt)
    last_request: float  # loop time of the app's last request


class CpuBudgets:
    """Token buckets of CPU seconds per app (sans-IO: callers pass time and usage)."""

    def __init__(self, limit: float) -> None:
        if limit < MIN_LIMIT:
            raise ValueError(f"limit must be at least {MIN_LIMIT} (cores per app)")
        self.limit = limit
        self.capacity = limit * BURST
        self._buckets: dict[str, _Bucket] = {}
        self._last_tick: float | None = None

    def requested(self, app: str, now: float) -> None:
        bucket = self._buckets.get(app)
        if bucket is None:
            self._buckets[app] = _Bucket(self.capacity, now)
        else:
            bucket.last_request = now

    def contended(self, now: float) -> bool:
        active = 0
        for bucket in self._buckets.values():
            if now - bucket.last_request <= CONTENDED_FOR:
                active += 1
                if active >= 2:
                    return True
        return False

    def throttled(self, app: str, now: float) -> bool:
        bucket = self._buckets.get(app)
        return bucket is not None and bucket.tokens < 0 and self.contended(now)

    def account(self, now: float, usage: Mapping[str, float]) -> None:
        """One tick: refill every bucket for the time passed, charge ``usage``."""
        dt = 0.0 if self._last_tick is None else max(now - self._last_tick, 0.0)
        self._last_tick = now
        contended = self.contended(now)
        idle: list[str] = []
        for app, bucket in self._buckets.items():
            bucket.tokens = min(bucket.tokens + self.limit * dt, self.capacity)
            # Debt is capped at one second of refill: a throttled app is back within
            # about a second of behaving, however long it flooded before. (A cap of
            # one burst was tried: the waiters released together at each refill
            # overspend by more than that, and the excess was forgiven: 25% of a
            # core against a 20% limit.)
            bucket.tokens = max(bucket.tokens - usage.get(app, 0.0), -self.limit)
            if not contended:
                # Alone (or nobody busy): no debt carries into the next contention.
                bucket.tokens = max(bucket.tokens, 0.0)
            if bucket.tokens >= self.capacity and now - bucket.last_request > CONTENDED_FOR:
                idle.append(app)
        for app in idle:  # hundreds of thousands of apps: keep state only for active ones
            del self._buckets[app]


def share_cpu(cpu_seconds: float, steps: Mapping[str, float]) -> dict[str, float]:
    """Split ``cpu_seconds`` among apps in proportion to their timed steps."""
    total = sum(steps.values())
    if total <= 0 or cpu_seconds <= 0:
        return {}
    return {app: cpu_seconds * t / total for app, t in steps.items()}


def _untagged() -> str:
    return ""


class _TimedCoroutine(Coroutine[Any, Any, Any]):
    """A task's coroutine, each step timed and charged to the app the task is tagged
    with when the step ends (the step that routes a request tags it)."""

    __slots__ = ("_coro", "_meter", "task_name")

    def __init__(self, coro: Coroutine[Any, Any, Any], meter: CpuMeter) -> None:
        self._coro = coro
        self._meter = meter
        self.task_name: Callable[[], str] = _untagged  # the task's get_name, once it exists

    def send(self, value: Any) -> Any:
        meter = self._meter
        if not meter.busy:
            return self._coro.send(value)
        started = perf_counter()
        try:
            return self._coro.send(value)
        finally:
            # Inlined (no method call, no current_task()): this runs on every step.
            name = self.task_name()
            if name.startswith(TAG_PREFIX):
                meter.steps[name] += perf_counter() - started

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._coro.__await__()

    @property
    def cr_frame(self) -> Any:  # Task.get_stack() and repr look at it
        return getattr(self._coro, "cr_frame", None)


class CpuMeter:
    """Times task steps per app; feeds ``CpuBudgets`` each tick."""

    def __init__(self, budgets: CpuBudgets | None) -> None:
        self.budgets = budgets
        self.busy = False
        self.used: Counter[str] = Counter()  # cumulative CPU seconds per app
        self.throttled_requests: Counter[str] = Counter()
        self._names: dict[str, str] = {}
        # task name -> step seconds since the last tick
        self.steps: defaultdict[str, float] = defaultdict(float)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_factory: Any = None
        self._cpu = 0.0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._cpu = time.process_time()
        self._previous_factory = loop.get_task_factory()
        if self._previous_factory is None:  # never stack on someone else's factory
            loop.set_task_factory(self._task_factory)
        self._tick = loop.call_later(TICK, self._on_tick, loop.time())

    def stop(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        loop = self._loop
        if loop is not None and loop.get_task_factory() == self._task_factory:
            loop.set_task_factory(None)
        self.busy = False
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_result(None)
        self._waiters.clear()

    def _task_factory(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Task[Any]:
        if not asyncio.iscoroutine(coro):
            return asyncio.Task(coro, loop=loop, **kwargs)
        timed = _TimedCoroutine(coro, self)
        task = asyncio.Task(timed, loop=loop, **kwargs)
        timed.task_name = task.get_name
        return task

    # -- the request side ----------------------------------------------------------
    def tag(self, app: str) -> None:
        """Mark the running task as working for ``app`` (until tagged again)."""
        # With the loop given, current_task() skips get_running_loop(), which on
        # Python 3.11 costs a getpid() system call.
        task = asyncio.current_task(self._loop) if self._loop else asyncio.current_task()
        if task is None:
            return
        task.set_name(self._tag_name(app))
        if self.budgets is not None and self._loop is not None:
            self.budgets.requested(app, self._loop.time())

    def _tag_name(self, app: str) -> str:
        name = self._names.get(app)
        if name is None:
            if len(self._names) > 65536:
                self._names.clear()
            name = self._names[app] = TAG_PREFIX + app
        return name

    # Work done outside tasks (the fast lane's protocol callbacks) is charged by
    # its caller, timed the same way as a task step.
    def admit(self, app: str) -> bool:
        """Note a request of ``app``; False while the app is over its budget (the
        caller then takes the path that waits its turn)."""
        budgets, loop = self.budgets, self._loop
        if budgets is None or loop is None:
            return True
        now = loop.time()
        budgets.requested(app, now)
        return not budgets.throttled(app, now)

    def charge(self, app: str, seconds: float) -> None:
        self.steps[self._tag_name(app)] += seconds

    async def wait_turn(self, app: str, timeout: float) -> bool:
        """False when ``app`` is still over its CPU budget after ``timeout`` seconds."""
        budgets, loop = self.budgets, self._loop
        if budgets is None or loop is None or not budgets.throttled(app, loop.time()):
            return True
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(app, []).append(future)
        try:
            async with asyncio.timeout(timeout):
                await future
            return True
        except TimeoutError:
            self.throttled_requests[app] += 1
            return False
        finally:
            waiters = self._waiters.get(app)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[app]

    # -- accounting ----------------------------------------------------------------
    def _on_tick(self, last: float) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        cpu = time.process_time()
        spent, self._cpu = cpu - self._cpu, cpu
        steps, self.steps = self.steps, defaultdict(float)
        self.busy = spent >= BUSY * max(now - last, 1e-9)
        usage = share_cpu(spent, {name[len(TAG_PREFIX) :]: t for name, t in steps.items()})
        self.used.update(usage)
        if self.budgets is not None:
            self.budgets.account(now, usage)
            self._wake(now)
        self._tick = loop.call_later(TICK, self._on_tick, now)

    def _wake(self, now: float) -> None:
        assert self.budgets is not None
        for app in [a for a in self._waiters if not self.budgets.throttled(a, now)]:
            for future in self._waiters.pop(app):
                if not future.done():
                    future.set_result(None)
