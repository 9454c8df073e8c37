"""What placement hands to the data paths: per-service routing tables.

Placement (``placement.py``) turns cluster state into these; the kernel loader
(``dataplane.py``) writes them into BPF maps and the HTTP proxy reads them.
They carry everything either path needs and nothing about how it was decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address


@dataclass(frozen=True, slots=True)
class Backend:
    """One machine as a data path sees it."""

    machine_id: str
    app: str
    region: str
    address: IPv4Address  # the machine's own address (on its worker)
    port: int  # the service's internal_port on the machine
    worker_address: IPv4Address  # the host address of the worker running it (backhaul target)


@dataclass(frozen=True, slots=True)
class ServiceTable:
    """Where new connections/requests for one service may go, nearest first.

    ``tiers[0]`` holds the machines of the nearest region that has any healthy,
    started machine; ``tiers[1]`` the next region, and so on. A data path sends
    new work to ``tiers[0]`` (consistent hash for raw TCP, least-loaded for HTTP),
    skips machines at ``hard_limit``, and falls to the next tier only when every
    machine of the tier before is full.
    """

    service_id: str
    app: str
    addresses: tuple[IPv4Address, ...]
    ports: tuple[int, ...]
    handlers: tuple[str, ...]
    concurrency_type: str  # "connections" | "requests"
    soft_limit: int
    hard_limit: int
    tiers: tuple[tuple[Backend, ...], ...] = field(default=())

    @property
    def raw_tcp(self) -> bool:
        """True when the kernel fast path carries this service (no handlers)."""
        return not self.handlers


_ADDRESS_TEXT: dict[object, str] = {}


def address_text(address: object) -> str:
    """str() of an IP address, cached: ipaddress formats it anew on every call."""
    text = _ADDRESS_TEXT.get(address)
    if text is None:
        if len(_ADDRESS_TEXT) > 65536:
            _ADDRESS_TEXT.clear()
        text = _ADDRESS_TEXT[address] = str(address)
    return text
