"""Where a request may go: client routing headers, replay directives, retries.

Each restriction is a filter over a ServiceTable, so the one balancing rule in
``placement.choose`` still decides inside whatever set is left.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from edgeproxy.proxy import headers as h
from edgeproxy.proxy.messages import HttpError
from edgeproxy.routing import Backend, ServiceTable

_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_MACHINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


@dataclass(frozen=True, slots=True)
class Restriction:
    """Only machines in ``region`` / only ``machine`` (``None`` = no restriction)."""

    region: str | None = None
    machine: str | None = None

    def allows(self, backend: Backend) -> bool:
        if self.machine is not None and backend.machine_id != self.machine:
            return False
        return self.region is None or backend.region == self.region


@dataclass(frozen=True, slots=True)
class RoutingHints:
    """The client's routing wish: try ``prefer`` first, or go only to ``force``."""

    prefer: Restriction | None = None
    force: Restriction | None = None


def filter_table(table: ServiceTable, keep: Callable[[Backend], bool]) -> ServiceTable:
    """The same table with only the machines ``keep`` accepts; empty tiers dropped."""
    tiers = tuple(t for t in (tuple(b for b in tier if keep(b)) for tier in table.tiers) if t)
    return replace(table, tiers=tiers)


def candidate_tables(
    table: ServiceTable, hints: RoutingHints, exclude: frozenset[str] = frozenset()
) -> list[ServiceTable]:
    """Tables to offer the balancing rule, in order; machines in ``exclude`` never."""
    if hints.force is None and hints.prefer is None and not exclude:
        return [table]  # the common case: no copy per request

    def usable(restriction: Restriction | None) -> Callable[[Backend], bool]:
        def keep(backend: Backend) -> bool:
            if backend.machine_id in exclude:
                return False
            return restriction is None or restriction.allows(backend)

        return keep

    if hints.force is not None:
        return [filter_table(table, usable(hints.force))]
    tables = []
    if hints.prefer is not None:
        tables.append(filter_table(table, usable(hints.prefer)))
    tables.append(filter_table(table, usable(None)))
    return tables


def _value(
    headers: Sequence[tuple[bytes, bytes]], name: bytes, pattern: re.Pattern[str]
) -> str | None:
    values = h.header_values(headers, name)
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, f"duplicate {name.decode()}")
    text = values[0].decode("latin-1").strip()
    if not pattern.fullmatch(text):
        raise HttpError(400, f"bad {name.decode()}")
    return text


NO_HINTS = RoutingHints()
_HINT_NAMES = frozenset({h.FORCE_REGION, h.FORCE_MACHINE, h.PREFER_REGION, h.PREFER_MACHINE})


def parse_routing_hints(headers: Sequence[tuple[bytes, bytes]]) -> RoutingHints:
    """Read Edgeproxy-{Prefer,Force}-{Region,Machine}; malformed or conflicting → 400."""
    if not any(name in _HINT_NAMES for name, _ in headers):
        return NO_HINTS
    force_region = _value(headers, h.FORCE_REGION, _REGION)
    force_machine = _value(headers, h.FORCE_MACHINE, _MACHINE)
    prefer_region = _value(headers, h.PREFER_REGION, _REGION)
    prefer_machine = _value(headers, h.PREFER_MACHINE, _MACHINE)
    force = None
    if force_region is not None or force_machine is not None:
        force = Restriction(region=force_region, machine=force_machine)
    prefer = None
    if prefer_region is not None or prefer_machine is not None:
        prefer = Restriction(region=prefer_region, machine=prefer_machine)
    return RoutingHints(prefer=prefer, force=force)


@dataclass(frozen=True, slots=True)
class ReplayDirective:
    """A machine's ``Edgeproxy-Replay``: send the request to a region, a machine,
    or anywhere but the machine that answered."""

    region: str | None = None
    machine: str | None = None
    elsewhere: bool = False

    def hints(self, source_machine: str) -> tuple[RoutingHints, frozenset[str]]:
        """As routing: forced target, and the machines to skip."""
        exclude = frozenset({source_machine})
        if self.machine is not None:
            return RoutingHints(force=Restriction(machine=self.machine)), frozenset()
        if self.region is not None:
            return RoutingHints(force=Restriction(region=self.region)), exclude
        return RoutingHints(), exclude


def parse_replay(value: bytes) -> ReplayDirective | None:
    """``region=syd`` | ``machine=<id>`` | ``elsewhere``; anything else → None."""
    text = value.decode("latin-1").strip()
    if text.lower() == "elsewhere":
        return ReplayDirective(elsewhere=True)
    key, sep, arg = text.partition("=")
    key, arg = key.strip().lower(), arg.strip()
    if not sep:
        return None
    if key == "region" and _REGION.fullmatch(arg):
        return ReplayDirective(region=arg)
    if key == "machine" and _MACHINE.fullmatch(arg):
        return ReplayDirective(machine=arg)
    return None
