"""The balancing rule: nearest region first, capacity from live load, one implementation."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.placement import choose, place, place_service
from edgeproxy.routing import Backend, ServiceTable
from edgeproxy.state import ClusterState, load_state, parse_state, to_dict

LAB_STATE = Path(__file__).resolve().parents[1] / "tools" / "edgelab" / "state.yaml"
STATE = load_state(LAB_STATE)


def table_of(tables: list[ServiceTable], service_id: str) -> ServiceTable:
    (table,) = [t for t in tables if t.service_id == service_id]
    return table


def tier_ids(table: ServiceTable) -> list[list[str]]:
    return [[b.machine_id for b in tier] for tier in table.tiers]


def with_stopped(*machine_ids: str) -> ClusterState:
    data: dict[str, Any] = to_dict(STATE)
    for machine in data["machines"]:
        if machine["id"] in machine_ids:
            machine["state"] = "stopped"
    return parse_state(data, "test")


def test_nearest_region_first_from_ord() -> None:
    echo = table_of(place(STATE, "edge-ord"), "echo-tcp")
    assert tier_ids(echo) == [
        ["echo-ord-1", "echo-ord-2"],
        ["echo-ams-1", "echo-ams-2"],
        ["echo-syd-1", "echo-syd-2"],
    ]
    assert [tier[0].region for tier in echo.tiers] == ["ord", "ams", "syd"]


def test_nearest_region_first_from_ams() -> None:
    web = table_of(place(STATE, "edge-ams"), "web-http")
    assert [tier[0].region for tier in web.tiers] == ["ams", "ord", "syd"]
    assert tier_ids(web)[0] == ["web-ams-1", "web-ams-2"]


def test_table_carries_what_the_data_paths_need() -> None:
    web = table_of(place(STATE, "edge-ord"), "web-http")
    assert web.app == "web"
    assert web.addresses == (IPv4Address("198.19.0.80"), IPv6Address("fd00:19::80"))
    assert web.ports == (80,)
    assert web.handlers == ("http",) and not web.raw_tcp
    assert (web.concurrency_type, web.soft_limit, web.hard_limit) == ("requests", 50, 100)
    assert web.tiers[0][0] == Backend(
        machine_id="web-ord-1",
        app="web",
        region="ord",
        address=IPv4Address("198.18.64.11"),
        port=8080,
        worker_address=IPv4Address("198.18.0.21"),
    )


def test_output_is_sorted_and_repeatable() -> None:
    tables = place(STATE, "edge-ord")
    assert [t.service_id for t in tables] == ["echo-tcp", "flood-http", "web-http"]
    assert place(STATE, "edge-ord") == tables
    assert place_service(STATE, "echo-tcp", "edge-ord") == tables[0]


def test_stopped_machines_are_not_candidates() -> None:
    one = table_of(place(with_stopped("echo-ord-1"), "edge-ord"), "echo-tcp")
    assert tier_ids(one)[0] == ["echo-ord-2"]
    both = table_of(place(with_stopped("echo-ord-1", "echo-ord-2"), "edge-ord"), "echo-tcp")
    assert [tier[0].region for tier in both.tiers] == ["ams", "syd"]


@pytest.mark.parametrize("as_callable", [False, True], ids=["set", "predicate"])
def test_unhealthy_machines_are_not_candidates(as_callable: bool) -> None:
    healthy_ids = set(STATE.machines) - {"echo-ord-1", "echo-ord-2", "echo-syd-2"}
    healthy: Callable[[str], bool] | set[str] = (
        healthy_ids.__contains__ if as_callable else healthy_ids
    )
    echo = table_of(place(STATE, "edge-ord", healthy=healthy), "echo-tcp")
    assert tier_ids(echo) == [["echo-ams-1", "echo-ams-2"], ["echo-syd-1"]]


def test_a_service_with_no_candidates_still_has_a_table() -> None:
    echo = table_of(place(STATE, "edge-ord", healthy=set()), "echo-tcp")
    assert echo.tiers == ()
    assert choose(echo, {}) is None


def test_a_worker_places_from_its_own_region() -> None:
    echo = table_of(place(STATE, "worker-syd"), "echo-tcp")
    assert echo.tiers[0][0].region == "syd"


def test_unknown_hosts_do_not_place() -> None:
    with pytest.raises(ValueError, match="unknown host"):
        place(STATE, "edge-fra")


def test_explicit_latency_reorders_tiers() -> None:
    data: dict[str, Any] = to_dict(STATE)
    data["latency_ms"] = {"ord": {"ams": 200, "syd": 50}}
    echo = table_of(place(parse_state(data, "test"), "edge-ord"), "echo-tcp")
    assert [tier[0].region for tier in echo.tiers] == ["ord", "syd", "ams"]


# ---------------------------------------------------------------------- choose()

ECHO_ORD = table_of(place(STATE, "edge-ord"), "echo-tcp")  # soft 100, hard 200


def chosen(load: dict[str, int], seed: int = 0) -> str | None:
    backend = choose(ECHO_ORD, load, random.Random(seed))
    return None if backend is None else backend.machine_id


def test_choose_prefers_a_machine_below_soft_limit() -> None:
    assert chosen({"echo-ord-1": 150, "echo-ord-2": 99}) == "echo-ord-2"


def test_choose_takes_the_least_loaded() -> None:
    assert chosen({"echo-ord-1": 3, "echo-ord-2": 5}) == "echo-ord-1"
    assert chosen({"echo-ord-1": 180, "echo-ord-2": 120}) == "echo-ord-2"


def test_choose_stays_local_above_soft_limit() -> None:
    # soft_limit shapes the choice inside a region; only hard_limit sends work away.
    assert chosen({"echo-ord-1": 199, "echo-ord-2": 199}) in {"echo-ord-1", "echo-ord-2"}


def test_choose_skips_a_region_at_hard_limit() -> None:
    full_ord = {"echo-ord-1": 200, "echo-ord-2": 200, "echo-ams-1": 7, "echo-ams-2": 4}
    assert chosen(full_ord) == "echo-ams-2"
    assert chosen({"echo-ord-1": 200, "echo-ord-2": 12}) == "echo-ord-2"


def test_choose_returns_none_when_everything_is_full() -> None:
    assert chosen({m: 200 for m in STATE.machines}) is None


def test_choose_breaks_ties_at_random_reproducibly() -> None:
    rng = random.Random(7)
    picks = Counter(choose(ECHO_ORD, {}, rng).machine_id for _ in range(200))  # type: ignore[union-attr]
    assert set(picks) == {"echo-ord-1", "echo-ord-2"}
    assert min(picks.values()) > 60
    assert [chosen({}, seed=3) for _ in range(5)] == [chosen({}, seed=3)] * 5


# ------------------------------------------------------------------ properties


@st.composite
def worlds(draw: st.DrawFn) -> tuple[ClusterState, str, set[str], dict[str, int]]:
    """A random cluster of one app, its health and load, and the edge to place from."""
    n_regions = draw(st.integers(1, 5))
    positions = draw(
        st.lists(
            st.tuples(st.floats(-90, 90), st.floats(-180, 180)),
            min_size=n_regions,
            max_size=n_regions,
        )
    )
    regions = [{"code": f"r{i}", "position": list(p)} for i, p in enumerate(positions)]
    hosts = []
    for i in range(n_regions):
        hosts.append(
            {"id": f"edge-{i}", "role": "edge", "region": f"r{i}", "address": f"10.0.{i}.1"}
        )
        hosts.append(
            {"id": f"w-{i}", "role": "worker", "region": f"r{i}", "address": f"10.0.{i}.2"}
        )
    placed = draw(st.lists(st.tuples(st.integers(0, n_regions - 1), st.booleans()), max_size=20))
    machines = [
        {
            "id": f"m{n}",
            "app": "a",
            "host": f"w-{region}",
            "address": f"10.1.0.{n + 1}",
            "state": "started" if started else "stopped",
        }
        for n, (region, started) in enumerate(placed)
    ]
    data = {
        "version": 1,
        "regions": regions,
        "hosts": hosts,
        "apps": [{"name": "a", "addresses": ["10.2.0.1"]}],
        "services": [
            {
                "id": "s",
                "app": "a",
                "protocol": "tcp",
                "ports": [7],
                "internal_port": 7,
                "concurrency": {"type": "connections", "soft_limit": 2, "hard_limit": 4},
            }
        ],
        "machines": machines,
    }
    state = parse_state(data, "hypothesis")
    machine_ids = [m["id"] for m in machines]
    healthy = draw(st.sets(st.sampled_from(machine_ids))) if machine_ids else set()
    load = {m: draw(st.integers(0, 5)) for m in machine_ids}
    edge = f"edge-{draw(st.integers(0, n_regions - 1))}"
    return state, edge, healthy, load


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_placement_properties(world: tuple[ClusterState, str, set[str], dict[str, int]]) -> None:
    state, edge, healthy, load = world
    (table,) = place(state, edge, healthy=healthy)
    origin = state.hosts[edge].region
    placed = [b for tier in table.tiers for b in tier]

    # Exactly the started, healthy machines, each once.
    candidates = {m.id for m in state.machines.values() if m.state == "started" and m.id in healthy}
    assert sorted(b.machine_id for b in placed) == sorted(candidates)

    # One region per tier, tiers in non-decreasing distance.
    regions = []
    for tier in table.tiers:
        assert tier and len({b.region for b in tier}) == 1
        regions.append(tier[0].region)
    distances = [state.distance(origin, r) for r in regions]
    assert distances == sorted(distances)
    assert len(set(regions)) == len(regions)

    # choose(): the first tier with room, the least loaded there, never a full machine.
    pick = choose(table, load, random.Random(0))
    open_tiers = [t for t in table.tiers if any(load[b.machine_id] < 4 for b in t)]
    if not open_tiers:
        assert pick is None
    else:
        assert pick is not None and pick in open_tiers[0]
        assert load[pick.machine_id] == min(load[b.machine_id] for b in open_tiers[0])
