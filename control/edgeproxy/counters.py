"""The kernel counters, read at once: per-CPU arrays summed with numpy, kept in columns.

``Dataplane.read_counters()`` (the one reader: ``edgectl stats`` and ``/metrics``)
delegates here. Each stats map is read with ``BpfMap.lookup_array`` (ids 0..max in
use, ``BPF_MAP_LOOKUP_BATCH`` in 65,536-key calls) into one buffer, viewed as a
``(ids, cpus, fields)`` uint64 array and summed over CPUs in one numpy call
(wrapping at 2**64 like the kernel's own counters). Rows stay in columns
(``MachineRows``/``ServiceRows``): at 600,000 machines a Python object per machine
would cost more than reading the maps. Iterating a row set still yields
``MachineCounters``/``ServiceCounters`` (``edgectl stats``, tests); the metrics
collector reads the columns (``metrics.KernelText``).
"""

from __future__ import annotations

import ctypes as ct
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

import numpy as np
import numpy.typing as npt

from . import bpfmaps as bm

if TYPE_CHECKING:
    from .dataplane import _Service

U64s = npt.NDArray[np.uint64]
Ints = npt.NDArray[np.int64]
Objs = npt.NDArray[np.object_]

#: MachineCounters' counter fields, in column order of ``MachineRows.values``
COUNTER_FIELDS = ("opened", "active", "closed", "reset", "expired",
                  "packets_in", "bytes_in", "packets_out", "bytes_out")
SERVICE_FIELDS = ("refused", "dropped", "no_backend", "flood", "resteered")
_STATS_FIELDS = tuple(f[0] for f in bm.MachineStats._fields_)
#: column of each MachineStats field in ``MachineRows.values`` (active is column 1)
_STATS_COLUMNS = [COUNTER_FIELDS.index(f) for f in _STATS_FIELDS]
_SERVICE_COLUMNS = [SERVICE_FIELDS.index(f[0]) for f in bm.ServiceStats._fields_]


@dataclass(frozen=True, slots=True)
class MachineCounters:
    app: str
    machine: str
    port: int
    opened: int
    active: int
    closed: int
    reset: int
    expired: int
    packets_in: int
    bytes_in: int  # TCP payload bytes client -> machine
    packets_out: int
    bytes_out: int  # TCP payload bytes machine -> client


@dataclass(frozen=True, slots=True)
class ServiceCounters:
    app: str
    service: str
    refused: int
    dropped: int
    no_backend: int
    flood: int
    resteered: int


def objects(values: Sequence[Any]) -> Objs:
    """A 1-d object array of ``values`` (strings stay whole)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


RowT = TypeVar("RowT")


def _positions(rows: Sequence[object]) -> Ints:
    return np.arange(len(rows), dtype=np.int64)


def _value_columns(rows: Sequence[object], fields: Sequence[str]) -> U64s:
    """One uint64 row per object, ``fields`` in order (tests, fakes)."""
    return np.array([[getattr(r, f) for f in fields] for r in rows],
                    dtype=np.uint64).reshape(len(rows), len(fields))


class _Rows(Sequence[RowT]):
    """Rows kept in columns; indexing builds one row object (``_row``). Row sets
    compare as the sequences of rows they hold (tests, adoption checks)."""

    __slots__ = ()
    ids: Ints
    values: U64s

    def _row(self, i: int) -> RowT:
        raise NotImplementedError

    def _take(self, keep: Ints) -> Self:
        raise NotImplementedError

    def busy(self) -> Self:
        """The rows with a non-zero counter (or, for machines, active connection)."""
        keep = np.flatnonzero(self.values.any(axis=1))
        if len(keep) == len(self):
            return self
        return self._take(keep)

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> RowT: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[RowT]: ...

    def __getitem__(self, i: int | slice) -> RowT | Sequence[RowT]:
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        return self._row(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class MachineRows(_Rows[MachineCounters]):
    """Machines' counters in columns: ``ids`` (machine id), ``apps``, ``names``
    (object arrays of str), ``ports`` and ``values`` (one uint64 row per machine,
    ``COUNTER_FIELDS`` order)."""

    __slots__ = ("apps", "ids", "names", "ports", "values")

    def __init__(self, ids: Ints, apps: Objs, names: Objs, ports: Ints, values: U64s) -> None:
        self.ids, self.apps, self.names, self.ports, self.values = ids, apps, names, ports, values

    @classmethod
    def of(cls, rows: Sequence[MachineCounters]) -> MachineRows:
        """Columns from objects (tests, fakes); ids are positions."""
        if isinstance(rows, MachineRows):
            return rows
        return cls(_positions(rows), objects([r.app for r in rows]),
                   objects([r.machine for r in rows]),
                   np.array([r.port for r in rows], dtype=np.int64),
                   _value_columns(rows, COUNTER_FIELDS))

    def _take(self, keep: Ints) -> MachineRows:
        return MachineRows(self.ids[keep], self.apps[keep], self.names[keep], self.ports[keep],
                           self.values[keep])

    def _row(self, i: int) -> MachineCounters:
        return MachineCounters(str(self.apps[i]), str(self.names[i]), int(self.ports[i]),
                               *self.values[i].tolist())

    def __iter__(self) -> Iterator[MachineCounters]:
        for app, name, port, values in zip(self.apps.tolist(), self.names.tolist(),
                                           self.ports.tolist(), self.values.tolist(),
                                           strict=True):
            yield MachineCounters(app, name, port, *values)


class ServiceRows(_Rows[ServiceCounters]):
    """Services' counters in columns: ``ids`` (service id), ``apps``, ``names``
    (object arrays of str) and ``values`` (one uint64 row per service,
    ``SERVICE_FIELDS`` order)."""

    __slots__ = ("apps", "ids", "names", "values")

    def __init__(self, ids: Ints, apps: Objs, names: Objs, values: U64s) -> None:
        self.ids, self.apps, self.names, self.values = ids, apps, names, values

    @classmethod
    def of(cls, rows: Sequence[ServiceCounters]) -> ServiceRows:
        if isinstance(rows, ServiceRows):
            return rows
        return cls(_positions(rows), objects([r.app for r in rows]),
                   objects([r.service for r in rows]), _value_columns(rows, SERVICE_FIELDS))

    def _take(self, keep: Ints) -> ServiceRows:
        return ServiceRows(self.ids[keep], self.apps[keep], self.names[keep], self.values[keep])

    def _row(self, i: int) -> ServiceCounters:
        return ServiceCounters(str(self.apps[i]), str(self.names[i]), *self.values[i].tolist())

    def __iter__(self) -> Iterator[ServiceCounters]:
        for app, name, values in zip(self.apps.tolist(), self.names.tolist(),
                                     self.values.tolist(), strict=True):
            yield ServiceCounters(app, name, *values)


@dataclass(frozen=True, slots=True)
class Counters:
    machines: Sequence[MachineCounters] = ()  # MachineRows from read_counters
    services: Sequence[ServiceCounters] = ()  # ServiceRows from read_counters
    stats: dict[str, int] = field(default_factory=dict)  # edge_stats or worker_stats
    anomalies: dict[str, int] = field(default_factory=dict)
    # (machine ids, service ids) in use; ``machines``/``services`` may leave idle ones out
    in_use: tuple[int, int] | None = None

    def machine(self, name: str) -> MachineCounters | None:
        """The counters of one machine, summed over its internal ports."""
        rows = [m for m in self.machines if m.machine == name]
        if not rows:
            return None
        sums = [sum(getattr(r, f) for r in rows) for f in COUNTER_FIELDS]
        return MachineCounters(rows[0].app, name, rows[0].port, *sums)


# ------------------------------------------------------------------ reading


def summed(m: bm.BpfMap, count: int) -> U64s:
    """Values of ids ``0..count-1`` of an array map, ``(count, fields)`` uint64, every
    field summed over CPUs (per-CPU maps); one batch read, one numpy add per CPU."""
    raw = m.lookup_array(count)
    count = len(raw) // m.value_stride if m.value_stride else 0
    ncpu = bm.possible_cpus() if m.percpu else 1
    words = m.value_stride // ncpu // 8  # u64 words per CPU copy (padded to 8 bytes)
    fields = ct.sizeof(m.value_type) // 8
    a = np.frombuffer(raw, dtype="<u8").reshape(count, ncpu, words)
    if ncpu == 1:
        return a[:, 0, :fields].copy()
    out: U64s = np.add(a[:, 0, :fields], a[:, 1, :fields])
    for cpu in range(2, ncpu):
        np.add(out, a[:, cpu, :fields], out=out)
    return out


def sum_one(m: bm.BpfMap, key: int) -> Any:
    """One id of an array map, summed over CPUs (a ctypes value; None if absent)."""
    rows = m.lookup_percpu(bm.U32(key))
    if not rows:
        return None
    if isinstance(rows[0], bm.U64):
        return sum(r.value for r in rows)
    total = type(rows[0])()
    for f, _ in total._fields_:
        setattr(total, f, sum(getattr(r, f) for r in rows))
    return total


def _machine_columns(table: Mapping[int, tuple[str, str, bytes]]
                     ) -> tuple[int, Objs, Objs, Ints]:
    """(id bound, app by id or None, name by id, port by id) of the loader's table.

    ``dataplane._MachineTable`` keeps parallel lists by id: copied as they are (a
    C-level copy each, so a sync on another thread cannot skew them mid-read)."""
    apps = getattr(table, "_app", None)
    names = getattr(table, "_name", None)
    packed = getattr(table, "_value", None)
    if isinstance(apps, list) and isinstance(names, list) and isinstance(packed, bytearray):
        packed = bytes(packed)
        app_of, name_of = objects(apps), objects(names)
        n = min(len(app_of), len(name_of), len(packed) // 16)
        ports = np.frombuffer(packed, dtype=">u2", count=n * 8).reshape(n, 8)[:, 4]
        return n, app_of[:n], name_of[:n], ports.astype(np.int64)
    items = dict(table)
    n = max(items, default=-1) + 1
    app_of = np.full(n, None, dtype=object)
    name_of = np.full(n, "", dtype=object)
    port_of = np.zeros(n, dtype=np.int64)
    for mid, (app, name, mv) in items.items():
        app_of[mid], name_of[mid] = app, name
        port_of[mid] = int.from_bytes(mv[8:10], "big")
    return n, app_of, name_of, port_of


def read_machines(maps: Mapping[str, bm.BpfMap], table: Mapping[int, tuple[str, str, bytes]],
                  skip_idle: bool) -> MachineRows:
    """Machines' counters by id; ``skip_idle``: only ids with a non-zero counter."""
    n, apps, names, ports = _machine_columns(table)
    in_use: npt.NDArray[np.bool_] = np.asarray(apps != None, dtype=bool)  # noqa: E711
    if not n:
        return MachineRows(np.zeros(0, dtype=np.int64), objects([]), objects([]),
                           np.zeros(0, dtype=np.int64),
                           np.zeros((0, len(COUNTER_FIELDS)), dtype=np.uint64))
    stats = summed(maps["machine_stats"], n)
    active = summed(maps["machine_active"], n)[:, 0]
    if skip_idle:
        # freed ids keep their last counters until reused: keep ids in use only
        keep = np.asarray(stats.any(axis=1), dtype=bool)
        keep |= active != 0
        keep &= in_use
    else:
        keep = in_use
    idx = np.flatnonzero(keep)
    values = np.empty((len(idx), len(COUNTER_FIELDS)), dtype=np.uint64)
    if len(idx) == n:  # every id in use (and busy): the columns as they are
        values[:, _STATS_COLUMNS], values[:, 1] = stats, active
        return MachineRows(idx, apps, names, ports, values)
    values[:, _STATS_COLUMNS] = stats[idx]
    values[:, 1] = active[idx]
    return MachineRows(idx, apps[idx], names[idx], ports[idx], values)


def read_services(maps: Mapping[str, bm.BpfMap], services: Mapping[str, _Service],
                  skip_idle: bool) -> ServiceRows:
    """Services' counters; by name, or (``skip_idle``: non-zero ones only) by id."""
    snapshot = dict(services)  # one C-level copy: a sync on another thread cannot skew it
    names, svcs = objects(list(snapshot)), list(snapshot.values())
    sids = np.fromiter(map(_ID, svcs), dtype=np.int64, count=len(svcs))
    n = int(sids.max()) + 1 if len(sids) else 0
    values = np.zeros((n, len(SERVICE_FIELDS)), dtype=np.uint64)
    if n:
        values[:, _SERVICE_COLUMNS] = summed(maps["service_stats"], n)
    if skip_idle:
        order = np.flatnonzero(np.asarray(values.any(axis=1), dtype=bool)[sids])
        order = order[np.argsort(sids[order], kind="stable")]
    else:
        order = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
    ids = sids[order]
    apps = objects(list(map(_APP, map(svcs.__getitem__, order.tolist()))))
    return ServiceRows(ids, apps, names[order], values[ids])


_ID = operator.attrgetter("id")
_APP = operator.attrgetter("app")


def read_edge(maps: Mapping[str, bm.BpfMap], machines: Mapping[int, tuple[str, str, bytes]],
              services: Mapping[str, _Service], skip_idle: bool) -> Counters:
    m = read_machines(maps, machines, skip_idle)
    s = read_services(maps, services, skip_idle)
    stats = {n: sum_one(maps["edge_stats"], i) or 0 for i, n in enumerate(bm.EDGE_STATS)}
    anomalies = {n: sum_one(maps["anomalies"], i) or 0 for i, n in enumerate(bm.ANOMALIES)}
    return Counters(m, s, stats, anomalies, (len(machines), len(services)))


def read_worker(maps: Mapping[str, bm.BpfMap]) -> Counters:
    return Counters(stats={n: sum_one(maps["worker_stats"], i) or 0
                           for i, n in enumerate(bm.WORKER_STATS)})
