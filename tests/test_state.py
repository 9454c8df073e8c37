"""State model and validation: the lab state parses; every refusal names its place."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
import yaml

from edgeproxy.state import (
    ClusterState,
    StateError,
    haversine_km,
    load_state,
    parse_state,
    parse_yaml,
    to_dict,
)

LAB_STATE = Path(__file__).resolve().parents[1] / "tools" / "edgelab" / "state.yaml"
# The refusal cases edit a fixed text, so the lab's default state can grow freely.
BASE_STATE = Path(__file__).resolve().parent / "data" / "state_base.yaml"
LAB_TEXT = BASE_STATE.read_text()

EXTRA_SERVICE = """  - id: echo-tcp-2
    app: echo
    protocol: tcp
    ports: [7]  # again
    internal_port: 7001
    concurrency: {type: connections, soft_limit: 1, hard_limit: 1}

machines:"""

BLOG_APP = "  - {name: blog, addresses: [198.19.0.80], hostnames: [blog.lab]}\n\nservices:"
BLOG_SERVICE = """  - id: blog-http
    app: blog
    protocol: tcp
    ports: [80]
    internal_port: 8080
    handlers: [http]
    concurrency: {type: requests, soft_limit: 5, hard_limit: 10}

machines:"""


def edited(*edits: tuple[str, str]) -> str:
    text = LAB_TEXT
    for old, new in edits:
        assert text.count(old) == 1, f"edit target not unique: {old!r}"
        text = text.replace(old, new)
    return text


def line_of(text: str, needle: str) -> int:
    hits = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"needle not on exactly one line: {needle!r}"
    return hits[0]


def refusal(tmp_path: Path, text: str) -> StateError:
    file = tmp_path / "state.yaml"
    file.write_text(text)
    with pytest.raises(StateError) as caught:
        load_state(file)
    return caught.value


def test_lab_state_parses() -> None:
    state = load_state(LAB_STATE)
    assert state.version == 1
    assert list(state.regions) == ["ord", "ams", "syd"]
    assert state.hosts["worker-ams"].address == IPv4Address("198.18.0.22")
    assert state.hosts["edge-ord"].is_edge and not state.hosts["edge-ord"].is_worker
    assert state.apps["web"].hostnames == ("web.lab",)
    web = state.services["web-http"]
    assert web.handlers == ("http",) and web.routed_by_hostname
    assert web.concurrency.soft_limit == 50 and web.concurrency.hard_limit == 100
    assert web.checks[0].path == "/healthz"
    assert state.services["echo-tcp"].handlers == ()
    assert len(state.machines) == 14
    assert [m.id for m in state.machines_by_app["echo"]][:2] == ["echo-ord-1", "echo-ord-2"]
    assert [s.id for s in state.services_by_app["web"]] == ["web-http"]


# (case, edits, expected path, expected reason fragment, needle on the expected line)
REFUSALS: list[tuple[str, tuple[tuple[str, str], ...], str, str, str | None]] = [
    (
        "unknown field",
        (("address: 198.18.0.11}", "address: 198.18.0.11, colour: red}"),),
        "hosts[0].colour",
        "unknown field",
        "colour",
    ),
    (
        "missing required field",
        (("    internal_port: 7000\n", ""),),
        "services[0].internal_port",
        "missing required field",
        "- id: echo-tcp",
    ),
    (
        "wrong type",
        (("internal_port: 8080", "internal_port: eighty"),),
        "services[1].internal_port",
        "expected an integer, got a string",
        "eighty",
    ),
    (
        "wrong type of entity",
        (("  - {code: syd, position: [-33.94, 151.18]}", "  - syd"),),
        "regions[2]",
        "expected a mapping, got a string",
        "  - syd",
    ),
    (
        "unknown role",
        (("role: edge, region: ams", "role: edgy, region: ams"),),
        "hosts[1].role",
        "'edgy' is not one of edge, worker, both",
        "edgy",
    ),
    (
        "dangling service app",
        (("    app: web\n", "    app: www\n"),),
        "services[1].app",
        "unknown app www",
        "app: www",
    ),
    (
        "dangling machine app",
        (("{id: web-syd-2, app: web,", "{id: web-syd-2, app: wbe,"),),
        "machines[11].app",
        "unknown app wbe",
        "web-syd-2",
    ),
    (
        "dangling machine host",
        (("{id: echo-ams-2, app: echo, host: worker-ams", "{id: echo-ams-2, app: echo, host: w9"),),
        "machines[3].host",
        "unknown host w9",
        "echo-ams-2",
    ),
    (
        "dangling host region",
        (("role: worker, region: syd", "role: worker, region: sdy"),),
        "hosts[4].region",
        "unknown region sdy",
        "sdy",
    ),
    (
        "duplicate machine id",
        (("{id: echo-ord-2,", "{id: echo-ord-1,"),),
        "machines[1].id",
        "duplicate id echo-ord-1 (first at machines[0])",
        "198.18.64.2,",
    ),
    (
        "duplicate app name",
        (("{name: web,", "{name: echo,"),),
        "apps[1].name",
        "duplicate name echo (first at apps[0])",
        "198.19.0.80",
    ),
    (
        "port out of range",
        (("ports: [7]", "ports: [70000]"),),
        "services[0].ports[0]",
        "70000 is out of range 1..65535",
        "70000",
    ),
    (
        "port zero",
        (("internal_port: 7000", "internal_port: 0"),),
        "services[0].internal_port",
        "0 is out of range 1..65535",
        "internal_port: 0",
    ),
    (
        "soft limit above hard limit",
        (("soft_limit: 50, hard_limit: 100", "soft_limit: 300, hard_limit: 200"),),
        "services[1].concurrency",
        "soft_limit 300 > hard_limit 200",
        "soft_limit: 300",
    ),
    (
        "limit below one",
        (("soft_limit: 100, hard_limit: 200", "soft_limit: 0, hard_limit: 200"),),
        "services[0].concurrency.soft_limit",
        "0 is out of range",
        "soft_limit: 0",
    ),
    (
        "bad address",
        (("address: 198.18.64.12,", "address: 198.18.64.300,"),),
        "machines[7].address",
        "'198.18.64.300' is not an IP address",
        "198.18.64.300",
    ),
    (
        "IPv6 machine address",
        (("address: 198.18.64.12,", 'address: "fd00::12",'),),
        "machines[7].address",
        "fd00::12 is not an IPv4 address",
        "fd00::12",
    ),
    (
        "address used twice",
        (("address: 198.18.64.12,", "address: 198.18.64.11,"),),
        "machines[7].address",
        "198.18.64.11 is already machine web-ord-1's address",
        "web-ord-2",
    ),
    (
        "machine on an edge",
        (("host: worker-ord, address: 198.18.64.1,", "host: edge-ord, address: 198.18.64.1,"),),
        "machines[0].host",
        "host edge-ord has role edge; machines run on workers",
        "198.18.64.1,",
    ),
    (
        "same address and port twice",
        (("\nmachines:", "\n" + EXTRA_SERVICE),),
        "services[2].ports[0]",
        "198.19.1.1:7/tcp is already served by service echo-tcp",
        "# again",
    ),
    (
        "raw TCP address shared with another app",
        (("addresses: [198.19.0.80]", "addresses: [198.19.1.1]"),),
        "apps[0].addresses[0]",
        "198.19.1.1 is shared with app web, but service echo-tcp is raw TCP",
        "{name: echo",
    ),
    (
        "hostname in two apps",
        (
            (
                "{name: echo, addresses: [198.19.1.1]}",
                "{name: echo, addresses: [198.19.1.1], hostnames: [web.lab]}",
            ),
        ),
        "apps[1].hostnames[0]",
        "web.lab already belongs to app echo",
        "{name: web",
    ),
    (
        "shared HTTP address without hostnames",
        (
            ("\nservices:", "\n" + BLOG_APP.replace(", hostnames: [blog.lab]", "")),
            ("\nmachines:", "\n" + BLOG_SERVICE),
        ),
        "apps[2].addresses[0]",
        "the app needs hostnames to be routed",
        "{name: blog",
    ),
    (
        "udp with handlers",
        (("    protocol: tcp\n    ports: [80]", "    protocol: udp\n    ports: [80]"),),
        "services[1].handlers",
        "udp services carry raw datagrams",
        "handlers: [http]",
    ),
    (
        "http check without a path",
        (("{type: http, path: /healthz, ", "{type: http, "),),
        "services[1].checks[0].path",
        "an http check needs a path",
        "{type: http,",
    ),
    (
        "check timeout above interval",
        (
            (
                "{type: tcp, interval_ms: 1000, timeout_ms: 500",
                "{type: tcp, interval_ms: 100, timeout_ms: 500",
            ),
        ),
        "services[0].checks[0]",
        "timeout_ms 500 > interval_ms 100",
        "interval_ms: 100,",
    ),
    (
        "region without a distance",
        (("{code: syd, position: [-33.94, 151.18]}", "{code: syd}"),),
        "regions[2].position",
        "no distance between ord and syd",
        "{code: syd}",
    ),
    (
        "duplicate YAML key",
        (("{id: edge-ord, role: edge,", "{id: edge-ord, id: edge-x, role: edge,"),),
        "",
        "not valid YAML: duplicate key 'id'",
        "edge-x",
    ),
    (
        "unparseable YAML",
        (("  - {code: ams, position: [52.31, 4.76]}", "  - {code: ams, position: [52.31, 4.76]"),),
        "",
        "not valid YAML",
        None,  # libyaml reports where it gave up, not where the brace went missing
    ),
    (
        "missing top-level field",
        (("version: 1\n", ""),),
        "version",
        "missing required field",
        None,
    ),
]


@pytest.mark.parametrize(
    ("edits", "path", "reason", "needle"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refusal_names_path_line_and_reason(
    tmp_path: Path,
    edits: tuple[tuple[str, str], ...],
    path: str,
    reason: str,
    needle: str | None,
) -> None:
    text = edited(*edits)
    err = refusal(tmp_path, text)
    matching = [p for p in err.problems if p.path == path and reason in p.reason]
    assert matching, f"no problem at {path!r} with {reason!r} in:\n{err}"
    if needle is not None:
        assert matching[0].line == line_of(text, needle)
    else:
        assert matching[0].line is not None


def test_error_message_names_file_line_path_and_reason(tmp_path: Path) -> None:
    text = edited(("soft_limit: 50, hard_limit: 100", "soft_limit: 300, hard_limit: 200"))
    err = refusal(tmp_path, text)
    line = line_of(text, "soft_limit: 300")
    reason = "services[1].concurrency: soft_limit 300 > hard_limit 200"
    assert str(err) == f"{tmp_path / 'state.yaml'}:{line}: {reason}"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    err = refusal(
        tmp_path,
        edited(
            ("ports: [7]", "ports: [0]"), ("role: edge, region: ams", "role: edgy, region: ams")
        ),
    )
    assert {p.path for p in err.problems} == {"services[0].ports[0]", "hosts[1].role"}


def test_a_broken_entity_does_not_cascade_into_dangling_references(tmp_path: Path) -> None:
    # worker-ord's address is bad, but the machines on it still refer to a host that exists.
    err = refusal(tmp_path, edited(("address: 198.18.0.21}", "address: nowhere}")))
    assert [p.path for p in err.problems] == ["hosts[2].address"]


def test_parse_state_without_a_file_has_no_line() -> None:
    data = yaml.safe_load(LAB_TEXT)
    data["services"][0]["ports"] = ["seven"]
    with pytest.raises(StateError) as caught:
        parse_state(data, "etcd:/edgeproxy")
    assert str(caught.value) == (
        "etcd:/edgeproxy: services[0].ports[0]: expected an integer, got a string"
    )


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(StateError) as caught:
        parse_yaml("- just\n- a list\n", "s.yaml")
    assert str(caught.value) == "s.yaml:1: expected a mapping, got a list"


def test_http_apps_may_share_an_address_by_hostname(tmp_path: Path) -> None:
    file = tmp_path / "state.yaml"
    file.write_text(edited(("\nservices:", "\n" + BLOG_APP), ("\nmachines:", "\n" + BLOG_SERVICE)))
    state = load_state(file)
    assert state.apps["blog"].addresses == state.apps["web"].addresses


def test_apps_may_have_ipv6_addresses() -> None:
    data = yaml.safe_load(LAB_TEXT)
    data["apps"][0]["addresses"].append("fd00:19::1")
    state = parse_state(data, "test")
    assert state.apps["echo"].addresses[1] == IPv6Address("fd00:19::1")


def test_round_trip_through_plain_data_and_yaml() -> None:
    state = load_state(LAB_STATE)
    assert parse_state(to_dict(state), "round trip") == state
    assert parse_yaml(yaml.safe_dump(to_dict(state)), "round trip") == state


def with_latency(table: object) -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load(LAB_TEXT)
    data["latency_ms"] = table
    return data


def test_latency_table_is_symmetric_and_overrides_positions() -> None:
    state = parse_state(with_latency({"ord": {"ams": 200}, "syd": {"ord": 50}}), "test")
    assert state.distance("ams", "ord") == state.distance("ord", "ams") == 200
    assert state.distance("ord", "syd") == 50
    assert state.regions_nearest_first("ord") == ("ord", "syd", "ams")
    assert parse_state(to_dict(state), "round trip") == state


def test_latency_table_alone_gives_every_distance() -> None:
    data = with_latency({"ord": {"ams": 45, "syd": 95}, "ams": {"syd": 140}})
    for region in data["regions"]:  # type: ignore[attr-defined]
        del region["position"]
    state = parse_state(data, "test")
    assert state.regions_nearest_first("ams") == ("ams", "ord", "syd")
    assert state.distance("syd", "ams") == 140


@pytest.mark.parametrize(
    ("table", "path", "reason"),
    [
        ({"ord": {"fra": 10}}, "latency_ms.ord.fra", "unknown region fra"),
        ({"ord": {"ord": 0}}, "latency_ms.ord.ord", "0 ms from itself"),
        ({"ord": {"ams": -1}}, "latency_ms.ord.ams", "expected a number of ms >= 0"),
        ({"ord": {"ams": 45}, "ams": {"ord": 50}}, "latency_ms.ams.ord", "disagrees"),
        ({"ord": [1]}, "latency_ms.ord", "expected a mapping"),
    ],
)
def test_bad_latency_tables_are_refused(table: object, path: str, reason: str) -> None:
    with pytest.raises(StateError) as caught:
        parse_state(with_latency(table), "test")
    assert [(p.path, reason in p.reason) for p in caught.value.problems] == [(path, True)]


def test_positions_give_estimated_one_way_latency() -> None:
    state = load_state(LAB_STATE)
    km = haversine_km((41.97, -87.90), (52.31, 4.76))
    assert 6500 < km < 6700  # Chicago O'Hare to Amsterdam Schiphol
    assert state.distance("ord", "ams") == pytest.approx(km / 200)
    assert state.distance("ord", "ord") == 0
    assert state.regions_nearest_first("syd") == ("syd", "ord", "ams")


def test_state_is_frozen() -> None:
    state: ClusterState = load_state(LAB_STATE)
    with pytest.raises(AttributeError):
        state.version = 2  # type: ignore[misc]


def test_layered_mappings_behave_like_dicts() -> None:
    """Incremental layers each change over the last mapping (no 600k-entry copies);
    every intermediate mapping must stay what it was, and equal a plain dict."""
    import random

    from edgeproxy import state as st

    rng = random.Random(7)
    plain: dict[str, int] = {f"k{i}": i for i in range(50)}
    current: Mapping[str, int] = dict(plain)
    history: list[tuple[Mapping[str, int], dict[str, int]]] = []
    old_limit, st.LAYER_LIMIT = st.LAYER_LIMIT, 16  # flatten now and then too
    try:
        for _ in range(300):
            changes: dict[str, int | None] = {}
            for _ in range(rng.randrange(1, 4)):
                key = f"k{rng.randrange(70)}"
                changes[key] = None if rng.random() < 0.4 else rng.randrange(1000)
            for key, value in changes.items():
                if value is None:
                    plain.pop(key, None)
                else:
                    plain[key] = value
            current = st._updated(current, changes)
            history.append((current, dict(plain)))
            assert dict(current.items()) == plain and len(current) == len(plain)
            assert current == plain and set(current) == set(plain)
            assert all((k in current) == (k in plain) for k in (f"k{i}" for i in range(70)))
            assert all(current.get(k) == plain.get(k) for k in (f"k{i}" for i in range(70)))
    finally:
        st.LAYER_LIMIT = old_limit
    assert all(dict(m.items()) == snapshot for m, snapshot in history)
