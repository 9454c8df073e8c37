"""The balancing rule (SPEC, "Balancing"), written once for both data paths.

Two halves, split by how fast their inputs change:

- ``place`` turns cluster state and health into per-service tables of candidate
  machines, one tier per region, nearest first. State and health change rarely, so
  tables (and the kernel maps built from them) change rarely too.
- ``choose`` applies live load to a table at the moment new work arrives: first tier
  with a machine below ``hard_limit``, least loaded there. The HTTP proxy calls it per
  request; the kernel applies the same rule to the same tiers with a consistent hash
  in place of "least loaded, random ties".

Load is deliberately not an input to ``place``: it changes with every connection, and
a table that moved with it would rewrite kernel maps at connection rate and reshuffle
the consistent hash. A region whose machines are all full therefore stays in its tier;
the data path steps over it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from ipaddress import IPv4Address

from edgeproxy.routing import Backend, ServiceTable
from edgeproxy.state import ClusterState, Machine, Service, gc_paused

# Which machines pass their health checks: a predicate over machine ids, a set of
# the healthy ones, or None when nothing is known yet (every machine counts).
Health = Callable[[str], bool] | AbstractSet[str] | None

_RNG = random.Random()


def _health_predicate(healthy: Health) -> Callable[[str], bool]:
    if healthy is None:
        return lambda _machine_id: True
    if isinstance(healthy, AbstractSet):
        return healthy.__contains__
    return healthy


def host_region(state: ClusterState, host_id: str) -> str:
    """The region of a host; raises ``ValueError`` for an unknown host.

    Edges place from their region; a worker's proxy places from its own, which
    tells it the machines it may deliver to.
    """
    host = state.hosts.get(host_id)
    if host is None:
        raise ValueError(f"unknown host {host_id}")
    return host.region


def place(state: ClusterState, edge_host_id: str, *, healthy: Health = None) -> list[ServiceTable]:
    """Every service's table as seen from one edge, sorted by service id.

    A service with no candidate machine still gets a table (with no tiers): the data
    paths must refuse its traffic (SPEC: never a silent hang), so they must know it.
    """
    rank = _region_rank(state, host_region(state, edge_host_id))
    is_healthy = _health_predicate(healthy)
    with gc_paused():  # hundreds of thousands of tables: see gc_paused
        return [
            _table(state, state.services[service_id], rank, is_healthy)
            for service_id in sorted(state.services)
        ]


def place_service(
    state: ClusterState, service_id: str, edge_host_id: str, *, healthy: Health = None
) -> ServiceTable:
    """One service's table; for updates that touch a few apps out of very many."""
    rank = _region_rank(state, host_region(state, edge_host_id))
    return _table(state, state.services[service_id], rank, _health_predicate(healthy))


def _region_rank(state: ClusterState, origin: str) -> dict[str, int]:
    return {region: n for n, region in enumerate(state.regions_nearest_first(origin))}


def _table(
    state: ClusterState,
    service: Service,
    rank: Mapping[str, int],
    is_healthy: Callable[[str], bool],
) -> ServiceTable:
    app = state.apps[service.app]
    tiers: dict[int, list[Backend]] = {}
    for machine in state.machines_by_app.get(service.app, ()):
        if machine.state != "started" or not is_healthy(machine.id):
            continue
        host = state.hosts[machine.host]
        tiers.setdefault(rank[host.region], []).append(
            _backend(machine, host.region, service.internal_port, host.address)
        )
    return ServiceTable(
        service_id=service.id,
        app=app.name,
        # ServiceTable.addresses is typed IPv4-only, but state admits IPv6 app addresses
        # (the lab has an fd00::/8 prefix); they pass through rather than vanish.
        addresses=app.addresses,  # type: ignore[arg-type]
        ports=service.ports,
        handlers=service.handlers,
        concurrency_type=service.concurrency.type,
        soft_limit=service.concurrency.soft_limit,
        hard_limit=service.concurrency.hard_limit,
        # Sorted so the same state always gives the same table, and map sync diffs
        # only what changed.
        tiers=tuple(tuple(sorted(tiers[n], key=lambda b: b.machine_id)) for n in sorted(tiers)),
    )


def _backend(machine: Machine, region: str, port: int, worker: IPv4Address) -> Backend:
    return Backend(
        machine_id=machine.id,
        app=machine.app,
        region=region,
        address=machine.address,
        port=port,
        worker_address=worker,
    )


def choose(
    table: ServiceTable, load: Mapping[str, int], rng: random.Random | None = None
) -> Backend | None:
    """Where one new connection or request goes, or None when every machine is full.

    ``load`` maps machine id to its current count (connections or requests, as the
    service counts); absent means 0. The first tier with a machine below
    ``hard_limit`` wins; there the least-loaded machine is picked, ties at random.
    Least-loaded also honours ``soft_limit``: a machine below it is always less loaded
    than one at or above it, and ``soft_limit`` never sends work to another region.
    """
    for tier in table.tiers:
        best = _least_loaded_below(tier, load, table.hard_limit)
        if len(best) == 1:
            return best[0]
        if best:
            return (rng or _RNG).choice(best)
    return None


def _least_loaded_below(
    tier: Sequence[Backend], load: Mapping[str, int], limit: int
) -> list[Backend]:
    best: list[Backend] = []
    lowest = limit
    for backend in tier:
        count = load.get(backend.machine_id, 0)
        if count < lowest:
            best, lowest = [backend], count
        elif count == lowest and count < limit:
            best.append(backend)
    return best
