"""Property: any sequence of valid routing tables, synced one after another, leaves
the kernel maps equal to a fresh build of the last one.

Ids are the loader's private business (a fresh build numbers differently), so the
maps are compared decoded into names: every service key, its limits, its backend
list in tier order and its Maglev table as machine names; plus every machine that
is in use. Anything left over from an earlier step (a stale generation, a machine
nothing routes to) shows up as a difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpf_harness import backend, loaded, need_root_kernel, reset, small_config
from edgeproxy import bpfmaps as bm
from edgeproxy.dataplane import Dataplane
from edgeproxy.routing import ServiceTable

pytestmark = [pytest.mark.root, pytest.mark.kernel]

MACHINES = [f"m{i}" for i in range(8)]
SERVICES = [f"s{i}" for i in range(4)]
REGIONS = ("ord", "ams")


@pytest.fixture(scope="module")
def edge() -> Iterator[Dataplane]:
    need_root_kernel()
    yield from loaded(small_config("edge", "prop"))


def _service(name: str, tiers: list[list[int]], hard_limit: int, ports: list[int]) -> ServiceTable:
    n = SERVICES.index(name)
    built = tuple(
        tuple(backend(MACHINES[m], f"198.18.211.{m + 1}", region=REGIONS[t]) for m in tier)
        for t, tier in enumerate(tiers)
        if tier
    )
    return ServiceTable(name, "echo", (IPv4Address(f"198.19.211.{n + 1}"),), tuple(ports), (),
                        "connections", hard_limit, hard_limit, built)


machine_sets = st.lists(st.sampled_from(range(len(MACHINES))), unique=True, max_size=4)
one_service = st.builds(
    _service,
    st.sampled_from(SERVICES),
    st.lists(machine_sets, min_size=0, max_size=2),
    st.integers(min_value=1, max_value=500),
    st.lists(st.sampled_from([7, 8, 9]), unique=True, min_size=1, max_size=2),
)
# One step: a set of services, each at most once (the loader's contract).
step = st.lists(one_service, max_size=4, unique_by=lambda t: t.service_id)


def _label(dp: Dataplane, table: str, index: int) -> str:
    label = dp.maps[table].lookup(bm.U32(index))
    return label.name.decode()


def decoded(dp: Dataplane) -> dict[str, object]:
    """The routing maps in names, independent of how ids were handed out."""
    services = {}
    for key, value in dp.maps["services"].items():
        if key.port == 0:  # the VIP marker entry
            services[(key.addr, 0, key.proto)] = "marker"
            continue
        backends = []
        for index in range(value.backend_count):
            entry = dp.maps["backends"].lookup(bm.BackendKey(value.id, value.gen, index))
            machine = dp.maps["machines"].lookup(bm.U32(entry.machine))
            backends.append((_label(dp, "machine_labels", entry.machine), machine.addr,
                             machine.worker, machine.port, entry.tier_start, entry.tier_len))
        maglev = [
            _label(dp, "machine_labels",
                   dp.maps["maglev"].lookup(bm.MaglevKey(value.id, value.gen, slot)).value)
            for slot in range(value.maglev_size)
        ]
        services[(key.addr, key.port, key.proto)] = (
            _label(dp, "service_labels", value.id), value.hard_limit, value.flags,
            tuple(backends), tuple(maglev))
    generations = {(k.service, k.gen) for k in dp.maps["backends"].keys()}  # noqa: SIM118
    generations |= {(k.service, k.gen) for k in dp.maps["maglev"].keys()}  # noqa: SIM118
    live = {(v.id, v.gen) for k, v in dp.maps["services"].items() if k.port != 0}
    machines_in_use = sorted(
        _label(dp, "machine_labels", i)
        for i in range(dp.config.max_machines)
        if dp.maps["machines"].lookup(bm.U32(i)).flags
    )
    return {"services": services, "stale generations": sorted(generations - live),
            "machines in use": machines_in_use}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=5))
def test_any_sequence_ends_as_a_fresh_build_of_the_last(
    edge: Dataplane, steps: list[list[ServiceTable]]
) -> None:
    reset(edge)
    for tables in steps:
        edge.sync(tables)
    after_sequence = decoded(edge)
    reset(edge)
    edge.sync(steps[-1])
    assert after_sequence == decoded(edge)
    assert after_sequence["stale generations"] == []
