"""The Prometheus endpoint: one table of metric names, one collector that reads at scrape.

``METRICS`` is the only place a metric name is written. The collector yields every
family in it from the sources of truth, read when Prometheus scrapes (the
prometheus-client custom-collector way; nothing copies counters on a timer):

- the kernel counters through ``Dataplane.read_counters()`` (per-CPU values are
  summed there, ids decoded into app and machine names),
- the HTTP proxy's ``snapshot()``,
- the state source (``current()``, ``rejected``) for versions and for the
  ``service`` and ``region`` labels of kernel counters, which only know app,
  machine and internal port.

The endpoint listens on ``127.0.0.1:9109`` unless the daemon config says otherwise
(``metrics.listen``). ``tests/test_dashboard.py`` checks the Grafana dashboard
against ``METRICS``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import operator
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol
from wsgiref.simple_server import make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .proxy.stats import ProxySnapshot
from .state import ClusterState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .dataplane import Counters, DataplaneConfig

log = logging.getLogger("edgeproxy.metrics")

DEFAULT_LISTEN = "127.0.0.1:9109"
Kind = Literal["counter", "gauge", "histogram"]

MACHINE_LABELS = ("app", "service", "machine", "region")
SERVICE_LABELS = ("app", "service")
BACKHAUL_LABELS = ("worker", "region")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exported; counters end in _total
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names this family puts on the wire."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


def _m(name: str, kind: Kind, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, kind, help, labels)


#: Every metric the daemon exports. Nothing else may name one.
METRICS: tuple[MetricSpec, ...] = (
    # kernel fast path, per machine (raw TCP)
    _m("edgeproxy_app_tcp_connects_total", "counter",
       "TCP connections the fast path opened to the machine", *MACHINE_LABELS),
    _m("edgeproxy_app_tcp_disconnects_total", "counter",
       "TCP connections that ended: both FINs (closed), a RST (reset) or the idle sweep "
       "(expired)", *MACHINE_LABELS, "reason"),
    _m("edgeproxy_app_tcp_active", "gauge",
       "Live TCP connections on the machine", *MACHINE_LABELS),
    _m("edgeproxy_app_bytes_total", "counter",
       "TCP payload bytes; in = client to machine, out = machine to client",
       *MACHINE_LABELS, "direction"),
    _m("edgeproxy_app_packets_total", "counter",
       "TCP packets; in = client to machine, out = machine to client",
       *MACHINE_LABELS, "direction"),
    # kernel fast path, per service
    _m("edgeproxy_app_tcp_refused_total", "counter",
       "New TCP connections answered with RST: no machine had capacity", *SERVICE_LABELS),
    _m("edgeproxy_app_tcp_dropped_total", "counter",
       "New TCP connections dropped: no machine had capacity (refuse: drop)",
       *SERVICE_LABELS),
    _m("edgeproxy_app_tcp_no_backend_total", "counter",
       "New TCP connections that found no machine with capacity", *SERVICE_LABELS),
    _m("edgeproxy_app_tcp_flood_total", "counter",
       "New TCP connections over the per-CPU flood cap", *SERVICE_LABELS),
    _m("edgeproxy_app_tcp_resteered_total", "counter",
       "Mid-flow packets without conntrack steered by Maglev", *SERVICE_LABELS),
    # HTTP slow path
    _m("edgeproxy_app_http_responses_total", "counter",
       "HTTP responses sent to clients; app is empty for unknown hosts", "app", "status"),
    _m("edgeproxy_app_http_response_seconds", "histogram",
       "Time from request head to response head", "app"),
    _m("edgeproxy_app_concurrency", "gauge",
       "Requests (or connections) in flight from this edge to the machine",
       "app", "machine", "region"),
    _m("edgeproxy_app_queue_depth", "gauge", "Requests waiting for a slot", "app"),
    _m("edgeproxy_retries_total", "counter", "Requests sent to another machine", "app"),
    _m("edgeproxy_replays_total", "counter", "Requests replayed on Edgeproxy-Replay", "app"),
    _m("edgeproxy_backhaul_up", "gauge",
       "Whether the backhaul connection to the worker is up (1) or not (0)", *BACKHAUL_LABELS),
    _m("edgeproxy_backhaul_rtt_seconds", "gauge",
       "Last measured round trip to the worker (HTTP/2 PING)", *BACKHAUL_LABELS),
    _m("edgeproxy_backhaul_open_streams", "gauge",
       "Streams open on the backhaul connection", *BACKHAUL_LABELS),
    _m("edgeproxy_backhaul_connects_total", "counter",
       "Backhaul connections established", *BACKHAUL_LABELS),
    _m("edgeproxy_backhaul_failures_total", "counter",
       "Backhaul connection attempts that failed", *BACKHAUL_LABELS),
    # cluster state
    _m("edgeproxy_state_version", "gauge", "Version of the state being served"),
    _m("edgeproxy_state_last_applied_timestamp_seconds", "gauge",
       "When the daemon last applied a state (Unix time)"),
    _m("edgeproxy_state_rejected_updates_total", "counter",
       "State updates refused by validation (the last good state kept serving)"),
    _m("edgeproxy_state_entities", "gauge", "Entities in the served state", "kind"),
    # kernel fast path, whole instance
    _m("edgeproxy_bpf_up", "gauge", "Whether the kernel counters could be read (1) or not (0)"),
    _m("edgeproxy_bpf_packets_total", "counter",
       "Packets seen by the fast path, by result", "role", "result"),
    _m("edgeproxy_bpf_anomalies_total", "counter",
       "Packets the fast path found malformed or unexpected, by kind", "kind"),
    _m("edgeproxy_bpf_map_entries", "gauge", "Entries in use in an id-allocated map", "map"),
    _m("edgeproxy_bpf_map_max_entries", "gauge", "Capacity of an id-allocated map", "map"),
)
BY_NAME: Mapping[str, MetricSpec] = {m.name: m for m in METRICS}


def exported_series() -> frozenset[str]:
    """Every sample name the endpoint can emit (histograms: _bucket, _sum, _count)."""
    return frozenset(s for m in METRICS for s in m.series)


# ------------------------------------------------------------------ sources


class CounterSource(Protocol):
    """What the collector needs of ``Dataplane``."""

    @property
    def config(self) -> DataplaneConfig: ...

    def read_counters(self, *, skip_idle: bool = False) -> Counters: ...


class SnapshotSource(Protocol):
    def snapshot(self) -> ProxySnapshot: ...


class StateView(Protocol):
    """What the collector needs of a ``StateSource``."""

    @property
    def rejected(self) -> int: ...

    def current(self) -> ClusterState: ...


@dataclass(frozen=True, slots=True)
class StateLabels:
    """Label values the kernel does not know, looked up in the state."""

    region_of_machine: Mapping[str, str]
    service_of_port: Mapping[tuple[str, int], str]  # (app, internal port) -> service id
    worker_of_address: Mapping[str, tuple[str, str]]  # host address -> (host id, region)

    @classmethod
    def of(cls, state: ClusterState | None) -> StateLabels:
        if state is None:
            return cls({}, {}, {})
        regions = {
            m.id: state.hosts[m.host].region if m.host in state.hosts else ""
            for m in state.machines.values()
        }
        services: dict[tuple[str, int], str] = {}
        for s in sorted(state.services.values(), key=lambda s: s.id):
            services.setdefault((s.app, s.internal_port), s.id)
        workers = {str(h.address): (h.id, h.region) for h in state.hosts.values()}
        return cls(regions, services, workers)


class EdgeproxyCollector(Collector):
    """Reads the kernel counters, the proxy snapshot and the state at each scrape."""

    def __init__(
        self,
        *,
        dataplane: CounterSource | None = None,
        proxy: SnapshotSource | None = None,
        source: StateView | None = None,
        last_applied: Callable[[], float | None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.proxy = proxy
        self.source = source
        self.last_applied = last_applied
        self.loop = loop  # the proxy's event loop: its snapshot is taken there
        self._labels_for: tuple[ClusterState | None, StateLabels] = (None, StateLabels.of(None))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary with the sources; skip the registration-time collect

    def collect(self) -> Iterator[Metric]:
        families = {m.name: _family(m) for m in METRICS}
        state = self.source.current() if self.source is not None else None
        labels = self._state_labels(state)
        self._add_state(families, state)
        if self.dataplane is not None:
            self._add_kernel(families, labels)
        if self.proxy is not None:
            snapshot = self._snapshot(self.proxy)
            add_proxy(families, snapshot, labels)
        return iter(families.values())

    def _state_labels(self, state: ClusterState | None) -> StateLabels:
        cached_state, cached = self._labels_for
        if state is not cached_state:
            cached = StateLabels.of(state)
            self._labels_for = (state, cached)
        return cached

    def _add_state(self, f: Mapping[str, Metric], state: ClusterState | None) -> None:
        if self.source is not None:
            _add(f, "edgeproxy_state_rejected_updates_total", (), self.source.rejected)
        if self.last_applied is not None:
            applied = self.last_applied()
            if applied is not None:
                _add(f, "edgeproxy_state_last_applied_timestamp_seconds", (), applied)
        if state is None:
            return
        _add(f, "edgeproxy_state_version", (), state.version)
        for kind, count in (("regions", len(state.regions)), ("hosts", len(state.hosts)),
                            ("apps", len(state.apps)), ("services", len(state.services)),
                            ("machines", len(state.machines))):
            _add(f, "edgeproxy_state_entities", (kind,), count)

    def _add_kernel(self, f: Mapping[str, Metric], labels: StateLabels) -> None:
        assert self.dataplane is not None
        counters = read_counters_retrying(self.dataplane)
        _add(f, "edgeproxy_bpf_up", (), 0 if counters is None else 1)
        if counters is not None:
            add_kernel(f, counters, self.dataplane.config, labels)

    def _snapshot(self, proxy: SnapshotSource) -> ProxySnapshot:
        loop = self.loop
        if loop is None or loop.is_closed() or _running_on(loop):
            return proxy.snapshot()
        # The proxy's counters change on its loop; read them there, between callbacks.
        done: concurrent.futures.Future[ProxySnapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result(proxy.snapshot())
            except Exception as exc:  # handed to the scraping thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return done.result(timeout=SNAPSHOT_TIMEOUT_S)


SNAPSHOT_TIMEOUT_S = 2.0
READ_ATTEMPTS = 3


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def read_counters_retrying(dataplane: CounterSource) -> Counters | None:
    """The kernel counters, or None when the maps cannot be read.

    The daemon syncs maps from a worker thread while a scrape reads them from the
    HTTP server's; a sync that changes the dataplane's id cache mid-read makes
    iteration fail with RuntimeError, and reading again a moment later succeeds.
    """
    for _ in range(READ_ATTEMPTS):
        try:
            return dataplane.read_counters(skip_idle=True)
        except RuntimeError:
            continue
        except OSError as exc:
            log.warning("reading kernel counters: %s", exc)
            return None
    return None


def _family(spec: MetricSpec) -> Metric:
    if spec.name in _TEXT_FAMILIES:
        return TextFamily(spec, _TEXT_FAMILIES[spec.name])
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)


def _add(f: Mapping[str, Metric], name: str, labels: tuple[str, ...], value: float) -> None:
    family = f[name]
    assert isinstance(family, (CounterMetricFamily, GaugeMetricFamily))
    family.add_metric(list(labels), value)


class TextFamily(Metric):
    """A kernel family with a sample per machine (or service), rendered straight to text.

    At 200k apps these run to hundreds of thousands of samples, and prometheus-client's
    exposition spends several microseconds on each (a Sample, a label dict, escaping
    every value every time). Here every family of one kind shares one list of rows
    (label text escaped once per machine, the counters object), and ``render`` writes
    a line per (row, part) with one f-string. ``samples`` still builds the usual
    Sample list on demand, so ``generate_latest`` and tests read it like any family.
    """

    def __init__(self, spec: MetricSpec, parts: tuple[tuple[str, str, str], ...]) -> None:
        super().__init__(spec.name, spec.help, spec.kind)
        self.sample_name = spec.name  # counters keep their _total on the wire
        self.label_names = spec.labels
        self.parts = parts  # (extra label name, its value, counters field); "" if none
        self.rows: list[tuple[str, tuple[str, ...], Any]] = []  # shared between families
        self._plain: list[Any] = []

    @property
    def samples(self) -> list[Any]:
        out = list(self._plain)
        for label, extra, attr in self.parts:
            for _, base, counters in self.rows:
                values = (*base, extra) if label else base
                out.append(Sample(self.sample_name,
                                  dict(zip(self.label_names, values, strict=True)),
                                  getattr(counters, attr)))
        return out

    @samples.setter
    def samples(self, value: list[Any]) -> None:
        self._plain = value

    def render(self) -> str:
        wire = self.sample_name
        out = [f"# HELP {wire} {_escape_help(self.documentation)}\n# TYPE {wire} {self.type}\n"]
        out += self.render_plain()
        for label, extra, attr in self.parts:
            head = self.sample_name + "{"
            tail = (f',{label}="{extra}"' if label else "") + "} "
            get = operator.attrgetter(attr)
            out += [f"{head}{text}{tail}{get(c)}\n" for text, _, c in self.rows]
        return "".join(out)

    def render_plain(self) -> list[str]:
        return [f"{s.name}{{{_label_text(tuple(s.labels), tuple(s.labels.values()))}}} "
                f"{float(s.value)!r}\n" for s in self._plain]


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{k}="{_escape_value(v)}"' if _SPECIAL.search(v) else f'{k}="{v}"'
                    for k, v in zip(names, values, strict=True))


_SPECIAL = re.compile(r'[\\\n"]')


def render(registry: Collector) -> bytes:
    """The text exposition of everything ``registry`` collects: ``TextFamily``
    families written directly, the rest by prometheus-client."""
    parts: list[bytes] = []
    for metric in registry.collect():
        if isinstance(metric, TextFamily):
            parts.append(metric.render().encode())
        else:
            parts.append(generate_latest(_One(metric)))
    return b"".join(parts)


class _One:
    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


#: per-machine and per-service kernel families: (extra label, its value, field) per part
_TEXT_FAMILIES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "edgeproxy_app_tcp_connects_total": (("", "", "opened"),),
    "edgeproxy_app_tcp_active": (("", "", "active"),),
    "edgeproxy_app_tcp_disconnects_total": (("reason", "closed", "closed"),
                                            ("reason", "reset", "reset"),
                                            ("reason", "expired", "expired")),
    "edgeproxy_app_bytes_total": (("direction", "in", "bytes_in"),
                                  ("direction", "out", "bytes_out")),
    "edgeproxy_app_packets_total": (("direction", "in", "packets_in"),
                                    ("direction", "out", "packets_out")),
    "edgeproxy_app_tcp_refused_total": (("", "", "refused"),),
    "edgeproxy_app_tcp_dropped_total": (("", "", "dropped"),),
    "edgeproxy_app_tcp_no_backend_total": (("", "", "no_backend"),),
    "edgeproxy_app_tcp_flood_total": (("", "", "flood"),),
    "edgeproxy_app_tcp_resteered_total": (("", "", "resteered"),),
}


def add_kernel(f: Mapping[str, Metric], counters: Counters, config: DataplaneConfig,
               labels: StateLabels) -> None:
    """Kernel counters into their families (one sample per machine, service, kind).

    Machines and services whose counters are all zero (no traffic since their id was
    assigned) are left out: an edge carries many apps and most see no raw TCP, so
    series grow with the apps that have traffic rather than with the state. The
    per-machine and per-service families are ``TextFamily`` s sharing one row list
    per kind (each machine's labels escaped once for all its series).
    """
    services_of, regions_of = labels.service_of_port, labels.region_of_machine
    machine_rows: list[tuple[str, tuple[str, ...], Any]] = []
    for m in counters.machines:
        if not (m.opened or m.active or m.packets_in or m.packets_out):
            continue
        base = (m.app, services_of.get((m.app, m.port), ""), m.machine,
                regions_of.get(m.machine, ""))
        app, service, machine, region = base
        text = (f'app="{app}",service="{service}",machine="{machine}",region="{region}"'
                if not _SPECIAL.search(f"{app}{service}{machine}{region}")
                else _label_text(MACHINE_LABELS, base))
        machine_rows.append((text, base, m))
    service_rows: list[tuple[str, tuple[str, ...], Any]] = []
    for s in counters.services:
        if not (s.refused or s.dropped or s.no_backend or s.flood or s.resteered):
            continue
        key = (s.app, s.service)
        service_rows.append((_label_text(SERVICE_LABELS, key), key, s))
    for name in _TEXT_FAMILIES:
        family = f[name]
        assert isinstance(family, TextFamily)
        by_machine = BY_NAME[name].labels[:4] == MACHINE_LABELS
        family.rows = machine_rows if by_machine else service_rows
    role = config.role
    for result, value in counters.stats.items():
        _add(f, "edgeproxy_bpf_packets_total", (role, result), value)
    for kind, value in counters.anomalies.items():
        _add(f, "edgeproxy_bpf_anomalies_total", (kind,), value)
    if role == "edge":
        machines, services = counters.in_use or (len(counters.machines), len(counters.services))
        for name, used, limit in (("machines", machines, config.max_machines),
                                  ("services", services, config.max_services)):
            _add(f, "edgeproxy_bpf_map_entries", (name,), used)
            _add(f, "edgeproxy_bpf_map_max_entries", (name,), limit)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf``, ``0.005``, ``1.0``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def add_proxy(f: Mapping[str, Metric], snap: ProxySnapshot, labels: StateLabels) -> None:
    """The HTTP proxy's snapshot into its families."""
    for (app, status), count in sorted(snap.responses.items()):
        _add(f, "edgeproxy_app_http_responses_total", (app, str(status)), count)
    histogram = f["edgeproxy_app_http_response_seconds"]
    assert isinstance(histogram, HistogramMetricFamily)
    for app, buckets in sorted(snap.response_seconds.items()):
        histogram.add_metric(
            [app], [(_le(bound), count) for bound, count in buckets],
            snap.response_seconds_sum.get(app, 0.0))
    for (app, machine), count in sorted(snap.in_flight.items()):
        region = labels.region_of_machine.get(machine, "")
        _add(f, "edgeproxy_app_concurrency", (app, machine, region), count)
    for app, depth in sorted(snap.queue_depth.items()):
        _add(f, "edgeproxy_app_queue_depth", (app,), depth)
    for app, count in sorted(snap.retries.items()):
        _add(f, "edgeproxy_retries_total", (app,), count)
    for app, count in sorted(snap.replays.items()):
        _add(f, "edgeproxy_replays_total", (app,), count)
    for address, health in sorted(snap.backhaul.items()):
        worker, region = labels.worker_of_address.get(address, (address, ""))
        key = (worker, region)
        _add(f, "edgeproxy_backhaul_up", key, 1 if health.state == "up" else 0)
        if health.rtt_seconds is not None:
            _add(f, "edgeproxy_backhaul_rtt_seconds", key, health.rtt_seconds)
        _add(f, "edgeproxy_backhaul_open_streams", key, health.open_streams)
        _add(f, "edgeproxy_backhaul_connects_total", key, health.connects)
        _add(f, "edgeproxy_backhaul_failures_total", key, health.failures)


# ----------------------------------------------------------------- endpoint


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError names the problem."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics.listen: {listen!r} is not host:port")
    return host.strip("[]"), int(port)


class _Server4(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


def _serve(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """prometheus-client's ``start_http_server``, with ``render`` as the exposition
    (no OpenMetrics negotiation or gzip: Prometheus takes plain text by default)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        body = render(registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST),
                                  ("Content-Length", str(len(body)))])
        return [body]

    server = _Server6 if ":" in host else _Server4
    httpd: WSGIServer = make_server(host, port, app, server, handler_class=_SilentHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics").start()
    return httpd


class MetricsEndpoint:
    """The HTTP server Prometheus scrapes; ``close()`` stops it."""

    def __init__(self, server: WSGIServer, registry: CollectorRegistry) -> None:
        self.server = server
        self.registry = registry

    @classmethod
    def start(cls, listen: str, collector: Collector) -> MetricsEndpoint:
        host, port = parse_listen(listen)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server = _serve(host, port, registry)
        log.info("metrics on http://%s/metrics", listen)
        return cls(server, registry)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------- reading the endpoint


def http_responses_from_exposition(text: str) -> dict[str, dict[str, int]]:
    """app -> status -> responses, from a scrape of this endpoint (for ``edgectl stats``)."""
    out: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "edgeproxy_app_http_responses_total":
                continue
            app, status = sample.labels.get("app", ""), sample.labels.get("status", "")
            if math.isfinite(sample.value):
                out.setdefault(app, {})[status] = int(sample.value)
    return out
