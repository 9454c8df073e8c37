"""The seam to the one balancing rule, ``edgeproxy.placement.choose``.

The proxy never re-implements the rule; it hands ``choose`` a (possibly
filtered) ServiceTable and its own in-flight counts. Tests may inject another
chooser with the same signature (e.g. a deterministic one).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from edgeproxy import placement
from edgeproxy.routing import Backend, ServiceTable

Chooser = Callable[[ServiceTable, Mapping[str, int], random.Random], Backend | None]


def placement_chooser() -> Chooser:
    return placement.choose
