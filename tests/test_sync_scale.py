"""Dataplane.sync at scale: id free lists, batched writes, partial updates."""

from __future__ import annotations

import ctypes as ct
import dataclasses
import logging
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

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


@pytest.mark.parametrize("flush_early", [False, True])
def test_batched_sync_equals_per_entry_sync(dp: Dataplane, flush_early: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with new machines and generations flushed after every service (a cold
    load at scale flushes every FLUSH_BYTES): the maps end the same."""
    from edgeproxy import dataplane

    if flush_early:
        monkeypatch.setattr(dataplane, "FLUSH_BYTES", 0)
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


def _per_entry_counters(dp: Dataplane) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """What read_counters said before batch reads: one lookup per id and map."""
    machines = []
    for mid, (app, name, packed) in sorted(dp._machines.items()):
        s = dp._sum("machine_stats", mid)
        active = dp.maps["machine_active"].lookup(bm.U32(mid))
        machines.append((app, name, int.from_bytes(packed[8:10], "big"), s.opened,
                         active.value if active else 0, s.closed, s.reset, s.expired,
                         s.packets_in, s.bytes_in, s.packets_out, s.bytes_out))
    services = []
    for sid, svc_ in sorted(dp._services.items()):
        s = dp._sum("service_stats", svc_.id)
        label = dp.maps["service_labels"].lookup(bm.U32(svc_.id))
        assert label is not None
        services.append((label.app.decode(), sid, s.refused, s.dropped, s.no_backend, s.flood,
                         s.resteered))
    return machines, services


def _as_tuples(rows: tuple[object, ...]) -> list[tuple[object, ...]]:
    return [tuple(getattr(r, f) for f in r.__slots__) for r in rows]  # type: ignore[attr-defined]


@pytest.mark.parametrize("batch", [True, False])
def test_batch_counter_reads_equal_per_entry_reads(dp: Dataplane, batch: bool) -> None:
    dp.sync([svc(1, 1, 2), svc(2, 3), svc(3, 4, 5, 6, extra_tier=(7,))])
    ncpu = bm.possible_cpus()
    # distinct values per CPU, so a wrong stride or a missed CPU shows
    for mid in dp._machines:
        per_cpu = b"".join(bytes(bm.MachineStats(*(mid * 100 + f * 10 + cpu + 1
                                                   for f in range(8))))
                           for cpu in range(ncpu))
        kb = ct.create_string_buffer(bytes(bm.U32(mid)), 4)
        vb = ct.create_string_buffer(per_cpu, len(per_cpu))
        bm.bpf(bm.BPF_MAP_UPDATE_ELEM, bm._MapElemAttr(
            map_fd=dp.maps["machine_stats"].fd, key=ct.addressof(kb), value=ct.addressof(vb)))
        dp.maps["machine_active"].update(bm.U32(mid), bm.U64(mid % 3))
    sid = dp._services["s3"].id
    dp.maps["service_stats"].update(bm.U32(sid), bm.ServiceStats(1, 2, 3, 4, 5))
    for name in ("machine_stats", "machine_active", "service_stats"):
        dp.maps[name].lookup_batch_ok = batch
    try:
        counters = dp.read_counters()
        machines, services = _per_entry_counters(dp)
        assert _as_tuples(counters.machines) == machines
        assert _as_tuples(counters.services) == services
        assert counters.in_use == (len(dp._machines), len(dp._services))
        assert any(m[3] for m in machines) and services[2][2:] == (
            ncpu, 2 * ncpu, 3 * ncpu, 4 * ncpu, 5 * ncpu)
        idle = dp.read_counters(skip_idle=True)
        assert [s.service for s in idle.services] == ["s3"]
        assert len(idle.machines) == len(counters.machines)
    finally:
        for name in ("machine_stats", "machine_active", "service_stats"):
            dp.maps[name].lookup_batch_ok = True


def test_lookup_array_reads_dense_keys(dp: Dataplane) -> None:
    m = dp.maps["machine_active"]
    last = m.max_entries - 1
    for i in (0, 5, last):
        m.update(bm.U32(i), bm.U64(i + 1))
    for chunk in (bm.BATCH_CHUNK, 3):  # one call, and many calls chained by their token
        old, bm.BATCH_CHUNK = bm.BATCH_CHUNK, chunk
        try:
            raw = m.lookup_array(last + 1)
        finally:
            bm.BATCH_CHUNK = old
        assert len(raw) == (last + 1) * 8
        values = [int.from_bytes(raw[i * 8:(i + 1) * 8], "little") for i in range(last + 1)]
        assert values[0] == 1 and values[5] == 6 and values[last] == last + 1
        assert sum(values) == 1 + 6 + last + 1
    assert len(m.lookup_array(m.max_entries + 10)) == m.max_entries * 8


def test_ipv6_addresses_of_a_raw_tcp_service_are_not_steered_and_said_so(
        dp: Dataplane, caplog: pytest.LogCaptureFixture) -> None:
    t = table((backend("m1", "198.18.210.1"),), service="dual", vip="198.19.210.20")
    dual = dataclasses.replace(t, addresses=(*t.addresses, IPv6Address("fd00:19::20")))
    with caplog.at_level(logging.WARNING, logger="edgeproxy.dataplane"):
        dp.sync([dual])
        dp.sync([dual])  # unchanged: said once
    said = [r.getMessage() for r in caplog.records if "not steered" in r.getMessage()]
    assert said == ["service dual (app echo): not steered on fd00:19::20: "
                    "the fast path is IPv4 only"]
    keys = [bytes(k) for k, _ in dp.maps["services"].items()]
    assert keys and all(k[:4] == IPv4Address("198.19.210.20").packed for k in keys)
