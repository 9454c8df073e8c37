"""The metrics table, the scrape-time collector, the endpoint, and (lab) agreement
between /metrics, `edgectl stats` and the traffic that was sent."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, LabHandle
from edgeproxy.config import parse_config
from edgeproxy.counters import MachineRows
from edgeproxy.dataplane import Counters, DataplaneConfig, MachineCounters, ServiceCounters
from edgeproxy.metrics import (
    BY_NAME,
    DEFAULT_LISTEN,
    METRICS,
    EdgeproxyCollector,
    MetricsEndpoint,
    exported_series,
    http_responses_from_exposition,
    parse_listen,
    render,
)
from edgeproxy.proxy.backhaul import BackhaulHealth
from edgeproxy.proxy.stats import Histogram, ProxySnapshot
from edgeproxy.state import ClusterState, parse_yaml

STATE_YAML = """\
version: 7
regions:
  - {code: ord, position: [41.97, -87.90]}
  - {code: ams, position: [52.31, 4.76]}
hosts:
  - {id: edge-ord, role: edge, region: ord, address: 198.18.0.11}
  - {id: worker-ord, role: worker, region: ord, address: 198.18.0.21}
  - {id: worker-ams, role: worker, region: ams, address: 198.18.0.22}
apps:
  - {name: echo, addresses: [198.19.1.1]}
  - {name: web, addresses: [198.19.0.80], hostnames: [web.lab]}
services:
  - {id: echo-tcp, app: echo, protocol: tcp, ports: [7], internal_port: 7000, handlers: [],
     concurrency: {type: connections, soft_limit: 10, hard_limit: 20}}
  - {id: web-http, app: web, protocol: tcp, ports: [80], internal_port: 8080,
     handlers: [http], concurrency: {type: requests, soft_limit: 10, hard_limit: 20}}
machines:
  - {id: echo-ord-1, app: echo, host: worker-ord, address: 198.18.64.1, state: started}
  - {id: echo-ams-1, app: echo, host: worker-ams, address: 198.18.65.1, state: started}
  - {id: web-ams-1, app: web, host: worker-ams, address: 198.18.65.11, state: started}
"""
EDGE_CONFIG = DataplaneConfig(instance="t", role="edge", host_address=IPv4Address("198.18.0.11"))


def machine(name: str, app: str = "echo", port: int = 7000, **values: int) -> MachineCounters:
    fields = dict(opened=0, active=0, closed=0, reset=0, expired=0, packets_in=0, bytes_in=0,
                  packets_out=0, bytes_out=0)
    fields.update(values)
    return MachineCounters(app, name, port, **fields)


def full_counters() -> Counters:
    return Counters(
        machines=(machine("echo-ord-1", opened=5, active=1, closed=3, reset=1, packets_in=20,
                          bytes_in=500, packets_out=25, bytes_out=600),
                  machine("echo-ams-1", opened=2, closed=2, bytes_in=10, bytes_out=30)),
        services=(ServiceCounters("echo", "echo-tcp", refused=4, dropped=1, no_backend=5,
                                  flood=1, resteered=2),),
        stats={"packets": 100, "forwarded": 60},
        anomalies={"bad_ip": 3, "fragment": 0},
    )


def full_snapshot() -> ProxySnapshot:
    hist = Histogram()
    for seconds in (0.002, 0.02, 0.3):
        hist.observe(seconds)
    return ProxySnapshot(
        responses={("web", 200): 3, ("web", 503): 1, ("", 404): 2},
        in_flight={("web", "web-ams-1"): 2},
        queue_depth={"web": 1},
        retries={"web": 1},
        replays={"web": 0},
        response_seconds={"web": hist.cumulative()},
        response_seconds_sum={"web": hist.total},
        backhaul={"198.18.0.22": BackhaulHealth("198.18.0.22", "up", 0.09, 2, 1, 0)},
        cpu_seconds={"web": 0.25},
        cpu_throttled={"web": 2},
        backhaul_refused=1,
        http2_abuse={"rapid_reset": 1},
        lane_requests=7,
        general_requests=2,
        backhaul_lane_requests=5,
        backhaul_general_requests=1,
    )


@dataclass
class FakeDataplane:
    counters: Counters
    config: DataplaneConfig = EDGE_CONFIG
    reads: int = 0
    fail_with: list[Exception] = field(default_factory=list)

    def read_counters(self, *, skip_idle: bool = False) -> Counters:
        self.reads += 1
        if self.fail_with:
            raise self.fail_with.pop(0)
        return self.counters


@dataclass
class FakeProxy:
    snap: ProxySnapshot
    threads: list[int] = field(default_factory=list)

    def snapshot(self) -> ProxySnapshot:
        self.threads.append(threading.get_ident())
        return self.snap


@dataclass
class FakeSource:
    state: ClusterState
    rejected: int = 0

    def current(self) -> ClusterState:
        return self.state


def scrape(collector: EdgeproxyCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    matches = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x
                                                            for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def full_collector() -> tuple[EdgeproxyCollector, FakeDataplane, FakeSource]:
    dp = FakeDataplane(full_counters())
    source = FakeSource(parse_yaml(STATE_YAML, "state.yaml"), rejected=2)
    collector = EdgeproxyCollector(dataplane=dp, proxy=FakeProxy(full_snapshot()),
                                   source=source, last_applied=lambda: 1700000000.0)
    return collector, dp, source


# -------------------------------------------------------------- the table


def test_names_are_defined_once_and_follow_conventions() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names)) == len(BY_NAME)
    for m in METRICS:
        assert m.name.startswith("edgeproxy_"), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert m.help and m.help[0].isupper(), m.name
    issue = {"edgeproxy_app_tcp_connects_total", "edgeproxy_app_tcp_disconnects_total",
             "edgeproxy_app_tcp_active", "edgeproxy_app_tcp_refused_total",
             "edgeproxy_app_bytes_total", "edgeproxy_app_packets_total",
             "edgeproxy_app_http_responses_total", "edgeproxy_app_http_response_seconds",
             "edgeproxy_app_concurrency", "edgeproxy_app_queue_depth",
             "edgeproxy_retries_total", "edgeproxy_replays_total"}
    assert issue <= set(names)
    for prefix in ("edgeproxy_backhaul_", "edgeproxy_state_", "edgeproxy_bpf_"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert "edgeproxy_app_http_response_seconds_bucket" in exported_series()


def test_warming_builds_label_text_ahead_and_changes_no_output() -> None:
    cold, _, _ = full_collector()
    warm, dp, _ = full_collector()
    assert warm.warm() == len(dp.counters.machines) > 0
    cache = warm._kernel_text.machines
    ids = MachineRows.of(dp.counters.machines).ids
    assert all(isinstance(t, bytes) and t.endswith(b"} ") for t in cache.text[ids])
    built = cache.text[ids].tolist()
    assert scrape(warm) == scrape(cold)
    # the scrape used the warmed text: same objects, nothing rebuilt
    assert all(a is b for a, b in zip(built, cache.text[ids].tolist(), strict=True))


def test_collector_emits_exactly_the_table() -> None:
    collector, _, _ = full_collector()
    samples = scrape(collector)
    assert set(samples) == exported_series()
    for m in METRICS:
        for name in m.series:
            for labels, _ in samples[name]:
                assert set(labels) - {"le"} == set(m.labels), (name, labels)


def test_kernel_counters_get_service_and_region_from_state() -> None:
    samples = scrape(full_collector()[0])
    key = dict(app="echo", service="echo-tcp", machine="echo-ord-1", region="ord")
    assert value(samples, "edgeproxy_app_tcp_connects_total", **key) == 5
    assert value(samples, "edgeproxy_app_tcp_active", **key) == 1
    assert value(samples, "edgeproxy_app_tcp_connects_total", machine="echo-ams-1",
                 region="ams") == 2
    # disconnects, bytes and packets: per service, summed over its machines
    svc = dict(app="echo", service="echo-tcp")
    assert value(samples, "edgeproxy_app_tcp_disconnects_total", **svc, reason="reset") == 1
    assert value(samples, "edgeproxy_app_tcp_disconnects_total", **svc, reason="closed") == 5
    assert value(samples, "edgeproxy_app_bytes_total", **svc, direction="out") == 630
    assert value(samples, "edgeproxy_app_bytes_total", **svc, direction="in") == 510
    assert value(samples, "edgeproxy_app_packets_total", **svc, direction="in") == 20
    assert value(samples, "edgeproxy_app_tcp_refused_total", app="echo",
                 service="echo-tcp") == 4
    assert value(samples, "edgeproxy_bpf_anomalies_total", kind="bad_ip") == 3
    assert value(samples, "edgeproxy_bpf_packets_total", role="edge", result="forwarded") == 60
    assert value(samples, "edgeproxy_bpf_map_entries", map="machines") == 2
    assert value(samples, "edgeproxy_bpf_map_max_entries", map="machines") == 65536
    assert value(samples, "edgeproxy_bpf_up") == 1


def test_proxy_and_state_series() -> None:
    samples = scrape(full_collector()[0])
    assert value(samples, "edgeproxy_app_http_responses_total", app="web", status="200") == 3
    assert value(samples, "edgeproxy_app_http_responses_total", app="", status="404") == 2
    assert value(samples, "edgeproxy_app_http_response_seconds_count", app="web") == 3
    assert value(samples, "edgeproxy_app_http_response_seconds_bucket", app="web",
                 le="0.025") == 2
    assert value(samples, "edgeproxy_app_http_response_seconds_sum", app="web") == \
        pytest.approx(0.322)
    assert value(samples, "edgeproxy_app_concurrency", machine="web-ams-1", region="ams") == 2
    assert value(samples, "edgeproxy_app_queue_depth", app="web") == 1
    assert value(samples, "edgeproxy_backhaul_up", worker="worker-ams", region="ams") == 1
    assert value(samples, "edgeproxy_backhaul_rtt_seconds", worker="worker-ams") == 0.09
    assert value(samples, "edgeproxy_state_version") == 7
    assert value(samples, "edgeproxy_state_rejected_updates_total") == 2
    assert value(samples, "edgeproxy_state_last_applied_timestamp_seconds") == 1700000000.0
    assert value(samples, "edgeproxy_state_entities", kind="machines") == 3


def test_zero_counters_are_left_out_and_a_series_stays_once_it_appeared() -> None:
    collector, dp, _ = full_collector()
    first = scrape(collector)
    key = dict(machine="echo-ams-1", region="ams")
    # nothing expired: no such series yet
    assert not [v for lab, v in first["edgeproxy_app_tcp_disconnects_total"]
                if lab["reason"] == "expired"]
    assert value(first, "edgeproxy_app_tcp_active", **key) == 0  # gauge: with its machine
    # an idle machine (all zero) has no series at all
    dp.counters = replace(full_counters(), machines=(
        *full_counters().machines, machine("echo-ord-2", app="echo")))
    second = scrape(collector)
    assert not [1 for series in second.values() for lab, _ in series
                if lab.get("machine") == "echo-ord-2"]
    # its connection closes: active goes back to 0, the counters stay
    dp.counters = replace(full_counters(), machines=(
        machine("echo-ord-1", opened=6, closed=5, reset=1),))
    third = scrape(collector)
    assert value(third, "edgeproxy_app_tcp_active", machine="echo-ord-1") == 0
    assert value(third, "edgeproxy_app_tcp_connects_total", machine="echo-ord-1") == 6


def test_service_totals_never_go_backwards_when_machines_go() -> None:
    """A machine removed (or its id reused, or its counters zeroed) leaves what it
    counted in its service's totals."""
    collector, dp, _ = full_collector()
    svc = dict(app="echo", service="echo-tcp")

    def bytes_in() -> float:
        return value(scrape(collector), "edgeproxy_app_bytes_total", **svc, direction="in")

    def by_id(**rows: MachineCounters) -> MachineRows:  # id name -> its counters
        r = MachineRows.of(list(rows.values()))
        ids = np.array([int(k.removeprefix("id")) for k in rows], dtype=np.int64)
        return MachineRows(ids, r.apps, r.names, r.ports, r.values)

    ord1, ams1 = full_counters().machines
    dp.counters = replace(full_counters(), machines=by_id(id0=ord1, id1=ams1))
    assert bytes_in() == 510
    dp.counters = replace(full_counters(), machines=by_id(id1=ams1))  # echo-ord-1 gone
    assert bytes_in() == 510
    dp.counters = replace(full_counters(), machines=by_id(id1=replace(ams1, bytes_in=15)))
    assert bytes_in() == 515
    # id 0 handed to a new machine of the same service
    dp.counters = replace(full_counters(), machines=by_id(
        id0=machine("echo-ord-9", opened=1, bytes_in=7), id1=replace(ams1, bytes_in=15)))
    assert bytes_in() == 522
    # echo-ams-1 zeroed under the same name and id: removed and added again
    dp.counters = replace(full_counters(), machines=by_id(
        id0=machine("echo-ord-9", opened=1, bytes_in=7),
        id1=replace(ams1, opened=1, bytes_in=1)))
    assert bytes_in() == 523


def test_label_text_follows_the_state_and_reused_ids() -> None:
    """Label text is cached per machine id: a new state (region) or an id handed to
    another machine must show in the next scrape, and odd characters are escaped."""
    collector, dp, source = full_collector()
    scrape(collector)
    ams1_text = collector._kernel_text.machines.text[1]  # echo-ams-1's, id 1
    moved = STATE_YAML.replace("{id: echo-ord-1, app: echo, host: worker-ord",
                               "{id: echo-ord-1, app: echo, host: worker-ams")
    source.state = parse_yaml(moved, "state.yaml")
    samples = scrape(collector)
    assert value(samples, "edgeproxy_app_tcp_connects_total", machine="echo-ord-1") == 5
    assert [lab["region"] for lab, _ in samples["edgeproxy_app_tcp_connects_total"]
            if lab["machine"] == "echo-ord-1"] == ["ams"]
    assert collector._kernel_text.machines.text[1] is ams1_text  # its labels kept: no rebuild
    odd = 'we"ird\\name\nx'
    dp.counters = replace(full_counters(), machines=(machine(odd, app="echo", opened=1),
                                                     *full_counters().machines[1:]))
    samples = scrape(collector)  # row 0 (id 0) now another machine
    assert value(samples, "edgeproxy_app_tcp_connects_total", machine=odd) == 1
    assert not [1 for lab, _ in samples["edgeproxy_app_tcp_connects_total"]
                if lab["machine"] == "echo-ord-1"]


def test_exposition_parses_and_is_prometheus_text() -> None:
    collector, _, _ = full_collector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = render(registry).decode()
    assert "\n\n" not in text and text.endswith("\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["edgeproxy_app_tcp_connects"].type == "counter"
    assert families["edgeproxy_app_tcp_active"].type == "gauge"
    assert text.count("# TYPE edgeproxy_app_bytes_total counter\n") == 1
    # the same samples as prometheus-client's own exposition of the collector
    def parsed(exposition: str) -> set[tuple[str, frozenset[tuple[str, str]], float]]:
        return {(s.name, frozenset(s.labels.items()), s.value)
                for f in text_string_to_metric_families(exposition) for s in f.samples}

    assert parsed(text) == parsed(generate_latest(registry).decode())


def test_counter_rows_in_columns_read_back_as_objects() -> None:
    machines = full_counters().machines
    rows = MachineRows.of(machines)
    assert list(rows) == list(machines) and rows[1] == machines[1] and len(rows) == 2
    assert rows.values.dtype == np.uint64 and list(rows.busy()) == list(machines)
    idle = MachineRows.of([*machines, machine("echo-ord-3")])
    assert [m.machine for m in idle.busy()] == ["echo-ord-1", "echo-ams-1"]
    assert Counters(machines=rows).machine("echo-ams-1") == machines[1]


def test_every_scrape_reads_the_sources_again() -> None:
    collector, dp, source = full_collector()
    first = scrape(collector)
    dp.counters = replace(full_counters(), machines=(machine("echo-ord-1", opened=9),))
    source.rejected = 3
    second = scrape(collector)
    assert dp.reads == 2
    assert value(first, "edgeproxy_app_tcp_connects_total", machine="echo-ord-1") == 5
    assert value(second, "edgeproxy_app_tcp_connects_total", machine="echo-ord-1") == 9
    assert value(second, "edgeproxy_state_rejected_updates_total") == 3


def test_a_read_racing_a_sync_is_retried_and_a_failed_read_reports_down() -> None:
    collector, dp, _ = full_collector()
    dp.fail_with = [RuntimeError("dictionary changed size during iteration")]
    assert value(scrape(collector), "edgeproxy_bpf_up") == 1
    dp.fail_with = [OSError(9, "Bad file descriptor")]
    samples = scrape(collector)
    assert value(samples, "edgeproxy_bpf_up") == 0
    assert "edgeproxy_app_tcp_connects_total" not in samples
    assert value(samples, "edgeproxy_state_version") == 7  # the rest still served


def test_worker_role_exports_its_packet_counters() -> None:
    worker = FakeDataplane(Counters(stats={"packets": 7, "decap": 5}),
                           config=replace(EDGE_CONFIG, role="worker"))
    samples = scrape(EdgeproxyCollector(dataplane=worker))
    assert value(samples, "edgeproxy_bpf_packets_total", role="worker", result="decap") == 5
    assert "edgeproxy_bpf_map_entries" not in samples


def test_proxy_snapshot_is_taken_on_the_proxy_loop() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        proxy = FakeProxy(full_snapshot())
        samples = scrape(EdgeproxyCollector(proxy=proxy, loop=loop))
        assert proxy.threads == [thread.ident]
        assert value(samples, "edgeproxy_app_queue_depth", app="web") == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_scrape_of_many_apps_is_bounded() -> None:
    """20,000 apps (40,000 machines) in the maps, 2,000 with traffic: series follow
    the apps with traffic, and the whole scrape (read, collect, text) stays bounded."""
    apps, busy = 20_000, 2_000
    counters = Counters(
        machines=tuple(machine(f"m{i}-{j}", app=f"app{i}", opened=int(i < busy))
                       for i in range(apps) for j in range(2)),
        services=tuple(ServiceCounters(f"app{i}", f"svc{i}", int(i < busy), 0, 0, 0, 0)
                       for i in range(apps)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeproxyCollector(dataplane=FakeDataplane(counters)))
    started = time.monotonic()
    text = generate_latest(registry).decode()
    elapsed = time.monotonic() - started
    assert text.count("\nedgeproxy_app_tcp_connects_total{") == 2 * busy
    assert text.count("\nedgeproxy_app_tcp_refused_total{") == busy
    assert 'edgeproxy_bpf_map_entries{map="machines"} 40000.0' in text
    assert elapsed < 2.0, f"{elapsed:.2f}s for {apps} apps, {busy} with traffic"


# ------------------------------------------------------------ the endpoint


def test_listen_defaults_to_loopback_and_parses() -> None:
    config = parse_config({"instance": "x", "role": "edge", "host_id": "h",
                           "state": {"source": "file", "path": "s.yaml"}})
    assert config.metrics_listen == DEFAULT_LISTEN == "127.0.0.1:9109"
    assert parse_listen("127.0.0.1:9109") == ("127.0.0.1", 9109)
    assert parse_listen("[::1]:9109") == ("::1", 9109)
    for bad in ("9109", "127.0.0.1:", "host:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match=r"metrics\.listen"):
            parse_listen(bad)


def test_endpoint_serves_the_collector_and_stops() -> None:
    endpoint = MetricsEndpoint.start("127.0.0.1:0", full_collector()[0])
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        endpoint.close()
    assert 'edgeproxy_app_tcp_connects_total{app="echo"' in text
    assert http_responses_from_exposition(text) == {"web": {"200": 3, "503": 1},
                                                    "": {"404": 2}}
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


# ------------------------------------------------------------------- lab

ECHO_CONNECTIONS = 6
ECHO_BYTES = 1000  # per connection, client -> machine
HTTP_OK = 5
HTTP_UNKNOWN_HOST = 3
EDGE = "edge-ord"
EDGECTL = str(REPO / ".venv" / "bin" / "edgectl")

# Runs in the client namespace: N raw TCP connections through the fast path, each
# reading the greeting, sending M bytes, reading them echoed, closing; then K
# HTTP requests through the edge's proxy. Prints what the machines said.
TRAFFIC = r"""
import json, socket, sys
N, M, OK, UNKNOWN = (int(a) for a in sys.argv[1:5])
TIMEOUT = 10
greetings = []
for i in range(N):
    with socket.create_connection(("198.19.1.1", 7), timeout=TIMEOUT) as s:
        f = s.makefile("rb")
        greetings.append(f.readline().decode())
        payload = bytes([65 + i % 26]) * M
        s.sendall(payload)
        echoed = b""
        while len(echoed) < M:
            chunk = s.recv(65536)
            if not chunk:
                break
            echoed += chunk
        assert echoed == payload, (len(echoed), M)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
statuses = []
for host in ["web.lab"] * OK + ["nobody.lab"] * UNKNOWN:
    with socket.create_connection(("198.19.0.80", 80), timeout=TIMEOUT) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        statuses.append(int(data.split(b" ", 2)[1]))
print(json.dumps({"greetings": greetings, "statuses": statuses}))
"""


def _edgectl(lab: LabHandle, *args: str) -> dict[str, object] | list[object]:
    done = lab.exec(EDGE, EDGECTL, *args, "-o", "json")
    assert done.returncode == 0, f"edgectl {args}: {done.returncode}\n{done.stderr}"
    data: dict[str, object] | list[object] = json.loads(done.stdout)
    return data


def _metrics(lab: LabHandle) -> dict[str, list[tuple[dict[str, str], float]]]:
    done = lab.exec(EDGE, "curl", "-sf", "--max-time", "5", f"http://{DEFAULT_LISTEN}/metrics")
    assert done.returncode == 0, done.stderr
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(done.stdout):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _sum(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
         **labels: str) -> int:
    return int(sum(v for lab, v in samples.get(name, [])
                   if all(lab.get(k) == x for k, x in labels.items())))


def _app(stats: object, app: str) -> dict[str, object]:
    assert isinstance(stats, dict)
    entries = [a for a in stats["apps"] if a["app"] == app]
    return dict(entries[0]) if entries else {"app": app, "tcp": None, "http_responses": {}}


@pytest.fixture
def sent_traffic(lab: LabHandle) -> Iterator[tuple[object, dict[str, object]]]:
    """Counters before, then the traffic's own report (greetings and statuses)."""
    before = _edgectl(lab, "stats")
    metrics_before = _metrics(lab)
    done = lab.exec(
        "client", str(REPO / ".venv" / "bin" / "python"), "-c", TRAFFIC,
        str(ECHO_CONNECTIONS), str(ECHO_BYTES), str(HTTP_OK), str(HTTP_UNKNOWN_HOST),
        timeout=120)
    assert done.returncode == 0, f"traffic failed (fast path carrying raw TCP?):\n{done.stderr}"
    report = json.loads(done.stdout)
    report["metrics_before"] = metrics_before
    yield before, report


@pytest.mark.root
@pytest.mark.lab
def test_stats_and_metrics_agree_with_the_traffic_sent(
        lab: LabHandle, sent_traffic: tuple[object, dict[str, object]]) -> None:
    before, report = sent_traffic
    greetings = report["greetings"]
    assert isinstance(greetings, list)
    assert report["statuses"] == [200] * HTTP_OK + [404] * HTTP_UNKNOWN_HOST
    greeting_bytes = sum(len(g.encode()) for g in greetings)
    # flows end with FIN both ways; give the last FIN/ACKs a moment to pass the edge
    deadline = time.monotonic() + 5
    while True:
        after = _edgectl(lab, "stats")
        echo_tcp = _app(after, "echo")["tcp"]
        assert isinstance(echo_tcp, dict)
        before_tcp = _app(before, "echo")["tcp"] or {}
        assert isinstance(before_tcp, dict)
        delta = {k: int(echo_tcp[k]) - int(before_tcp.get(k, 0)) for k in echo_tcp}
        if delta["disconnects"] >= ECHO_CONNECTIONS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta["connects"] == ECHO_CONNECTIONS
    assert delta["disconnects"] == ECHO_CONNECTIONS
    assert delta["bytes_in"] == ECHO_CONNECTIONS * ECHO_BYTES  # TCP payload: exact
    assert delta["bytes_out"] == ECHO_CONNECTIONS * ECHO_BYTES + greeting_bytes
    assert delta["refused"] == 0

    def responses(stats: object, app: str, status: str) -> int:
        http = _app(stats, app).get("http_responses") or {}
        assert isinstance(http, dict)
        return int(http.get(status, 0))

    assert responses(after, "web", "200") - responses(before, "web", "200") == HTTP_OK
    assert responses(after, "", "404") - responses(before, "", "404") == HTTP_UNKNOWN_HOST

    # /metrics agrees with edgectl (nothing ran between the two reads). The per-service
    # sums (bytes, disconnects) also keep what machines gone since counted (a counter
    # never goes back), which edgectl, reading only the maps, cannot: compare what the
    # traffic added to each.
    samples = _metrics(lab)
    old = report["metrics_before"]
    assert isinstance(old, dict)
    assert _sum(samples, "edgeproxy_app_tcp_connects_total", app="echo") == \
        echo_tcp["connects"]
    for family, stat, labels in (
            ("edgeproxy_app_bytes_total", "bytes_in", {"direction": "in"}),
            ("edgeproxy_app_bytes_total", "bytes_out", {"direction": "out"}),
            ("edgeproxy_app_tcp_disconnects_total", "disconnects", {})):
        added = _sum(samples, family, app="echo", **labels) - _sum(old, family, app="echo",
                                                                     **labels)
        assert added == delta[stat], (family, labels)
    assert _sum(samples, "edgeproxy_app_tcp_active", app="echo") == echo_tcp["active"]
    assert _sum(samples, "edgeproxy_app_http_responses_total", app="web", status="200") == \
        responses(after, "web", "200")
    assert _sum(samples, "edgeproxy_app_http_responses_total", app="", status="404") == \
        responses(after, "", "404")
    assert _sum(samples, "edgeproxy_state_version") >= 1
    assert _sum(samples, "edgeproxy_bpf_up") == 1
    regions = {lab_["region"] for lab_, _ in samples["edgeproxy_app_tcp_connects_total"]
               if lab_["app"] == "echo"}
    assert regions <= {"ord", "ams", "syd"} and regions

    # the flows, by app and machine name, in conntrack and in `conns`
    greeted = {g.split()[0] for g in greetings}
    flows = _edgectl(lab, "conns", "--app", "echo")
    assert isinstance(flows, list)
    assert {f["machine"] for f in flows} >= greeted
    assert all(f["app"] == "echo" and f["service"] == "echo-tcp" for f in flows)
    assert sum(f["state"] == "closed" for f in flows) >= ECHO_CONNECTIONS
    dumped = _edgectl(lab, "maps", "dump", "conntrack", "--app", "echo")
    assert isinstance(dumped, list)
    assert {d["machine"] for d in dumped} >= greeted
    assert all(d["vip"] == "198.19.1.1:7" for d in dumped)


def test_request_paths_are_one_family_with_the_worker_lane() -> None:
    collector, _, _ = full_collector()
    samples = scrape(collector)
    paths = {labels["path"]: value for labels, value in samples[
        "edgeproxy_http_requests_path_total"]}
    assert paths == {"lane": 7, "general": 2, "backhaul-lane": 5, "backhaul-general": 1}
