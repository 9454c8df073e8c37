"""scrape: /metrics scrape time at 200,000 apps.

Not measured yet: the scrape reads per-app counters from the kernel maps, so a
200,000-app scrape needs those apps loaded into a running edge program, and the
kernel load does not reach that size in a bounded time today (see `scale`).
"""

from __future__ import annotations

from edgebench.common import BenchError, Result


def measure(result: Result, runs: int, quick: bool) -> None:
    raise BenchError(
        "needs 200,000 services in a loaded edge program; Dataplane.sync does not get "
        "there within the bench's time budget (see the scale scenario), so the scrape "
        "at that size is left out rather than measured at a smaller size")
