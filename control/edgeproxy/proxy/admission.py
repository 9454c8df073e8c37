"""Per-app concurrency accounting and the bounded per-app wait queue (sans-IO).

Load is what this proxy has in flight per machine: requests, or client
connections when the service counts connections. With several HTTP processes on
a host, load is the host-wide count in shared memory (``proxy/_shared.pyx``):
``choose`` reads it, and a slot is taken with a compare-and-swap that succeeds
only below ``hard_limit``, so the limit holds exactly across processes (a lost
race re-reads the load and chooses again). When the balancing rule finds no
machine below ``hard_limit`` the request waits in its app's FIFO queue, which is
per process; a released slot is offered to the waiters in order (the proxy also
re-offers periodically, since another process's release wakes nobody here).
Apps never share a counter or a queue, so one app's overload only spends its own
budget.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from edgeproxy.proxy._shared import SharedBudgets
from edgeproxy.proxy.balancing import Chooser
from edgeproxy.routing import Backend, ServiceTable

Token = TypeVar("Token")
RACE_ATTEMPTS = 8  # choose again after losing a CAS to another process, at most this often


class SharedLoad(Mapping[str, int]):
    """Host-wide in-flight counts per machine, read live from the shared segment
    (what ``choose`` sees). A machine the segment has no row for (it is full) is
    counted in ``local`` by this process alone."""

    def __init__(self, shared: SharedBudgets) -> None:
        self.shared = shared
        self.rows: dict[str, int] = {}  # machine id -> row (rows are never freed)
        self.local: dict[str, int] = {}

    def row(self, machine_id: str) -> int:
        row = self.rows.get(machine_id)
        if row is None:
            row = self.rows[machine_id] = self.shared.row(machine_id)
        return row

    def get(self, machine_id: str, default: int = 0) -> int:  # type: ignore[override]
        row = self.rows.get(machine_id)
        if row is None:
            row = self.row(machine_id)
        if row >= 0:
            return self.shared.total(row)
        return self.local.get(machine_id, default)

    def __getitem__(self, machine_id: str) -> int:
        return self.get(machine_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def try_take(self, machine_id: str, limit: int) -> bool:
        row = self.row(machine_id)
        if row >= 0:
            return self.shared.try_acquire(row, limit)
        count = self.local.get(machine_id, 0)
        if count >= limit:
            return False
        self.local[machine_id] = count + 1
        return True

    def give_back(self, machine_id: str) -> None:
        row = self.row(machine_id)
        if row >= 0:
            self.shared.release(row)
        else:
            count = self.local.get(machine_id, 0) - 1
            if count > 0:
                self.local[machine_id] = count
            else:
                self.local.pop(machine_id, None)


@dataclass(slots=True)
class Waiter(Generic[Token]):
    token: Token
    tables: list[ServiceTable]  # candidate tables, in order of preference


@dataclass(slots=True)
class AppBudget(Generic[Token]):
    in_flight: dict[str, int] = field(default_factory=dict)  # machine_id -> count
    queue: deque[Waiter[Token]] = field(default_factory=deque)

    @property
    def total(self) -> int:
        return sum(self.in_flight.values())


class QueueFull(Exception):
    """The app's wait queue is at its bound: answer 503 now."""


class Admission(Generic[Token]):
    def __init__(
        self,
        chooser: Chooser,
        rng: random.Random,
        queue_limit: int,
        shared: SharedBudgets | None = None,
    ) -> None:
        self._choose = chooser
        self._rng = rng
        self.queue_limit = queue_limit
        self._apps: dict[str, AppBudget[Token]] = {}
        # in_flight per app stays this process's own count (release bookkeeping,
        # metrics); the shared load is what limits and balancing see.
        self.shared = SharedLoad(shared) if shared is not None else None
        self.races = 0  # CAS lost to another process: chosen again

    def _budget(self, app: str) -> AppBudget[Token]:
        budget = self._apps.get(app)
        if budget is None:
            budget = self._apps[app] = AppBudget()
        return budget

    def load(self, app: str) -> Mapping[str, int]:
        budget = self._apps.get(app)
        return budget.in_flight if budget is not None else {}

    def _pick(self, budget: AppBudget[Token], tables: list[ServiceTable]) -> Backend | None:
        """A machine with a slot taken on it (the balancing rule's choice), or None."""
        shared = self.shared
        if shared is None:
            for table in tables:
                backend = self._choose(table, budget.in_flight, self._rng)
                if backend is not None:
                    self._count(budget, backend)
                    return backend
            return None
        for _ in range(RACE_ATTEMPTS):
            for table in tables:
                backend = self._choose(table, shared, self._rng)
                if backend is not None:
                    break
            else:
                return None
            if shared.try_take(backend.machine_id, table.hard_limit):
                self._count(budget, backend)
                return backend
            self.races += 1  # another process took the last slot: look again
        return None

    def _count(self, budget: AppBudget[Token], backend: Backend) -> None:
        budget.in_flight[backend.machine_id] = budget.in_flight.get(backend.machine_id, 0) + 1

    def try_acquire(self, app: str, tables: list[ServiceTable]) -> Backend | None:
        """A machine with a slot taken on it, or None when the request must queue.

        Newcomers do not overtake waiters: with a non-empty queue they queue too.
        """
        budget = self._budget(app)
        if budget.queue:
            return None
        return self._pick(budget, tables)

    def enqueue(self, app: str, token: Token, tables: list[ServiceTable]) -> None:
        budget = self._budget(app)
        if len(budget.queue) >= self.queue_limit:
            raise QueueFull(app)
        budget.queue.append(Waiter(token, tables))

    def cancel(self, app: str, token: Token) -> None:
        """Forget a waiter (it timed out or its client left)."""
        budget = self._apps.get(app)
        if budget is None:
            return
        for waiter in budget.queue:
            if waiter.token is token:
                budget.queue.remove(waiter)
                break
        self._forget_if_idle(app, budget)

    def release(self, app: str, machine_id: str) -> list[tuple[Token, Backend]]:
        """Give a slot back; returns the waiters granted a machine (slot already taken)."""
        budget = self._apps.get(app)
        if budget is None:
            return []
        count = budget.in_flight.get(machine_id, 0) - 1
        if count > 0:
            budget.in_flight[machine_id] = count
        elif count == 0:
            budget.in_flight.pop(machine_id, None)
        else:
            return self._grant_waiters(app, budget)  # not held here: nothing to give back
        if self.shared is not None:
            self.shared.give_back(machine_id)
        return self._grant_waiters(app, budget)

    def retry_waiters(self, app: str) -> list[tuple[Token, Backend]]:
        """After a routing update, waiters may fit on new machines."""
        budget = self._apps.get(app)
        return self._grant_waiters(app, budget) if budget is not None else []

    def _grant_waiters(self, app: str, budget: AppBudget[Token]) -> list[tuple[Token, Backend]]:
        granted: list[tuple[Token, Backend]] = []
        for waiter in list(budget.queue):
            backend = self._pick(budget, waiter.tables)
            if backend is None:
                continue
            budget.queue.remove(waiter)
            granted.append((waiter.token, backend))
        self._forget_if_idle(app, budget)
        return granted

    def _forget_if_idle(self, app: str, budget: AppBudget[Token]) -> None:
        # Hundreds of thousands of apps: keep state only for apps with work.
        if not budget.in_flight and not budget.queue:
            self._apps.pop(app, None)

    def waiting(self) -> bool:
        """Some app has a queued request (the proxy then re-offers slots that other
        processes released)."""
        return any(b.queue for b in self._apps.values())

    def queue_depth(self) -> dict[str, int]:
        return {app: len(b.queue) for app, b in self._apps.items() if b.queue}

    def in_flight(self) -> dict[tuple[str, str], int]:
        return {
            (app, machine): n for app, b in self._apps.items() for machine, n in b.in_flight.items()
        }

    def apps(self) -> list[str]:
        return list(self._apps)
