"""The Prometheus endpoint: one table of metric names, one collector that reads at scrape.

``METRICS`` is the only place a metric name is written. The collector yields every
family in it from the sources of truth, read when Prometheus scrapes (the
prometheus-client custom-collector way; nothing copies counters on a timer):

- the kernel counters through ``Dataplane.read_counters()`` (per-CPU values are
  summed there, ids decoded into app and machine names; rows come in columns,
  rendered by ``KernelText`` with each machine's label text cached by id),
- the HTTP proxy's ``snapshot()``,
- the state source (``current()``, ``rejected``) for versions and for the
  ``service`` and ``region`` labels of kernel counters, which only know app,
  machine and internal port.

The endpoint listens on ``127.0.0.1:9109`` unless the daemon config says otherwise
(``metrics.listen``), and also answers ``/healthz`` and ``/ready`` for the daemon.
``tests/test_dashboard.py`` checks the Grafana dashboard against ``METRICS``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import platform
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol
from wsgiref.simple_server import make_server

import numpy as np
import numpy.typing as npt
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

from . import __version__
from .counters import (
    COUNTER_FIELDS,
    SERVICE_FIELDS,
    Ints,
    MachineRows,
    ServiceRows,
    U64s,
    objects,
)
from .proxy.stats import ProxySnapshot
from .state import ClusterState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .counters import Counters
    from .dataplane import DataplaneConfig

log = logging.getLogger("edgeproxy.metrics")

DEFAULT_LISTEN = "127.0.0.1:9109"
BUILD_LABELS = (__version__, platform.python_version())  # edgeproxy_build_info
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
    # kernel fast path, per machine (raw TCP): series appear with a machine's first
    # connection and stay while it exists (docs/DESIGN.md,
    # "Metrics: what a scrape writes")
    _m("edgeproxy_app_tcp_connects_total", "counter",
       "TCP connections the fast path opened to the machine", *MACHINE_LABELS),
    _m("edgeproxy_app_tcp_disconnects_total", "counter",
       "TCP connections that ended: both FINs (closed), a RST (reset) or the idle sweep "
       "(expired); summed over the service's machines", *SERVICE_LABELS, "reason"),
    _m("edgeproxy_app_tcp_active", "gauge",
       "Live TCP connections on the machine", *MACHINE_LABELS),
    _m("edgeproxy_app_bytes_total", "counter",
       "TCP payload bytes; in = client to machine, out = machine to client; summed over "
       "the service's machines", *SERVICE_LABELS, "direction"),
    _m("edgeproxy_app_packets_total", "counter",
       "TCP packets; in = client to machine, out = machine to client; summed over the "
       "service's machines", *SERVICE_LABELS, "direction"),
    # kernel fast path, per service (the disconnects, bytes and packets above too)
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
    _m("edgeproxy_app_cpu_seconds_total", "counter",
       "CPU time the proxy spent on the app's requests (proxy/cpushare.py)", "app"),
    _m("edgeproxy_app_cpu_throttled_total", "counter",
       "Requests answered 503 because the app stayed over its CPU budget", "app"),
    _m("edgeproxy_backhaul_refused_total", "counter",
       "Backhaul connections a worker closed: they came from no edge's address"),
    _m("edgeproxy_http_requests_path_total", "counter",
       "HTTP requests by the path that took them: lane (served on the fast lane's "
       "callbacks) or general (handed to the general path); on a worker, backhaul streams "
       "as backhaul-lane (served on callbacks) or backhaul-general (a task each)", "path"),
    _m("edgeproxy_http2_abuse_total", "counter",
       "HTTP/2 client connections closed with GOAWAY ENHANCE_YOUR_CALM, by the bound broken: "
       "rapid_reset, continuation_flood, settings_flood, ping_flood, zero_window, flood",
       "kind"),
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
    # the daemon itself
    _m("edgeproxy_build_info", "gauge",
       "Always 1; the labels say which edgeproxy and which Python run", "version", "python"),
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
        services: dict[tuple[str, int], str] = {}
        for s in state.services.values():  # the smallest id where two share a port
            key = (s.app, s.internal_port)
            if s.id < services.get(key, "\U0010ffff"):
                services[key] = s.id
        workers = {str(h.address): (h.id, h.region) for h in state.hosts.values()}
        return cls(_RegionOfMachine(state), services, workers)


class _RegionOfMachine(Mapping[str, str]):
    """machine id -> its host's region, looked up when asked: a scrape needs the
    regions of the machines whose label text it (re)builds, not a 600k-entry dict
    built at every state change."""

    __slots__ = ("_hosts", "_machines")

    def __init__(self, state: ClusterState) -> None:
        self._machines = state.machines
        self._hosts = {h.id: h.region for h in state.hosts.values()}

    def __getitem__(self, machine: str) -> str:
        return self._hosts.get(self._machines[machine].host, "")

    def get(self, machine: str, default: Any = None) -> Any:
        m = self._machines.get(machine)
        return default if m is None else self._hosts.get(m.host, "")

    def __iter__(self) -> Iterator[str]:
        return iter(self._machines)

    def __len__(self) -> int:
        return len(self._machines)


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
        self._kernel_text = KernelText()  # label text per machine, kept between scrapes
        self._kernel_lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary with the sources; skip the registration-time collect

    def collect(self) -> Iterator[Metric]:
        families = {m.name: _family(m) for m in METRICS}
        _add(families, "edgeproxy_build_info", BUILD_LABELS, 1)
        state = self.source.current() if self.source is not None else None
        labels = self._state_labels(state)
        self._add_state(families, state)
        if self.dataplane is not None:
            self._add_kernel(families, labels)
        if self.proxy is not None:
            snapshot = self._snapshot(self.proxy)
            add_proxy(families, snapshot, labels)
        return iter(families.values())

    def warm(self) -> int:
        """Build the label text of every machine in use now, busy or not, so the first
        scrape after many machines start carrying traffic does not build it (2-4 us a
        machine: seconds at 600,000). The daemon calls this when it has applied a whole
        state; it costs that time once, off the scrape path. Returns the machines seen."""
        if self.dataplane is None:
            return 0
        state = self.source.current() if self.source is not None else None
        labels = self._state_labels(state)
        counters = read_counters_retrying(self.dataplane, skip_idle=False)
        if counters is None:
            return 0
        with self._kernel_lock:
            self._kernel_text.warm(counters, labels)
        return len(counters.machines)

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
            with self._kernel_lock:  # two scrapes at once share the label cache
                add_kernel(f, counters, self.dataplane.config, labels, self._kernel_text)

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


def read_counters_retrying(dataplane: CounterSource, *, skip_idle: bool = True
                           ) -> Counters | None:
    """The kernel counters, or None when the maps cannot be read.

    The daemon syncs maps from a worker thread while a scrape reads them from the
    HTTP server's; a sync that changes the dataplane's id cache mid-read makes
    iteration fail with RuntimeError, and reading again a moment later succeeds.
    """
    for _ in range(READ_ATTEMPTS):
        try:
            return dataplane.read_counters(skip_idle=skip_idle)
        except RuntimeError:
            continue
        except OSError as exc:
            log.warning("reading kernel counters: %s", exc)
            return None
    return None


def _family(spec: MetricSpec) -> Metric:
    if spec.name in KERNEL_FAMILIES:
        return TextFamily(spec)
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
    """A kernel family with a sample per machine (or service), written as text.

    At 200k apps these run to millions of samples; prometheus-client spends several
    microseconds on each (a Sample, a label dict, escaping every value every time).
    ``KernelText`` adds *parts* (a line head, the rows' cached label text, a value
    column); ``chunks`` writes them ``BLOCK`` rows at a time with one C-level
    ``template % values`` each (``_block``), so a scrape never holds the whole body,
    and ``nbytes`` says how long the text will be before a byte of it is written
    (the endpoint's Content-Length). ``samples`` parses the text back on demand, so
    ``generate_latest`` and tests read it like any family.
    """

    def __init__(self, spec: MetricSpec) -> None:
        name = spec.name.removesuffix("_total") if spec.kind == "counter" else spec.name
        super().__init__(name, spec.help, spec.kind)
        self.spec = spec
        wire = spec.name
        # the HELP and TYPE lines; every sample line then *starts* with its newline
        self.head = (f"# HELP {wire} {_escape_help(spec.help)}\n"
                     f"# TYPE {wire} {spec.kind}").encode()
        self.parts: list[_Part] = []

    def add(self, head: str, rows: LabelRows, values: U64s, skip_zero: bool) -> None:
        """A line ``head + label text + value`` per row (rows with value 0 left out
        when ``skip_zero``). ``rows`` and ``values`` must not change afterwards."""
        if skip_zero:
            sel = np.flatnonzero(values)
            if len(sel) < len(values):
                rows, values = rows.take(sel), values[sel]
        if len(values):
            self.parts.append(_Part(head.encode(), rows, values))

    @property
    def nbytes(self) -> int:
        """The length of ``render()``, from the label texts' lengths and the values'
        digit counts (no text is written)."""
        return len(self.head) + 1 + sum(p.nbytes for p in self.parts)

    def chunks(self) -> Iterator[bytes]:
        """The family's text in pieces of at most ``BLOCK`` lines."""
        yield self.head
        for part in self.parts:
            yield from part.blocks()
        yield b"\n"

    @property
    def samples(self) -> list[Any]:
        return [s for family in text_string_to_metric_families(self.render().decode())
                for s in family.samples]

    @samples.setter
    def samples(self, value: list[Any]) -> None:
        pass  # Metric.__init__ sets an empty list; the samples are the text

    def render(self) -> bytes:
        return b"".join(self.chunks())


#: lines per ``template % values`` (a few hundred KB: the pieces stay in the CPU cache)
BLOCK = 4096
_POW10 = np.array([10**k for k in range(1, 20)], dtype=np.uint64)


def _digits(values: U64s) -> npt.NDArray[np.intp]:
    """Decimal digits of each value (as ``%d`` writes it: 0 is "0")."""
    return np.searchsorted(_POW10, values, side="right") + 1


@dataclass(frozen=True, slots=True)
class LabelRows:
    """Label text of rows: ``text`` holds each row's ``name="value",...} `` as a
    ``%``-format template (UTF-8, ``%`` written ``%%``); ``size`` its length on the
    wire (``%`` once)."""

    text: npt.NDArray[np.object_]  # of bytes
    size: Ints

    def take(self, sel: npt.NDArray[np.intp] | Ints) -> LabelRows:
        return LabelRows(self.text[sel], self.size[sel])


@dataclass(frozen=True, slots=True)
class _Part:
    head: bytes  # b"\nname{" or b"\nname{label=\"value\","
    rows: LabelRows
    values: U64s

    @property
    def nbytes(self) -> int:
        n = len(self.values)
        return (len(self.head) * n + int(self.rows.size.sum(dtype=np.int64))
                + int(_digits(self.values).sum(dtype=np.int64)))

    def blocks(self) -> Iterator[bytes]:
        head = self.head.replace(b"%", b"%%")
        sep = b"%d" + head
        text, values = self.rows.text, self.values
        for i in range(0, len(values), BLOCK):
            yield _block(head, sep, text[i:i + BLOCK].tolist(), values[i:i + BLOCK].tolist())


def _block(head: bytes, sep: bytes, texts: list[bytes], values: list[int]) -> bytes:
    """``head + text + str(value)`` for each row, in one C-level formatting: the
    template ``head text0 %d head text1 %d ...`` (texts have ``%`` escaped)."""
    return (head + sep.join(texts) + b"%d") % tuple(values)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{k}="{_escape_value(v)}"' if _SPECIAL.search(v) else f'{k}="{v}"'
                    for k, v in zip(names, values, strict=True))


_SPECIAL = re.compile(r'[\\\n"]')


def exposition(registry: Collector) -> tuple[int, Iterator[bytes]]:
    """(length, pieces) of the text exposition of everything ``registry`` collects.

    Everything is collected first (sources read, families built; prometheus-client
    writes the small families), so the length is known before the first byte goes
    out (a body cut short is then seen as such); the ``TextFamily`` lines are
    written while the pieces are consumed, ``SEND`` bytes or so at a time: the
    endpoint sends as it writes and never holds a body that can be 100s of MB."""
    families = [metric if isinstance(metric, TextFamily) else generate_latest(_One(metric))
                for metric in registry.collect()]
    size = sum(f.nbytes if isinstance(f, TextFamily) else len(f) for f in families)
    return size, _coalesced(families)


#: bytes per piece the endpoint sends
SEND = 1 << 19


def _coalesced(families: list[TextFamily | bytes]) -> Iterator[bytes]:
    pending: list[bytes] = []
    size = 0
    for family in families:
        for chunk in family.chunks() if isinstance(family, TextFamily) else (family,):
            if size + len(chunk) >= SEND and pending:
                yield b"".join(pending)
                pending, size = [], 0
            pending.append(chunk)
            size += len(chunk)
    if pending:
        yield b"".join(pending)


def render_chunks(registry: Collector) -> list[bytes]:
    """The text exposition of everything ``registry`` collects, in pieces."""
    return list(exposition(registry)[1])


def render(registry: Collector) -> bytes:
    return b"".join(render_chunks(registry))


class _One:
    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


#: per-machine and per-service kernel families: (extra label, its value, column) per
#: part. Columns are ``counters.COUNTER_FIELDS`` (machine families, and the service
#: totals of machine counters) or ``counters.SERVICE_FIELDS`` (service families).
KERNEL_FAMILIES: dict[str, tuple[tuple[str, str, str], ...]] = {
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
#: machine counters exported per service (summed over its machines), not per machine
TOTALS = ("closed", "reset", "expired", "packets_in", "bytes_in", "packets_out", "bytes_out")
_TOTAL_COLUMNS = [COUNTER_FIELDS.index(c) for c in TOTALS]


class _TextCache:
    """The label text of each service id, kept across scrapes (rebuilt when the
    id's app or name changed: an id freed and reused)."""

    def __init__(self) -> None:
        self.app: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.name: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.text: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.size = np.zeros(0, dtype=np.int64)

    def texts(self, s: ServiceRows) -> LabelRows:
        ids = s.ids
        if not len(ids):
            return LabelRows(np.empty(0, dtype=object), np.zeros(0, dtype=np.int64))
        need = int(ids.max()) + 1
        if need > len(self.text):
            size = max(need, 2 * len(self.text))
            self.app, self.name, self.text = (_grown(a, size) for a in
                                              (self.app, self.name, self.text))
            self.size = _grown(self.size, size, 0)
        stale = np.flatnonzero((self.app[ids] != s.apps) | (self.name[ids] != s.names))
        if len(stale):
            sids = ids[stale]
            self.app[sids], self.name[sids] = s.apps[stale], s.names[stale]
            self.text[sids], self.size[sids] = _label_texts(
                SERVICE_LABELS, s.apps[stale].tolist(), s.names[stale].tolist())
        return LabelRows(self.text[ids], self.size[ids])


def _label_texts(names: tuple[str, ...], *columns: list[str]) -> tuple[list[bytes], list[int]]:
    """(template, length on the wire) of ``name="value",...} `` for each row of
    ``columns`` (escaped where needed; ``%`` doubled in the template)."""
    rows = zip(*columns, strict=True)
    if any(_SPECIAL.search("".join(c)) for c in columns):
        texts = [_label_text(names, row) + "} " for row in rows]
    else:
        fmt = ",".join(f'{n}="{{}}"' for n in names) + "}} "
        texts = [fmt.format(*row) for row in rows]
    wire = list(map(str.encode, texts))
    sizes = list(map(len, wire))
    if any("%" in "".join(c) for c in columns):
        wire = [w.replace(b"%", b"%%") for w in wire]
    return wire, sizes


def _grown(a: npt.NDArray[Any], size: int, fill: Any = None) -> npt.NDArray[Any]:
    out = np.empty((size, *a.shape[1:]), dtype=a.dtype)
    if fill is not None:
        out[...] = fill
    out[:len(a)] = a
    return out


class _MachineCache:
    """Per machine id, kept across scrapes: its label text, its service group and
    its counters at the last scrape; per service group, what machines gone since
    (removed, their id reused, their counters zeroed) had counted.

    A row's text and group are rebuilt when its id now names another machine (app,
    name or internal port changed) or a new state changed its service or region
    label; the checks are vectorised, so only changed rows cost Python time. The
    service totals of ``TOTALS`` are the current machines' counters plus the
    retired ones, so they never go backwards when a machine goes away.
    """

    def __init__(self) -> None:
        self.app: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.name: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.port = np.zeros(0, dtype=np.int64)
        self.version = np.zeros(0, dtype=np.int64)
        self.service: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.region: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.text: npt.NDArray[np.object_] = np.empty(0, dtype=object)
        self.size = np.zeros(0, dtype=np.int64)
        self.group = np.zeros(0, dtype=np.int64)
        self.present = np.zeros(0, dtype=bool)
        self.last = np.zeros((0, len(TOTALS)), dtype=np.uint64)
        self.group_of: dict[str, int] = {}  # service id ("\n" + app: no service) -> group
        self.group_key: list[str] = []
        self.group_text: list[bytes] = []
        self.group_size: list[int] = []
        self._group_rows = LabelRows(np.empty(0, dtype=object), np.zeros(0, dtype=np.int64))
        self.retired = np.zeros((0, len(TOTALS)), dtype=np.uint64)

    def _grow(self, need: int) -> None:
        if need <= len(self.text):
            return
        size = max(need, 2 * len(self.text))
        self.app, self.name, self.service, self.region, self.text = (
            _grown(a, size) for a in (self.app, self.name, self.service, self.region, self.text))
        self.size = _grown(self.size, size, 0)
        self.port = _grown(self.port, size, -1)
        self.version = _grown(self.version, size, -1)
        self.group = _grown(self.group, size, -1)
        self.present = _grown(self.present, size, False)
        self.last = _grown(self.last, size, 0)

    def _groups(self, apps: list[str], services: list[str]) -> list[int]:
        """The group of each (app, service), new groups made as needed."""
        keys = [svc or "\n" + app for app, svc in zip(apps, services, strict=True)]
        get = self.group_of.get
        out = [get(k, -1) for k in keys]
        if -1 in out:
            first = {k: i for i, (k, g) in enumerate(zip(keys, out, strict=True)) if g < 0}
            for n, k in enumerate(first, len(self.group_key)):
                self.group_of[k] = n
                self.group_key.append(k)
            texts, sizes = _label_texts(SERVICE_LABELS, [apps[i] for i in first.values()],
                                        [services[i] for i in first.values()])
            self.group_text += texts
            self.group_size += sizes
            if len(self.retired) < len(self.group_text):
                self.retired = _grown(self.retired, 2 * len(self.group_text), 0)
            out = [get(k, -1) for k in keys]
        return out

    def _retire(self, mids: npt.NDArray[np.int64]) -> None:
        if len(mids):
            counted = mids[self.last[mids].any(axis=1)]  # idle rows (warmed ones) add 0
            _add_by_group(self.retired, self.group[counted], self.last[counted])
            self.last[mids] = 0
            self.present[mids] = False

    def forget_services(self, live: set[str]) -> None:
        """A new state: what removed services' gone machines counted is dropped."""
        dead = [g for g, k in enumerate(self.group_key)
                if k not in live and not k.startswith("\n")]  # "\n" + app: no service
        self.retired[dead] = 0

    def update(self, m: MachineRows, version: int, labels: StateLabels
               ) -> tuple[LabelRows, npt.NDArray[np.int64]]:
        """(label text, service group) of each row; updates the service totals."""
        ids = m.ids
        self._grow(int(ids.max()) + 1 if len(ids) else 0)
        at = _dense(ids)  # every id from 0 (all machines busy): views, not copies
        same = ((self.app[at] == m.apps) & (self.name[at] == m.names)
                & (self.port[at] == m.ports))
        stale = np.flatnonzero(~same | (self.version[at] != version))
        if len(stale):
            mids = ids[stale]
            apps, machines = m.apps[stale], m.names[stale]
            services_of, regions_of = labels.service_of_port, labels.region_of_machine
            services = objects([services_of.get(k, "") for k in
                                zip(apps.tolist(), m.ports[stale].tolist(), strict=True)])
            regions = objects([regions_of.get(k, "") for k in machines.tolist()])
            # a new state that leaves a row's labels as they were costs it no rebuild
            changed = np.flatnonzero(~same[stale] | (self.service[mids] != services)
                                     | (self.region[mids] != regions))
            self.version[mids] = version
            mids, apps, machines = mids[changed], apps[changed], machines[changed]
            services, regions = services[changed], regions[changed]
            columns = [c.tolist() for c in (apps, services, machines, regions)]
            groups = np.array(self._groups(columns[0], columns[1]), dtype=np.int64)
            moved = self.present[mids] & (~same[stale][changed] | (self.group[mids] != groups))
            self._retire(mids[moved])
            self.app[mids], self.name[mids], self.port[mids] = (
                apps, machines, m.ports[stale][changed])
            self.service[mids], self.region[mids], self.group[mids] = services, regions, groups
            self.text[mids], self.size[mids] = _label_texts(MACHINE_LABELS, *columns)
        now = np.zeros(len(self.present), dtype=bool)
        now[ids] = True
        self._retire(np.flatnonzero(self.present & ~now))
        values = m.values[:, _TOTAL_COLUMNS]
        reset = np.flatnonzero(self.present[at] & (values < self.last[at]).any(axis=1))
        self._retire(ids[reset])  # zeroed under the same name (removed and added again)
        self.present = now
        self.last[at] = values
        # copies, not views: the lines are written after the lock is released
        return LabelRows(self.text[ids], self.size[ids]), self.group[ids]

    def totals(self, groups: npt.NDArray[np.int64], values: U64s) -> tuple[LabelRows, U64s]:
        """(label text, ``TOTALS`` sums) per service group with a non-zero sum."""
        sums = self.retired[:len(self.group_text)].copy()
        _add_by_group(sums, groups, values[:, _TOTAL_COLUMNS])
        keep = np.flatnonzero(sums.any(axis=1))
        if len(self._group_rows.text) != len(self.group_text):  # groups are only added
            self._group_rows = LabelRows(objects(self.group_text),
                                         np.array(self.group_size, dtype=np.int64))
        return self._group_rows.take(keep), sums[keep]


def _dense(ids: Ints) -> Ints | slice:
    """``ids`` as a slice when they are exactly ``0 .. len - 1`` in order (indexing
    by a slice makes a view: no copy of 600,000 entries, no object touched)."""
    n = len(ids)
    if n and ids[0] == 0 and ids[-1] == n - 1 and bool((ids[1:] > ids[:-1]).all()):
        return slice(0, n)
    return ids


def _add_by_group(sums: U64s, groups: npt.NDArray[np.int64], values: U64s) -> None:
    """``sums[g] += values[i]`` for each row ``i`` of group ``g = groups[i]`` (what
    ``np.add.at`` does, several times faster: rows sorted by group, then one
    ``np.add.reduceat`` over each group's run of rows)."""
    if not len(groups):
        return
    if not (groups[1:] >= groups[:-1]).all():
        order = np.argsort(groups, kind="stable")
        groups, values = groups[order], values[order]
    starts = np.flatnonzero(np.concatenate(([True], groups[1:] != groups[:-1])))
    sums[groups[starts]] += np.add.reduceat(values, starts, axis=0)


class KernelText:
    """Renders the per-machine and per-service kernel families from the counters'
    columns, with label text kept between scrapes (``_MachineCache``, ``_TextCache``)."""

    def __init__(self) -> None:
        self.machines = _MachineCache()
        self.services = _TextCache()
        self._labels: StateLabels | None = None
        self._version = 0

    def _machines(self, rows: MachineRows, labels: StateLabels
                  ) -> tuple[LabelRows, npt.NDArray[np.int64]]:
        new_state = labels is not self._labels
        if new_state:
            self._labels, self._version = labels, self._version + 1
        texts, groups = self.machines.update(rows, self._version, labels)
        if new_state:
            self.machines.forget_services(set(labels.service_of_port.values()))
        return texts, groups

    def warm(self, counters: Counters, labels: StateLabels) -> None:
        """Label text for every row of ``counters`` (idle ones too), as a scrape would
        build it; the next scrape then finds it all in the cache."""
        self._machines(MachineRows.of(counters.machines), labels)
        self.services.texts(ServiceRows.of(counters.services))

    def fill(self, f: Mapping[str, Metric], counters: Counters, labels: StateLabels) -> None:
        m = MachineRows.of(counters.machines).busy()
        s = ServiceRows.of(counters.services).busy()
        mtexts, groups = self._machines(m, labels)
        ttexts, totals = self.machines.totals(groups, m.values)
        stexts = self.services.texts(s)
        for name, parts in KERNEL_FAMILIES.items():
            family = f[name]
            assert isinstance(family, TextFamily)
            counter = family.spec.kind == "counter"
            for label, extra, column in parts:
                head = f'\n{name}{{{label}="{extra}",' if label else f"\n{name}{{"
                if column in TOTALS:
                    texts, values = ttexts, totals[:, TOTALS.index(column)]
                elif column in COUNTER_FIELDS:
                    texts, values = mtexts, m.values[:, COUNTER_FIELDS.index(column)]
                else:
                    texts, values = stexts, s.values[:, SERVICE_FIELDS.index(column)]
                family.add(head, texts, values, counter)


def add_kernel(f: Mapping[str, Metric], counters: Counters, config: DataplaneConfig,
               labels: StateLabels, text: KernelText | None = None) -> None:
    """Kernel counters into their families (one sample per machine, service, kind).

    Rows come from ``read_counters(skip_idle=True)``: machines and services whose
    counters are all zero (no traffic since their id was assigned) are not there,
    so series grow with the machines that have traffic rather than with the state.
    A counter series appears with its first count (as a labelled prometheus-client
    counter does) and, counters never going down, stays while its machine (or
    service) id exists; ``edgeproxy_app_tcp_active`` is there for every machine that
    has any series.
    """
    (text or KernelText()).fill(f, counters, labels)
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
    for app, seconds in sorted(snap.cpu_seconds.items()):
        _add(f, "edgeproxy_app_cpu_seconds_total", (app,), seconds)
    for app, count in sorted(snap.cpu_throttled.items()):
        _add(f, "edgeproxy_app_cpu_throttled_total", (app,), count)
    _add(f, "edgeproxy_backhaul_refused_total", (), snap.backhaul_refused)
    _add(f, "edgeproxy_http_requests_path_total", ("lane",), snap.lane_requests)
    _add(f, "edgeproxy_http_requests_path_total", ("general",), snap.general_requests)
    _add(f, "edgeproxy_http_requests_path_total", ("backhaul-lane",),
         snap.backhaul_lane_requests)
    _add(f, "edgeproxy_http_requests_path_total", ("backhaul-general",),
         snap.backhaul_general_requests)
    for kind, count in sorted(snap.http2_abuse.items()):
        _add(f, "edgeproxy_http2_abuse_total", (kind,), count)
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


#: Why the daemon is not ready (``GET /ready`` answers 503 with it), or None: ready.
Readiness = Callable[[], str | None]


def _always_ready() -> str | None:
    return None


def _text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data)))])
    return [data]


def _serve(host: str, port: int, endpoint: MetricsEndpoint) -> WSGIServer:
    """prometheus-client's ``start_http_server``, with ``exposition`` as the body,
    sent while it is written (no OpenMetrics negotiation or gzip: Prometheus takes
    plain text by default); beside it ``/healthz`` and ``/ready``."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":  # answering at all is the proof of life
            return _text(start_response, "200 OK", "ok\n")
        if path == "/ready":
            reason = endpoint.ready()
            if reason is None:
                return _text(start_response, "200 OK", "ready\n")
            return _text(start_response, "503 Service Unavailable", f"not ready: {reason}\n")
        if path not in ("/", "/metrics"):
            return _text(start_response, "404 Not Found", "not found\n")
        if not endpoint.collecting:
            return _text(start_response, "503 Service Unavailable", "starting\n")
        size, chunks = exposition(endpoint.registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST),
                                  ("Content-Length", str(size))])
        return chunks

    server = _Server6 if ":" in host else _Server4
    httpd: WSGIServer = make_server(host, port, app, server, handler_class=_SilentHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics").start()
    return httpd


class MetricsEndpoint:
    """The HTTP server Prometheus scrapes (``/metrics``), with the daemon's own
    ``/healthz`` (200 while the process answers) and ``/ready`` (200, or 503 and
    the reason ``ready`` gives). The daemon starts it first, so both answer while it
    loads; ``/metrics`` answers 503 until ``collect()`` hands it the collector.
    ``close()`` stops it."""

    def __init__(self, registry: CollectorRegistry, ready: Readiness) -> None:
        self.registry = registry
        self.ready = ready
        self.collecting = False
        self.server: WSGIServer | None = None

    @classmethod
    def start(cls, listen: str, collector: Collector | None = None, *,
              ready: Readiness = _always_ready) -> MetricsEndpoint:
        host, port = parse_listen(listen)
        endpoint = cls(CollectorRegistry(auto_describe=False), ready)
        if collector is not None:
            endpoint.collect(collector)
        endpoint.server = _serve(host, port, endpoint)
        log.info("metrics on http://%s/metrics (and /healthz, /ready)", listen)
        return endpoint

    def collect(self, collector: Collector) -> None:
        """Serve ``collector`` on /metrics from now on."""
        self.registry.register(collector)
        self.collecting = True

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def close(self) -> None:
        if self.server is not None:
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
