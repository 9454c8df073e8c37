"""Dataplane.sync at scale: id free lists, batched writes, partial updates."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bpf_harness import backend, loaded, need_root_kernel, reset, small_config, table
from edgeproxy import bpfmaps as bm
from edgeproxy.dataplane import Dataplane
from edgeproxy.routing import ServiceTable

pytestmark = [pytest.mark.root, pytest.mark.kernel]

ROUTING_MAPS = ("services", "maglev", "backends")
ARRAY_MAPS = ("machines", "machine_labels", "service_labels")


@pytest.fixture(scope="module")
def edge_loaded() -> Iterator[Dataplane]:
    need_root_kernel()
    yield from loaded(small_config("edge", "sync"))


@pytest.fixture
def dp(edge_loaded: Dataplane) -> Iterator[Dataplane]:
    reset(edge_loaded)
    yield edge_loaded
    for m in edge_loaded.maps.values():
        m.batch_ok = True


def svc(n: int, *machines: int, extra_tier: tuple[int, ...] = ()) -> ServiceTable:
    tiers = [tuple(backend(f"m{i}", f"198.18.210.{i}") for i in machines)]
    if extra_tier:
        tiers.append(tuple(backend(f"m{i}", f"198.18.210.{i}", region="ams") for i in extra_tier))
    return table(*(t for t in tiers if t), service=f"s{n}", vip=f"198.19.210.{n}", ports=(7, 8))


def dump(dp: Dataplane) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in ROUTING_MAPS:
        out[name] = sorted((bytes(k), bytes(v)) for k, v in dp.maps[name].items())
    for name in ARRAY_MAPS:
        m = dp.maps[name]
        out[name] = [bytes(m.lookup(bm.U32(i))) for i in range(m.max_entries)]
    return out


def steps() -> list[list[ServiceTable]]:
    return [
        [svc(1, 1, 2), svc(2, 3), svc(3, 4, 5, 6, extra_tier=(7,))],
        [svc(1, 1, 2, 8), svc(3, 4, 6, extra_tier=(7,)), svc(4, 9)],
        [svc(3, 4), svc(5, 1, 10)],
        [],
    ]


def test_batched_sync_equals_per_entry_sync(dp: Dataplane) -> None:
    per_entry = []
    for m in dp.maps.values():
        m.batch_ok = False
    for tables in steps():
        dp.sync(tables)
        per_entry.append(dump(dp))
    reset(dp)
    for m in dp.maps.values():
        m.batch_ok = True
    for n, tables in enumerate(steps()):
        dp.sync(tables)
        assert dump(dp) == per_entry[n], f"step {n}"
    # batching really was used where the kernel has it
    assert all(dp.maps[name].batch_ok for name in ROUTING_MAPS + ARRAY_MAPS)


def test_freed_ids_are_reused(dp: Dataplane) -> None:
    dp.sync([svc(1, 1), svc(2, 2), svc(3, 3)])
    ids = {sid: s.id for sid, s in dp._services.items()}
    mids = dict(dp._machine_ids)
    assert sorted(ids.values()) == [0, 1, 2]
    assert sorted(mids.values()) == [0, 1, 2]
    r = dp.sync([svc(1, 1), svc(3, 3)])
    assert (r.services_removed, r.machines_freed) == (1, 1)
    r = dp.sync([svc(1, 1), svc(3, 3), svc(4, 4)])
    assert r.machines_added == 1
    assert dp._services["s4"].id == ids["s2"]  # the freed id, not a new one
    assert dp._machine_ids[("m4", 7000)] == mids[("m2", 7000)]
    # labels follow the reuse
    label = dp.maps["service_labels"].lookup(bm.U32(ids["s2"]))
    assert label.name == b"s4"
    # everything gone: allocation starts from 0 again
    dp.sync([])
    assert (dp._next_sid, dp._free_sids, dp._next_mid, dp._free_mids) == (0, [], 0, [])


def test_partial_sync_leaves_other_services_alone(dp: Dataplane) -> None:
    full = [svc(1, 1, 2), svc(2, 3), svc(3, 4)]
    dp.sync(full)
    before = dump(dp)
    # the same change made partially or in full gives the same maps
    r = dp.sync([svc(2, 3, 5)], partial=True)
    assert (r.services_written, r.services_removed, r.machines_added) == (1, 0, 1)
    partial = dump(dp)
    dp.sync(full)
    assert dump(dp) == before
    dp.sync([svc(1, 1, 2), svc(2, 3, 5), svc(3, 4)])
    assert dump(dp) == partial
    # removal by id; an unknown id is ignored
    r = dp.sync([], partial=True, removed=["s1", "nope"])
    assert r.services_removed == 1 and set(dp._services) == {"s2", "s3"}
    assert r.machines_freed == 2
    # a service that turns HTTP leaves the kernel in a partial update too
    http = table(service="s3", vip="198.19.210.3", handlers=("http",))
    assert dp.sync([http], partial=True).services_removed == 1


def test_unchanged_tables_cost_nothing(dp: Dataplane) -> None:
    tables = [svc(n, n) for n in range(1, 20)]
    dp.sync(tables)
    r = dp.sync(tables)
    assert (r.services_written, r.machines_added, r.machines_freed) == (0, 0, 0)
    # equal but not identical tables: still nothing written
    r = dp.sync([svc(n, n) for n in range(1, 20)])
    assert r.services_written == 0


def test_vip_moving_between_services_keeps_its_entries(dp: Dataplane) -> None:
    a = table((backend("m1", "198.18.210.1"),), service="a", vip="198.19.210.9")
    b = table((backend("m2", "198.18.210.2"),), service="b", vip="198.19.210.9")
    dp.sync([a])
    dp.sync([b])  # a removed, b takes the same VIP and port in one sync
    keys = {bytes(k): v for k, v in dp.maps["services"].items()}
    assert len(keys) == 2  # (vip, 7) and the (vip, 0) marker
    port = next(v for v in keys.values() if not v.flags & bm.SVC_F_VIP_MARKER)
    assert port.id == dp._services["b"].id
