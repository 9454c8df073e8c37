"""Per-app concurrency accounting and the bounded per-app wait queue (sans-IO).

Load is what this proxy itself has in flight per machine: requests, or client
connections when the service counts connections. When the balancing rule finds
no machine below ``hard_limit`` the request waits in its app's FIFO queue; a
released slot is offered to the waiters in order. Apps never share a counter or
a queue, so one app's overload only spends its own budget.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from edgeproxy.proxy.balancing import Chooser
from edgeproxy.routing import Backend, ServiceTable

Token = TypeVar("Token")


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
    def __init__(self, chooser: Chooser, rng: random.Random, queue_limit: int) -> None:
        self._choose = chooser
        self._rng = rng
        self.queue_limit = queue_limit
        self._apps: dict[str, AppBudget[Token]] = {}

    def _budget(self, app: str) -> AppBudget[Token]:
        budget = self._apps.get(app)
        if budget is None:
            budget = self._apps[app] = AppBudget()
        return budget

    def load(self, app: str) -> Mapping[str, int]:
        budget = self._apps.get(app)
        return budget.in_flight if budget is not None else {}

    def _pick(self, budget: AppBudget[Token], tables: list[ServiceTable]) -> Backend | None:
        for table in tables:
            backend = self._choose(table, budget.in_flight, self._rng)
            if backend is not None:
                return backend
        return None

    def _take(self, budget: AppBudget[Token], backend: Backend) -> None:
        budget.in_flight[backend.machine_id] = budget.in_flight.get(backend.machine_id, 0) + 1

    def try_acquire(self, app: str, tables: list[ServiceTable]) -> Backend | None:
        """A machine with a slot taken on it, or None when the request must queue.

        Newcomers do not overtake waiters: with a non-empty queue they queue too.
        """
        budget = self._budget(app)
        if budget.queue:
            return None
        backend = self._pick(budget, tables)
        if backend is not None:
            self._take(budget, backend)
        return backend

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
        else:
            budget.in_flight.pop(machine_id, None)
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
            self._take(budget, backend)
            granted.append((waiter.token, backend))
        self._forget_if_idle(app, budget)
        return granted

    def _forget_if_idle(self, app: str, budget: AppBudget[Token]) -> None:
        # Hundreds of thousands of apps: keep state only for apps with work.
        if not budget.in_flight and not budget.queue:
            self._apps.pop(app, None)

    def queue_depth(self) -> dict[str, int]:
        return {app: len(b.queue) for app, b in self._apps.items() if b.queue}

    def in_flight(self) -> dict[tuple[str, str], int]:
        return {
            (app, machine): n for app, b in self._apps.items() for machine, n in b.in_flight.items()
        }

    def apps(self) -> list[str]:
        return list(self._apps)
