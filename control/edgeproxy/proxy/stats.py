"""Counters the proxy keeps for metrics; read by pulling a snapshot (nothing pushes)."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeproxy.proxy.backhaul import BackhaulHealth

# Response-time histogram bucket upper bounds, seconds (Prometheus-style, cumulative on read).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        running, out = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class ProxySnapshot:
    responses: Mapping[tuple[str, int], int]  # (app, status) -> count; app "" = unrouted
    in_flight: Mapping[tuple[str, str], int]  # (app, machine_id) -> requests or connections
    queue_depth: Mapping[str, int]  # app -> waiting requests
    retries: Mapping[str, int]
    replays: Mapping[str, int]
    response_seconds: Mapping[str, tuple[tuple[float, int], ...]]  # app -> cumulative buckets
    response_seconds_sum: Mapping[str, float]
    backhaul: Mapping[str, BackhaulHealth]  # worker address -> health
    # app -> CPU seconds this process spent on it (proxy/cpushare.py)
    cpu_seconds: Mapping[str, float] = field(default_factory=dict)
    # app -> requests answered 503 because the app stayed over its CPU budget
    cpu_throttled: Mapping[str, int] = field(default_factory=dict)
    # backhaul connections a worker closed because they came from no edge's address
    backhaul_refused: int = 0
    # HTTP/1.1 requests started on the fast lane / handed to the general path
    lane_requests: int = 0
    general_requests: int = 0
    # Worker: backhaul streams served on callbacks (workerlane) / given a task
    backhaul_lane_requests: int = 0
    backhaul_general_requests: int = 0
    # HTTP/2 connections closed for abuse, by kind (rapid_reset, continuation_flood,
    # ping_flood, settings_flood, zero_window, flood)
    http2_abuse: Mapping[str, int] = field(default_factory=dict)


class ProxyCounters:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()
        self.retries: Counter[str] = Counter()
        self.replays: Counter[str] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.http2_abuse: Counter[str] = Counter()

    def response(self, app: str, status: int, seconds: float) -> None:
        self.responses[(app, status)] += 1
        histogram = self.latency.get(app)
        if histogram is None:
            histogram = self.latency[app] = Histogram()
        histogram.observe(seconds)

    def http2_abuse_seen(self, kind: str) -> None:
        self.http2_abuse[kind] += 1
