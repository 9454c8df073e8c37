"""The cluster state model and its validation.

Cluster state is the picture every edge follows: regions, hosts, apps, services and
machines, as flat lists that refer to each other by id (the shape the file, SQLite and
etcd sources all keep). ``parse_state`` turns plain data into a ``ClusterState`` or
raises ``StateError`` listing every problem, each naming its place as a path
(``services[1].concurrency``) and, when the data came from a YAML file, its line.

Validation is all-or-nothing: a state with any problem is refused whole, so the last
good state keeps serving (SPEC, "Cluster state").
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

IPAddress = IPv4Address | IPv6Address
HostRole = Literal["edge", "worker", "both"]
Transport = Literal["tcp", "udp"]
Handler = Literal["http", "tls", "proxy_proto"]
ConcurrencyType = Literal["connections", "requests"]
CheckType = Literal["tcp", "http"]
MachineState = Literal["started", "stopped"]

# Light in fibre covers about 200 km per millisecond; positions become an estimated
# one-way latency so they compare with an explicit ``latency_ms`` table.
FIBRE_KM_PER_MS = 200.0
EARTH_RADIUS_KM = 6371.0

MAX_CHECK_MS = 3_600_000  # an hour: anything longer is a typo, not a health check

_HOST_ROLES: dict[str, HostRole] = {"edge": "edge", "worker": "worker", "both": "both"}
_PROTOCOLS: dict[str, Transport] = {"tcp": "tcp", "udp": "udp"}
_HANDLERS: dict[str, Handler] = {"http": "http", "tls": "tls", "proxy_proto": "proxy_proto"}
_CONCURRENCY_TYPES: dict[str, ConcurrencyType] = {
    "connections": "connections",
    "requests": "requests",
}
_CHECK_TYPES: dict[str, CheckType] = {"tcp": "tcp", "http": "http"}
_MACHINE_STATES: dict[str, MachineState] = {"started": "started", "stopped": "stopped"}

# Ids end up in map dumps, metric labels and CLI tables: keep them plain.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)

T = TypeVar("T")
_OfApp = TypeVar("_OfApp", "Service", "Machine")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Region:
    code: str
    position: tuple[float, float] | None = None  # (latitude, longitude) in degrees


@dataclass(frozen=True, slots=True)
class Host:
    id: str
    role: HostRole
    region: str
    address: IPv4Address  # backhaul target; the encapsulation is IPv4

    @property
    def is_edge(self) -> bool:
        return self.role != "worker"

    @property
    def is_worker(self) -> bool:
        return self.role != "edge"


@dataclass(frozen=True, slots=True)
class App:
    name: str
    addresses: tuple[IPAddress, ...]
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Concurrency:
    type: ConcurrencyType
    soft_limit: int
    hard_limit: int


@dataclass(frozen=True, slots=True)
class Check:
    type: CheckType
    interval_ms: int
    timeout_ms: int
    grace_ms: int = 0
    path: str | None = None  # the request path of an ``http`` check


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    app: str
    protocol: Transport
    ports: tuple[int, ...]
    internal_port: int
    handlers: tuple[Handler, ...]
    concurrency: Concurrency
    checks: tuple[Check, ...] = ()

    @property
    def routed_by_hostname(self) -> bool:
        """True when the edge picks the app by Host/SNI, so apps may share an address."""
        return "http" in self.handlers or "tls" in self.handlers


@dataclass(frozen=True, slots=True)
class Machine:
    id: str
    app: str
    host: str
    address: IPv4Address  # Backend.address is IPv4: the worker's local network
    state: MachineState


def _by_app(items: Iterable[_OfApp]) -> dict[str, tuple[_OfApp, ...]]:
    groups: dict[str, list[_OfApp]] = {}
    for item in items:
        groups.setdefault(item.app, []).append(item)
    return {app: tuple(members) for app, members in groups.items()}


@dataclass(frozen=True, slots=True)
class ClusterState:
    """A validated picture of the cluster; entities indexed by id (name for apps)."""

    version: int
    regions: Mapping[str, Region]
    hosts: Mapping[str, Host]
    apps: Mapping[str, App]
    services: Mapping[str, Service]
    machines: Mapping[str, Machine]
    # Explicit one-way latencies, keyed by the region pair in sorted order.
    latency_ms: Mapping[tuple[str, str], float] = field(default_factory=dict)
    services_by_app: Mapping[str, tuple[Service, ...]] = field(
        init=False, compare=False, repr=False
    )
    machines_by_app: Mapping[str, tuple[Machine, ...]] = field(
        init=False, compare=False, repr=False
    )
    # Apps whose app, services or machines differ from the state this one was derived
    # from by ``Incremental.apply``; None when unknown (a full parse): all of them.
    changed_apps: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Derived indexes; frozen dataclasses set their own fields through object.
        object.__setattr__(self, "services_by_app", _by_app(self.services.values()))
        object.__setattr__(self, "machines_by_app", _by_app(self.machines.values()))

    def distance(self, a: str, b: str) -> float:
        """Estimated one-way latency in ms between two regions (0 within a region)."""
        if a == b:
            return 0.0
        pair = (a, b) if a < b else (b, a)
        explicit = self.latency_ms.get(pair)
        if explicit is not None:
            return explicit
        pa, pb = self.regions[a].position, self.regions[b].position
        if pa is None or pb is None:
            # Validation makes sure every pair has a table entry or two positions.
            raise KeyError(f"no distance between regions {a} and {b}")
        return haversine_km(pa, pb) / FIBRE_KM_PER_MS

    def regions_nearest_first(self, origin: str) -> tuple[str, ...]:
        """Every region ordered by distance from ``origin``; ties by code, origin first."""
        return tuple(sorted(self.regions, key=lambda r: (self.distance(origin, r), r != origin, r)))


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (lat, lon) points in kilometres."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


# -------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a state was refused, and where."""

    path: str  # "services[1].concurrency.soft_limit"; "" for the document itself
    reason: str
    line: int | None = None  # 1-based line in the YAML file, when there is one

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class StateError(ValueError):
    """A state was refused; ``problems`` lists every reason found."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(p.format(source) for p in self.problems))


# ---------------------------------------------------------------------- validation


class _Missing:
    pass


_MISSING = _Missing()


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Problems:
    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, path: str, reason: str) -> None:
        self.items.append(Problem(path, reason))


_COPY_IDS = False  # while validating parsed YAML (``parse_yaml``): see ``_Fields.id``


class _Fields:
    """Reads one mapping's fields, reporting problems under its path.

    Each reader returns ``None`` after reporting a problem, and ``ok`` turns false,
    so the caller builds the entity only when every field was good.
    """

    def __init__(
        self,
        raw: object,
        path: str,
        problems: _Problems,
        required: tuple[str, ...],
        optional: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.problems = problems
        self.ok = True
        self.data: dict[object, object] = {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, got {_kind(raw)}")
            return
        self.data = raw
        for name in raw:
            if name not in required and name not in optional:
                self.fail(_join(path, str(name)), "unknown field")
        for name in required:
            if name not in raw:
                self.fail(_join(path, name), "missing required field")

    def at(self, name: str) -> str:
        return _join(self.path, name)

    def fail(self, path: str, reason: str) -> None:
        self.ok = False
        self.problems.add(path, reason)

    def raw(self, name: str) -> object:
        return self.data.get(name, _MISSING)

    def id(self, name: str) -> str | None:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return None
        if not isinstance(value, str):
            self.fail(self.at(name), f"expected a string, got {_kind(value)}")
            return None
        if not _ID_RE.match(value):
            self.fail(
                self.at(name),
                f"{value!r} is not a valid id (letters, digits, '.', '_', '-'; at most 63)",
            )
            return None
        if _COPY_IDS:
            # A copy made now, next to the entity that keeps it: the YAML parser's
            # string sits among its node tree (gigabytes at 200k apps, freed after
            # the parse), and one survivor per block of that memory keeps the whole
            # block from the OS (4.7 GiB of RSS at 200k apps).
            return value.encode().decode()
        return value

    def ref(self, name: str) -> str | None:
        """An id that refers to another entity (an app, a host, a region): interned,
        so the 600,000 machines of a big state share one string per app and host
        rather than holding a copy each (every source hands us a new string per row)."""
        value = self.id(name)
        return sys.intern(value) if value is not None else None

    def rows(self, name: str) -> Iterable[object]:
        """A top-level list of entities: a list, or a ``RowStream`` read as it goes."""
        value = self.raw(name)
        if isinstance(value, RowStream):
            return value
        return self.items(name) or ()

    def choice(self, name: str, options: Mapping[str, T], default: T | None = None) -> T | None:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, str) and value in options:
            return options[value]
        self.fail(self.at(name), f"{value!r} is not one of {', '.join(options)}")
        return None

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int | None:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return default
        reason = _integer_problem(value, low, high)
        if reason is not None:
            self.fail(self.at(name), reason)
            return None
        assert isinstance(value, int)
        return value

    def integer_at(
        self, value: object, path: str, low: int, high: int, default: int | None = None
    ) -> int | None:
        if isinstance(value, _Missing):
            return default
        reason = _integer_problem(value, low, high)
        if reason is not None:
            self.fail(path, reason)
            return None
        assert isinstance(value, int)
        return value

    def items(self, name: str, default: list[object] | None = None) -> list[object] | None:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, list):
            self.fail(self.at(name), f"expected a list, got {_kind(value)}")
            return None
        return value

    def ipv4(self, name: str) -> IPv4Address | None:
        value = self.raw(name)
        if isinstance(value, _Missing):
            return None
        address = _parse_address(value)
        if isinstance(address, IPv4Address):
            return address
        reason = address if isinstance(address, str) else f"{value} is not an IPv4 address"
        self.fail(self.at(name), reason)
        return None

    def address_at(self, value: object, path: str) -> IPAddress | None:
        address = _parse_address(value)
        if isinstance(address, str):
            self.fail(path, address)
            return None
        return address


def _integer_problem(value: object, low: int, high: int) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an integer, got {_kind(value)}"
    if not low <= value <= high:
        return f"{value} is out of range {low}..{high}"
    return None


def _parse_address(value: object) -> IPAddress | str:
    """An address, or the reason the value is not one."""
    if not isinstance(value, str):
        return f"expected an IP address string, got {_kind(value)}"
    try:
        # inet_pton is C and as strict as ipaddress (no short forms, no leading zeros);
        # at 600k machines it is most of the cost of reading addresses.
        return IPv4Address(socket.inet_pton(socket.AF_INET, value))
    except OSError:
        pass
    try:
        return ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"


class RowStream:
    """A top-level entity list read lazily (``parse_state`` takes it where a list goes).

    A source that reads rows from a database hands one per table, so validation turns
    each row into its entity as it arrives and the plain rows of 600,000 machines are
    never all in memory at once. Iterated once.
    """

    __slots__ = ("_rows",)

    def __init__(self, rows: Iterable[object]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[object]:
        return iter(self._rows)


_SHARED: dict[object, object] = {}
_SHARED_MAX = 4096


def _shared(value: T) -> T:
    """One object per distinct small immutable value (port tuples, limits): 200,000
    services mostly repeat a handful. Bounded; when full it starts again."""
    try:
        found = _SHARED.get(value)
    except TypeError:
        return value
    if found is not None:
        return found  # type: ignore[return-value]
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    _SHARED[value] = value
    return value


@dataclass
class _Table:
    """Entities of one kind as read: built ones, and every id seen (for references).

    An entity with a bad field is not built, but its id still counts as existing, so
    one typo does not also report every reference to it as dangling.
    """

    kind: str  # the top-level field: "regions", "hosts", ...
    built: list[tuple[int, object]] = field(default_factory=list)
    first_at: dict[str, int] = field(default_factory=dict)

    def path(self, index: int) -> str:
        return f"{self.kind}[{index}]"

    def claim(self, fields: _Fields, name: str, value: str | None, index: int) -> None:
        if value is None:
            return
        first = self.first_at.setdefault(value, index)
        if first != index:
            fields.fail(fields.at(name), f"duplicate {name} {value} (first at {self.path(first)})")


def _read_region(raw: object, index: int, problems: _Problems, table: _Table) -> Region | None:
    f = _Fields(raw, table.path(index), problems, ("code",), ("position",))
    code = f.id("code")
    table.claim(f, "code", code, index)
    position: tuple[float, float] | None = None
    value = f.raw("position")
    if not isinstance(value, _Missing):
        position = _read_position(f, value)
    return Region(code, position) if f.ok and code is not None else None


def _read_position(f: _Fields, value: object) -> tuple[float, float] | None:
    numbers = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    if not isinstance(value, list) or len(value) != 2 or not numbers:
        f.fail(f.at("position"), "expected [latitude, longitude] in degrees")
        return None
    lat, lon = float(value[0]), float(value[1])
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        f.fail(f.at("position"), f"[{lat}, {lon}] is not a latitude, longitude")
        return None
    return (lat, lon)


def _read_host(raw: object, index: int, problems: _Problems, table: _Table) -> Host | None:
    f = _Fields(raw, table.path(index), problems, ("id", "role", "region", "address"))
    host_id = f.id("id")
    table.claim(f, "id", host_id, index)
    role = f.choice("role", _HOST_ROLES)
    region = f.ref("region")
    address = f.ipv4("address")
    if f.ok and host_id and role and region and address:
        return Host(host_id, role, region, address)
    return None


def _read_app(raw: object, index: int, problems: _Problems, table: _Table) -> App | None:
    f = _Fields(raw, table.path(index), problems, ("name", "addresses"), ("hostnames",))
    name = f.id("name")
    table.claim(f, "name", name, index)
    addresses: list[IPAddress] = []
    for j, value in enumerate(f.items("addresses") or ()):
        address = f.address_at(value, f"{f.at('addresses')}[{j}]")
        if address is not None:
            if address in addresses:
                f.fail(f"{f.at('addresses')}[{j}]", f"{address} is listed twice")
            addresses.append(address)
    hostnames: list[str] = []
    for j, value in enumerate(f.items("hostnames", []) or ()):
        where = f"{f.at('hostnames')}[{j}]"
        if not isinstance(value, str) or not _HOSTNAME_RE.match(value):
            f.fail(where, f"{value!r} is not a lowercase DNS name")
        elif value in hostnames:
            f.fail(where, f"{value} is listed twice")
        else:
            hostnames.append(value)
    return App(name, tuple(addresses), tuple(hostnames)) if f.ok and name else None


def _read_concurrency(f: _Fields) -> Concurrency | None:
    value = f.raw("concurrency")
    if isinstance(value, _Missing):
        return None
    c = _Fields(value, f.at("concurrency"), f.problems, ("type", "soft_limit", "hard_limit"))
    kind = c.choice("type", _CONCURRENCY_TYPES)
    soft = c.integer("soft_limit", 1, 2**31 - 1)
    hard = c.integer("hard_limit", 1, 2**31 - 1)
    if soft is not None and hard is not None and soft > hard:
        c.fail(c.path, f"soft_limit {soft} > hard_limit {hard}")
    if not c.ok:
        f.ok = False
        return None
    assert kind is not None and soft is not None and hard is not None
    return _shared(Concurrency(kind, soft, hard))


def _read_check(raw: object, path: str, f: _Fields) -> Check | None:
    c = _Fields(raw, path, f.problems, ("type", "interval_ms", "timeout_ms"), ("grace_ms", "path"))
    kind = c.choice("type", _CHECK_TYPES)
    interval = c.integer("interval_ms", 1, MAX_CHECK_MS)
    timeout = c.integer("timeout_ms", 1, MAX_CHECK_MS)
    grace = c.integer("grace_ms", 0, MAX_CHECK_MS, default=0)
    if interval is not None and timeout is not None and timeout > interval:
        c.fail(c.path, f"timeout_ms {timeout} > interval_ms {interval}")
    check_path = c.raw("path")
    if isinstance(check_path, _Missing):
        check_path = None
        if kind == "http":
            c.fail(c.at("path"), "an http check needs a path")
    elif kind == "tcp":
        c.fail(c.at("path"), "a tcp check has no path")
    elif not isinstance(check_path, str) or not check_path.startswith("/"):
        c.fail(c.at("path"), f"{check_path!r} is not a request path starting with /")
    if not c.ok:
        f.ok = False
        return None
    assert kind is not None and interval is not None and timeout is not None
    assert grace is not None and (check_path is None or isinstance(check_path, str))
    return Check(kind, interval, timeout, grace, check_path)


def _read_service(raw: object, index: int, problems: _Problems, table: _Table) -> Service | None:
    f = _Fields(
        raw,
        table.path(index),
        problems,
        ("id", "app", "protocol", "ports", "internal_port", "concurrency"),
        ("handlers", "checks"),
    )
    service_id = f.id("id")
    table.claim(f, "id", service_id, index)
    app = f.ref("app")
    protocol = f.choice("protocol", _PROTOCOLS)
    ports: list[int] = []
    port_list = f.items("ports")
    if port_list == []:
        f.fail(f.at("ports"), "a service needs at least one port")
    for j, value in enumerate(port_list or ()):
        where = f"{f.at('ports')}[{j}]"
        port = f.integer_at(value, where, 1, 65535)
        if port is not None and port in ports:
            f.fail(where, f"port {port} is listed twice")
        elif port is not None:
            ports.append(port)
    internal_port = f.integer("internal_port", 1, 65535)
    handlers: list[Handler] = []
    for j, value in enumerate(f.items("handlers", []) or ()):
        where = f"{f.at('handlers')}[{j}]"
        if not isinstance(value, str) or value not in _HANDLERS:
            f.fail(where, f"{value!r} is not one of {', '.join(_HANDLERS)}")
        elif _HANDLERS[value] in handlers:
            f.fail(where, f"handler {value} is listed twice")
        else:
            handlers.append(_HANDLERS[value])
    if protocol == "udp" and handlers:
        f.fail(f.at("handlers"), "udp services carry raw datagrams; handlers need tcp")
    concurrency = _read_concurrency(f)
    checks = [
        _read_check(value, f"{f.at('checks')}[{j}]", f)
        for j, value in enumerate(f.items("checks", []) or ())
    ]
    if not f.ok:
        return None
    assert service_id and app and protocol and internal_port and concurrency
    return Service(
        service_id,
        app,
        protocol,
        _shared(tuple(ports)),
        internal_port,
        tuple(handlers),
        concurrency,
        tuple(c for c in checks if c is not None),
    )


def _read_machine(raw: object, index: int, problems: _Problems, table: _Table) -> Machine | None:
    f = _Fields(raw, table.path(index), problems, ("id", "app", "host", "address", "state"))
    machine_id = f.id("id")
    table.claim(f, "id", machine_id, index)
    app = f.ref("app")
    host = f.ref("host")
    address = f.ipv4("address")
    state = f.choice("state", _MACHINE_STATES)
    if f.ok and machine_id and app and host and address and state:
        return Machine(machine_id, app, host, address, state)
    return None


def _read_latency(top: _Fields, regions: _Table) -> dict[tuple[str, str], float]:
    """The explicit latency table, made symmetric; entries may be given either way."""
    latency: dict[tuple[str, str], float] = {}
    raw = top.raw("latency_ms")
    if isinstance(raw, _Missing):
        return latency
    if not isinstance(raw, dict):
        top.fail("latency_ms", f"expected a mapping of region to region to ms, got {_kind(raw)}")
        return latency
    for a, row in raw.items():
        row_path = f"latency_ms.{a}"
        if a not in regions.first_at:
            top.fail(row_path, f"unknown region {a}")
            continue
        if not isinstance(row, dict):
            top.fail(row_path, f"expected a mapping of region to ms, got {_kind(row)}")
            continue
        for b, ms in row.items():
            where = f"{row_path}.{b}"
            if b not in regions.first_at:
                top.fail(where, f"unknown region {b}")
            elif a == b:
                top.fail(where, "a region is 0 ms from itself; leave it out")
            elif not isinstance(ms, int | float) or isinstance(ms, bool) or ms < 0:
                top.fail(where, f"expected a number of ms >= 0, got {ms!r}")
            else:
                pair = (a, b) if a < b else (b, a)
                if pair in latency and latency[pair] != float(ms):
                    top.fail(where, f"{ms} ms disagrees with {latency[pair]} ms given for {b}.{a}")
                latency[pair] = float(ms)
    return latency


def _check_distances(
    problems: _Problems,
    regions: list[tuple[int, Region]],
    latency: Mapping[tuple[str, str], float],
) -> None:
    """Every pair of regions needs a distance: a table entry, or both positions."""
    for n, (i, a) in enumerate(regions):
        for j, b in regions[n + 1 :]:
            pair = (a.code, b.code) if a.code < b.code else (b.code, a.code)
            if pair in latency or (a.position is not None and b.position is not None):
                continue
            missing = i if a.position is None else j
            problems.add(
                f"regions[{missing}].position",
                f"no distance between {a.code} and {b.code}: "
                "give both positions or a latency_ms entry",
            )
            return  # one report says it; the rest would repeat it


def _check_references(
    problems: _Problems,
    hosts: list[tuple[int, Host]],
    services: list[tuple[int, Service]],
    machines: list[tuple[int, Machine]],
    region_ids: Mapping[str, int],
    app_ids: Mapping[str, int],
    hosts_by_id: Mapping[str, Host],
    host_ids: Mapping[str, int],
) -> None:
    for i, host in hosts:
        if host.region not in region_ids:
            problems.add(f"hosts[{i}].region", f"unknown region {host.region}")
    for i, service in services:
        if service.app not in app_ids:
            problems.add(f"services[{i}].app", f"unknown app {service.app}")
    for i, machine in machines:
        if machine.app not in app_ids:
            problems.add(f"machines[{i}].app", f"unknown app {machine.app}")
        runs_on = hosts_by_id.get(machine.host)
        if machine.host not in host_ids:
            problems.add(f"machines[{i}].host", f"unknown host {machine.host}")
        elif runs_on is not None and not runs_on.is_worker:
            problems.add(
                f"machines[{i}].host",
                f"host {runs_on.id} has role {runs_on.role}; machines run on workers",
            )


def _check_addresses(
    problems: _Problems,
    hosts: list[tuple[int, Host]],
    apps: list[tuple[int, App]],
    machines: list[tuple[int, Machine]],
) -> None:
    """Host and machine addresses are unique; app addresses may not collide with them."""
    owner: dict[IPAddress, str] = {}
    for i, host in hosts:
        if host.address in owner:
            problems.add(f"hosts[{i}].address", f"{host.address} is already {owner[host.address]}")
        owner.setdefault(host.address, f"host {host.id}'s address")
    for i, machine in machines:
        if machine.address in owner:
            problems.add(
                f"machines[{i}].address", f"{machine.address} is already {owner[machine.address]}"
            )
        owner.setdefault(machine.address, f"machine {machine.id}'s address")
    for i, app in apps:
        for j, address in enumerate(app.addresses):
            if address in owner:
                problems.add(f"apps[{i}].addresses[{j}]", f"{address} is already {owner[address]}")


def _check_hostnames(problems: _Problems, apps: list[tuple[int, App]]) -> None:
    owner: dict[str, str] = {}
    for i, app in apps:
        for j, hostname in enumerate(app.hostnames):
            if hostname in owner:
                problems.add(
                    f"apps[{i}].hostnames[{j}]",
                    f"{hostname} already belongs to app {owner[hostname]}",
                )
            owner.setdefault(hostname, app.name)


def _check_shared_addresses(
    problems: _Problems, apps: list[tuple[int, App]], services_by_app: Mapping[str, list[Service]]
) -> None:
    """Only hostname-routed apps may share an address: the edge tells them apart by Host/SNI.

    A raw TCP (or UDP) service is found by address and port alone, so its app owns
    its addresses.
    """
    apps_at: dict[IPAddress, list[str]] = {}
    for _, app in apps:
        for address in app.addresses:
            apps_at.setdefault(address, []).append(app.name)
    for i, app in apps:
        for j, address in enumerate(app.addresses):
            sharers = [name for name in apps_at[address] if name != app.name]
            if not sharers:
                continue
            where = f"apps[{i}].addresses[{j}]"
            raw = [s for s in services_by_app.get(app.name, []) if not s.routed_by_hostname]
            if raw:
                problems.add(
                    where,
                    f"{address} is shared with app {sharers[0]}, but service {raw[0].id} is "
                    f"raw {raw[0].protocol.upper()}; "
                    "only HTTP/TLS services (routed by hostname) may share an address",
                )
            elif not app.hostnames:
                problems.add(
                    where,
                    f"{address} is shared with app {sharers[0]}; the app needs hostnames "
                    "to be routed",
                )


def _check_listeners(
    problems: _Problems, services: list[tuple[int, Service]], apps_by_name: Mapping[str, App]
) -> None:
    """Each (address, port, protocol) leads to one service, unless routed by hostname."""
    listener: dict[tuple[IPAddress, int, str], Service] = {}
    for i, service in services:
        app = apps_by_name.get(service.app)
        if app is None:
            continue
        for j, port in enumerate(service.ports):
            for address in app.addresses:
                key = (address, port, service.protocol)
                other = listener.get(key)
                if other is None:
                    listener[key] = service
                    continue
                where = f"services[{i}].ports[{j}]"
                name = f"{address}:{port}/{service.protocol}"
                shareable = (
                    other.app != service.app
                    and other.routed_by_hostname
                    and service.routed_by_hostname
                )
                if not shareable:
                    problems.add(where, f"{name} is already served by service {other.id}")
                elif other.handlers != service.handlers:
                    problems.add(
                        where,
                        f"{name} is served by service {other.id} with handlers "
                        f"{list(other.handlers)}; services sharing a port need the same handlers",
                    )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while building a large, acyclic structure.

    Millions of new objects would trigger collection after collection, each scanning
    everything built so far (half the time of a 600k-machine build); reference
    counting still frees what is dropped meanwhile.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _validate(data: object) -> ClusterState | list[Problem]:
    problems = _Problems()
    top = _Fields(
        data,
        "",
        problems,
        ("version", "regions", "hosts", "apps", "services", "machines"),
        ("latency_ms",),
    )
    if not top.data and not top.ok:
        return problems.items
    version = top.integer("version", 0, 2**63 - 1)
    tables = {name: _Table(name) for name in ("regions", "hosts", "apps", "services", "machines")}
    readers = {
        "regions": _read_region,
        "hosts": _read_host,
        "apps": _read_app,
        "services": _read_service,
        "machines": _read_machine,
    }
    for name, read in readers.items():
        table = tables[name]
        for i, raw in enumerate(top.rows(name)):
            entity = read(raw, i, problems, table)
            if entity is not None:
                table.built.append((i, entity))
    regions = _built(tables["regions"], Region)
    hosts = _built(tables["hosts"], Host)
    apps = _built(tables["apps"], App)
    services = _built(tables["services"], Service)
    machines = _built(tables["machines"], Machine)
    latency = _read_latency(top, tables["regions"])
    _check_distances(problems, regions, latency)
    hosts_by_id = {h.id: h for _, h in hosts}
    apps_by_name = {a.name: a for _, a in apps}
    services_by_app: dict[str, list[Service]] = {}
    for _, service in services:
        services_by_app.setdefault(service.app, []).append(service)
    _check_references(
        problems,
        hosts,
        services,
        machines,
        tables["regions"].first_at,
        tables["apps"].first_at,
        hosts_by_id,
        tables["hosts"].first_at,
    )
    _check_addresses(problems, hosts, apps, machines)
    _check_hostnames(problems, apps)
    _check_shared_addresses(problems, apps, services_by_app)
    _check_listeners(problems, services, apps_by_name)
    if problems.items or version is None:
        return problems.items
    return ClusterState(
        version=version,
        regions={r.code: r for _, r in regions},
        hosts=hosts_by_id,
        apps=apps_by_name,
        services={s.id: s for _, s in services},
        machines={m.id: m for _, m in machines},
        latency_ms=latency,
    )


def _built(table: _Table, kind: type[T]) -> list[tuple[int, T]]:
    return [(i, e) for i, e in table.built if isinstance(e, kind)]


# ------------------------------------------------------------------ entry points


def parse_state(
    data: object,
    source: str,
    lines: Mapping[str, int] | None = None,
    *,
    copy_ids: bool = False,
) -> ClusterState:
    """Validate plain data (as YAML/JSON would load it) into a ``ClusterState``.

    ``source`` names where the data came from in error messages; ``lines`` maps
    paths to line numbers when the data came from a text file. ``copy_ids``: keep a
    fresh copy of each id (see ``_Fields.id``) when the data is parser garbage.
    """
    global _COPY_IDS
    with gc_paused():
        _COPY_IDS = copy_ids
        try:
            result = _validate(data)
        finally:
            _COPY_IDS = False
    if isinstance(result, ClusterState):
        return result
    raise StateError(source, [_with_line(p, lines) for p in result])


def _with_line(problem: Problem, lines: Mapping[str, int] | None) -> Problem:
    """Attach the line of the path, or of its nearest ancestor that exists."""
    if lines is None:
        return problem
    path = problem.path
    while path not in lines and path:
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return Problem(problem.path, problem.reason, lines.get(path))


_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is faster


class _StrictLoader(_Loader):  # type: ignore[valid-type,misc]
    """Safe loading that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            # Scalar keys compared as written: cheap, and merge keys (<<) are left alone.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[object, object] = super().construct_mapping(node, deep=deep)
        return mapping


def strict_loader(text: str | bytes) -> _StrictLoader:
    """A loader as ``parse_yaml`` uses (safe, libyaml, duplicate keys refused)."""
    return _StrictLoader(text)


#: the pattern ids must match (``parse_state`` refuses others)
ID_RE = _ID_RE


def parse_yaml(
    text: str | bytes, source: str, on_root: Callable[[yaml.Node], None] | None = None
) -> ClusterState:
    """Parse YAML text into a ``ClusterState``; problems carry line numbers.

    ``on_root`` is shown the composed node tree (with marks) before it is turned
    into Python objects; the file source indexes where each list item starts.
    """
    try:
        with gc_paused():
            loader = _StrictLoader(text)  # a SafeLoader subclass
            try:
                root = loader.get_single_node()
                if on_root is not None and root is not None:
                    on_root(root)
                data = loader.construct_document(root) if root is not None else None
            finally:
                loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        reason = f"not valid YAML: {err.problem or err.context}"
        raise StateError(source, [Problem("", reason, mark.line + 1 if mark else None)]) from err
    except yaml.YAMLError as err:
        raise StateError(source, [Problem("", f"not valid YAML: {err}")]) from err
    global _COPY_IDS
    with gc_paused():
        # The node tree (``root``) lives on until the state is built: the state then
        # lands in fresh memory rather than in the holes the tree leaves, and the
        # tree's memory can go back to the OS.
        _COPY_IDS = True  # only changes where the ids live: harmless in any thread
        try:
            result = _validate(data)
        finally:
            _COPY_IDS = False
    if isinstance(result, ClusterState):
        return result
    # Only a refused state pays for the line map: compose the text again, keeping marks.
    lines = yaml_lines(text)
    raise StateError(source, [_with_line(p, lines) for p in result])


def yaml_lines(text: str | bytes) -> dict[str, int]:
    """Map every path in a YAML document to the 1-based line where it is written.

    A mapping entry's line is its key's; a list item's is the item's own.
    """
    root = yaml.compose(text, Loader=_Loader)
    lines: dict[str, int] = {}
    if root is None:
        return lines
    lines[""] = root.start_mark.line + 1
    stack: list[tuple[str, yaml.Node]] = [("", root)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = _join(path, str(key_node.value))
                lines[child] = key_node.start_mark.line + 1
                stack.append((child, value_node))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{path}[{i}]"
                lines[child] = item.start_mark.line + 1
                stack.append((child, item))
    return lines


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``) after a
    big build: the parser's temporaries leave holes that RSS would keep counting."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> object:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def load_state(path: str | Path) -> ClusterState:
    """Read and validate a YAML state file; errors name ``path`` and line numbers.

    By ``yamlpatch.load_fast`` (a line scan, list items parsed in batches) when the
    document allows it; else the whole parse. The same state and errors either way."""
    from edgeproxy.yamlpatch import load_fast  # it imports this module

    file = Path(path)
    text = bytearray(file.read_bytes())
    fast = load_fast(text, str(file))
    if fast is not None:
        return fast[0]
    return parse_yaml(bytes(text), str(file))


# --------------------------------------------------------------- incremental updates

#: entity kind -> {id: the new row as plain data, or None when the row was deleted}
RowChanges = Mapping[str, Mapping[str, object | None]]


class NeedsFullParse(Exception):
    """A change ``Incremental`` does not validate piecewise: parse the whole state."""


class Incremental:
    """Applies changed rows to a state, validating only what they touch.

    At 600,000 machines a full ``parse_state`` takes seconds; a one-machine change
    must not. ``apply`` handles changes to machines (added, changed, removed) and to
    ``version``; it reads each changed row with the same readers as ``parse_state``
    (same checks, same messages), then checks the references out of it (app, host
    with the worker role) and the address it claims, against an address index kept
    here. Anything else (regions, hosts, apps, services, latency) raises
    ``NeedsFullParse``: those are rare, and their checks (shared addresses,
    listeners, distances) span the whole state. Unchanged entities stay the very
    same objects, so placement and map sync can tell what changed by identity.
    """

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        owner: dict[IPAddress, Host | Machine | App] = {}
        for host in state.hosts.values():
            owner.setdefault(host.address, host)
        for machine in state.machines.values():
            owner.setdefault(machine.address, machine)
        for app in state.apps.values():
            for address in app.addresses:
                owner.setdefault(address, app)
        self._owner = owner

    def apply(
        self,
        changes: RowChanges,
        meta: Mapping[str, object] | None,
        source: str,
        name_row: Callable[[str, str], str],
    ) -> ClusterState:
        """The new state, or ``StateError`` (paths named by ``name_row(kind, id)``).

        ``meta``: the new top-level fields (``version``, ``latency_ms``) when they
        changed, else None. On an error nothing here changes.
        """
        if any(rows for kind, rows in changes.items() if kind != "machines"):
            raise NeedsFullParse(f"{', '.join(k for k, v in changes.items() if v)} changed")
        state = self.state
        problems = _Problems()
        version = state.version
        if meta is not None:
            if set(meta) - {"version", "latency_ms"} or "version" not in meta:
                raise NeedsFullParse("meta fields changed")
            if meta.get("latency_ms", {}) != _latency_dict(state):
                raise NeedsFullParse("latency_ms changed")
            top = _Fields(meta, "", problems, ("version",), ("latency_ms",))
            v = top.integer("version", 0, 2**63 - 1)
            version = v if v is not None else version
        rows = changes.get("machines", {})
        new: dict[str, Machine | None] = {}
        for machine_id, raw in rows.items():
            if raw is None:
                new[machine_id] = None
                continue
            before = len(problems.items)
            machine = _read_machine(raw, 0, problems, _Table("machines"))
            where = name_row("machines", machine_id)
            if machine is not None and machine.id != machine_id:
                problems.add("machines[0].id", f"{machine.id!r} differs from the key")
                machine = None
            for n in range(before, len(problems.items)):
                p = problems.items[n]
                problems.items[n] = Problem(p.path.replace("machines[0]", where, 1), p.reason)
            if machine is not None:
                old = state.machines.get(machine_id)
                new[machine_id] = old if old == machine else machine
                self._check_machine(machine, where, problems)
        claimed = self._claims(new, problems, name_row)
        if problems.items:
            raise StateError(source, problems.items)
        return self._commit(version, new, claimed)

    def _check_machine(self, machine: Machine, where: str, problems: _Problems) -> None:
        state = self.state
        if machine.app not in state.apps:
            problems.add(f"{where}.app", f"unknown app {machine.app}")
        host = state.hosts.get(machine.host)
        if host is None:
            problems.add(f"{where}.host", f"unknown host {machine.host}")
        elif not host.is_worker:
            problems.add(
                f"{where}.host", f"host {host.id} has role {host.role}; machines run on workers"
            )

    def _claims(
        self,
        new: Mapping[str, Machine | None],
        problems: _Problems,
        name_row: Callable[[str, str], str],
    ) -> dict[IPAddress, Machine]:
        """Addresses the changed machines take; each must be free or freed by the change."""
        leaving = {
            old.address
            for machine_id in new
            if (old := self.state.machines.get(machine_id)) is not None
        }
        claimed: dict[IPAddress, Machine] = {}
        for machine_id, machine in sorted(new.items()):
            if machine is None:
                continue
            owner: Host | Machine | App | None = claimed.get(machine.address)
            if owner is None:
                owner = self._owner.get(machine.address)
                if isinstance(owner, Machine) and owner.address in leaving and (owner.id in new):
                    owner = None  # its machine moves away or goes in this same change
            if owner is not None and not (isinstance(owner, Machine) and owner.id == machine_id):
                problems.add(
                    f"{name_row('machines', machine_id)}.address",
                    f"{machine.address} is already {_owner_name(owner)}",
                )
            claimed.setdefault(machine.address, machine)
        return claimed

    def _commit(
        self, version: int, new: Mapping[str, Machine | None], claimed: Mapping[IPAddress, Machine]
    ) -> ClusterState:
        old = self.state
        changed: dict[str, Machine | None] = {}
        touched: set[str] = set()
        for machine_id, machine in new.items():
            before = old.machines.get(machine_id)
            if before is machine:
                continue
            if before is not None:
                touched.add(before.app)
                if self._owner.get(before.address) is before:
                    del self._owner[before.address]
            if machine is None:
                if before is not None:
                    changed[machine_id] = None
            else:
                changed[machine_id] = machine
                touched.add(machine.app)
        for address, machine in claimed.items():
            self._owner[address] = machine
        groups: dict[str, tuple[Machine, ...] | None] = {}
        for app in touched:
            members = tuple(m for m in old.machines_by_app.get(app, ()) if new.get(m.id, m) is m)
            members += tuple(
                m for m in new.values() if m is not None and m.app == app and m not in members
            )
            groups[app] = members or None
        state = object.__new__(ClusterState)
        for name, value in (
            ("version", version),
            ("regions", old.regions),
            ("hosts", old.hosts),
            ("apps", old.apps),
            ("services", old.services),
            # layered on the old mappings: copying 600,000 entries per change was
            # most of a one-machine change's cost
            ("machines", _updated(old.machines, changed)),
            ("latency_ms", old.latency_ms),
            ("services_by_app", old.services_by_app),
            ("machines_by_app", _updated(old.machines_by_app, groups)),
            ("changed_apps", frozenset(touched)),
        ):
            object.__setattr__(state, name, value)
        self.state = state
        return state


_K = TypeVar("_K")
_V = TypeVar("_V")
_GONE: object = object()
#: changes a layered mapping carries before it is flattened into a plain dict again
LAYER_LIMIT = 2048


class _Layered(Mapping[_K, _V]):
    """A read-only mapping: a base dict plus a small dict of changes over it.

    ``Incremental`` derives each new state from the last by a few rows; the new
    state's ``machines`` shares the old one's base and copies only the changes
    (``_updated``), so the old state stays intact for whoever still holds it.
    """

    __slots__ = ("_base", "_delta", "_len")

    def __init__(self, base: Mapping[_K, _V], delta: dict[_K, object], length: int) -> None:
        self._base = base
        self._delta = delta
        self._len = length

    def __getitem__(self, key: _K) -> _V:
        delta = self._delta
        if key in delta:
            value = delta[key]
            if value is _GONE:
                raise KeyError(key)
            return value  # type: ignore[return-value]
        return self._base[key]

    def get(self, key: _K, default: Any = None) -> Any:
        delta = self._delta
        if key in delta:
            value = delta[key]
            return default if value is _GONE else value
        return self._base.get(key, default)

    def __contains__(self, key: object) -> bool:
        delta = self._delta
        if key in delta:
            return delta[key] is not _GONE
        return key in self._base

    def __iter__(self) -> Iterator[_K]:
        delta = self._delta
        for key in self._base:
            if key not in delta:
                yield key
        for key, value in delta.items():
            if value is not _GONE:
                yield key

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r})"


def _updated(mapping: Mapping[_K, _V], changes: Mapping[_K, _V | None]) -> Mapping[_K, _V]:
    """``mapping`` with ``changes`` applied (None: removed), leaving ``mapping`` as it is."""
    delta: dict[_K, object]
    if isinstance(mapping, _Layered):
        base, delta = mapping._base, dict(mapping._delta)
    else:
        base, delta = mapping, {}
    length = len(mapping)
    for key, value in changes.items():
        had = key in mapping
        if value is None:
            if had:
                length -= 1
            if key in base:
                delta[key] = _GONE
            else:
                delta.pop(key, None)
        else:
            length += not had
            delta[key] = value
    if len(delta) <= LAYER_LIMIT:
        return _Layered(base, delta, length)
    flat = dict(base)
    for key, entry in delta.items():
        if entry is _GONE:
            flat.pop(key, None)
        else:
            flat[key] = entry
    return flat


def _owner_name(owner: Host | Machine | App) -> str:
    if isinstance(owner, Host):
        return f"host {owner.id}'s address"
    if isinstance(owner, Machine):
        return f"machine {owner.id}'s address"
    return f"an address of app {owner.name}"


def latency_table(state: ClusterState) -> dict[str, dict[str, float]]:
    """``latency_ms`` as the state file writes it (each pair once, sorted)."""
    return _latency_dict(state)


def _latency_dict(state: ClusterState) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for (a, b), ms in sorted(state.latency_ms.items()):
        table.setdefault(a, {})[b] = ms
    return table


# ---------------------------------------------------------------------- round trip


def to_dict(state: ClusterState) -> dict[str, object]:
    """Plain data that ``parse_state`` turns back into an equal state."""
    data: dict[str, object] = {
        "version": state.version,
        "regions": [_region_dict(r) for r in state.regions.values()],
        "hosts": [
            {"id": h.id, "role": h.role, "region": h.region, "address": str(h.address)}
            for h in state.hosts.values()
        ],
        "apps": [
            {
                "name": a.name,
                "addresses": [str(x) for x in a.addresses],
                "hostnames": list(a.hostnames),
            }
            for a in state.apps.values()
        ],
        "services": [_service_dict(s) for s in state.services.values()],
        "machines": [
            {
                "id": m.id,
                "app": m.app,
                "host": m.host,
                "address": str(m.address),
                "state": m.state,
            }
            for m in state.machines.values()
        ],
    }
    if state.latency_ms:
        table: dict[str, dict[str, float]] = {}
        for (a, b), ms in sorted(state.latency_ms.items()):
            table.setdefault(a, {})[b] = ms
        data["latency_ms"] = table
    return data


def entity_dict(kind: str, entity: object) -> dict[str, object]:
    """One entity as ``to_dict`` writes it in the list ``kind``."""
    if isinstance(entity, Machine):
        return {"id": entity.id, "app": entity.app, "host": entity.host,
                "address": str(entity.address), "state": entity.state}
    if isinstance(entity, Service):
        return _service_dict(entity)
    if isinstance(entity, App):
        return {"name": entity.name, "addresses": [str(x) for x in entity.addresses],
                "hostnames": list(entity.hostnames)}
    if isinstance(entity, Host):
        return {"id": entity.id, "role": entity.role, "region": entity.region,
                "address": str(entity.address)}
    if isinstance(entity, Region):
        return _region_dict(entity)
    raise TypeError(f"not an entity of {kind}: {entity!r}")


def _region_dict(region: Region) -> dict[str, object]:
    data: dict[str, object] = {"code": region.code}
    if region.position is not None:
        data["position"] = list(region.position)
    return data


def _service_dict(service: Service) -> dict[str, object]:
    return {
        "id": service.id,
        "app": service.app,
        "protocol": service.protocol,
        "ports": list(service.ports),
        "internal_port": service.internal_port,
        "handlers": list(service.handlers),
        "concurrency": {
            "type": service.concurrency.type,
            "soft_limit": service.concurrency.soft_limit,
            "hard_limit": service.concurrency.hard_limit,
        },
        "checks": [_check_dict(c) for c in service.checks],
    }


def _check_dict(check: Check) -> dict[str, object]:
    data: dict[str, object] = {
        "type": check.type,
        "interval_ms": check.interval_ms,
        "timeout_ms": check.timeout_ms,
        "grace_ms": check.grace_ms,
    }
    if check.path is not None:
        data["path"] = check.path
    return data
