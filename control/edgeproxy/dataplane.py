"""Compile, load, attach and pin the fast path; write routing tables into its maps.

The loader stays short (bcc examples style): ``load()`` compiles ``bpf/edge.bpf.c``
or ``bpf/worker.bpf.c`` with this instance's pin directory and limits, attaches XDP
(bcc) and TC (pyroute2) and adopts whatever the pinned maps already hold;
``sync()`` writes ``routing.ServiceTable`` s into the maps, changing only what differs;
``read_counters()``, ``flows()`` and ``sweep()`` read and age the kernel's state.
Policy (which machines are in which tier) is decided elsewhere (placement).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

from . import bpfmaps as bm
from . import maglev
from .routing import Backend, ServiceTable

PIN_ROOT = Path("/sys/fs/bpf/edgeproxy")
BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
TC_EGRESS = "ffff:fff3"
TC_PRIO = 0xE9  # our filter's priority on clsact egress ("e9" for edgeproxy)


@dataclass(frozen=True, slots=True)
class DataplaneConfig:
    instance: str  # pin dir name under pin_root; one per (host, role)
    role: Literal["edge", "worker"]
    host_address: IPv4Address  # outer IPIP src (edge) / the address IPIP arrives at (worker)
    interfaces: tuple[str, ...] = ()  # edge: every edge interface; worker: edge-facing ones
    refuse_with_rst: bool = True  # no capacity: RST (True) or drop (False)
    resteer_without_conntrack: bool = True  # mid-flow packet, no conntrack: Maglev or drop
    idle_timeout: float = 300.0  # seconds, default for sweep()
    flood_cap: int = 0  # new flows per CPU per second; 0 = off
    xdp_flags: int = 0  # 0 = kernel's choice (native on veth); XDP_FLAGS_SKB_MODE = generic
    netns: str | None = None  # attach inside /run/netns/<netns> (None: the current one)
    max_services: int = 262144
    max_machines: int = 65536
    max_flows: int = 1 << 20
    max_maglev_slots: int = 1 << 22
    max_backend_entries: int = 1 << 20
    pin_root: Path = PIN_ROOT
    bpf_dir: Path = BPF_DIR

    @property
    def pin_dir(self) -> Path:
        return self.pin_root / self.instance


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


@dataclass(frozen=True, slots=True)
class Counters:
    machines: tuple[MachineCounters, ...] = ()
    services: tuple[ServiceCounters, ...] = ()
    stats: dict[str, int] = field(default_factory=dict)  # edge_stats or worker_stats
    anomalies: dict[str, int] = field(default_factory=dict)

    def machine(self, name: str) -> MachineCounters | None:
        """The counters of one machine, summed over its internal ports."""
        rows = [m for m in self.machines if m.machine == name]
        if not rows:
            return None
        sums = [sum(getattr(r, f) for r in rows) for f in _COUNTER_FIELDS]
        return MachineCounters(rows[0].app, name, rows[0].port, *sums)


_COUNTER_FIELDS = ("opened", "active", "closed", "reset", "expired",
                   "packets_in", "bytes_in", "packets_out", "bytes_out")


@dataclass(frozen=True, slots=True)
class Flow:
    client: IPv4Address
    client_port: int
    vip: IPv4Address
    port: int
    app: str
    service: str
    machine: str
    state: str  # open | fin-in | fin-out | closed | reset | expired
    idle: float  # seconds since the last packet


@dataclass(frozen=True, slots=True)
class SyncResult:
    services_written: int = 0
    services_removed: int = 0
    machines_added: int = 0
    machines_freed: int = 0


@dataclass(slots=True)
class _Service:
    """What the maps hold for one service (the loader's cache, rebuilt on adoption)."""

    id: int
    keys: set[tuple[int, int]]  # (be32 addr, be16 port)
    value: bm.ServiceValue
    backends: tuple[tuple[int, int, int], ...]  # (machine id, tier_start, tier_len)


@contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name``."""
    if name is None:
        yield
        return
    libc = ct.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, clone_newnet) != 0:
            raise OSError(ct.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            libc.setns(own, clone_newnet)
    finally:
        os.close(own)
        os.close(target)


def _label(app: str, name: str) -> bm.Label:
    return bm.Label(app=app.encode()[:63], name=name.encode()[:63])


def _unlabel(label: bm.Label) -> tuple[str, str]:
    return label.app.decode(errors="replace"), label.name.decode(errors="replace")


class Dataplane:
    """One instance of the fast path (edge or worker role) on this host."""

    def __init__(self, config: DataplaneConfig) -> None:
        self.config = config
        self.maps: dict[str, bm.BpfMap] = {}
        self.progs: dict[str, int] = {}  # program name -> fd
        self._bpf: Any = None
        self._services: dict[str, _Service] = {}
        self._machine_ids: dict[tuple[str, int], int] = {}  # (machine name, port) -> id
        self._machines: dict[int, tuple[str, str, bm.MachineValue]] = {}  # id -> app, name, v
        self._markers: set[int] = set()  # VIP addresses with a (vip, 0) marker

    # ------------------------------------------------------------ lifecycle

    def _cflags(self) -> list[str]:
        c = self.config
        return [
            f"-I{c.bpf_dir}",
            f'-DPIN_DIR="{c.pin_dir}"',
            f"-DMAX_SERVICES={c.max_services}",
            f"-DMAX_MACHINES={c.max_machines}",
            f"-DMAX_FLOWS={c.max_flows}",
            f"-DMAX_MAGLEV_SLOTS={c.max_maglev_slots}",
            f"-DMAX_BACKEND_ENTRIES={c.max_backend_entries}",
            "-Wno-unused-function",
        ]

    def load(self) -> None:
        """Compile and load; adopt pinned maps (flows and counters survive); attach
        to every interface, replacing an older program atomically."""
        from bcc import BPF  # imported here: reading pinned maps needs no bcc

        c = self.config
        c.pin_dir.mkdir(parents=True, exist_ok=True)
        if c.role == "edge":
            src, funcs = "edge.bpf.c", {"edge_xdp": BPF.XDP, "edge_sweep": BPF.XDP}
        else:
            src, funcs = "worker.bpf.c", {"worker_ingress": BPF.XDP,
                                          "worker_egress": BPF.SCHED_CLS}
        self._bpf = BPF(src_file=str(c.bpf_dir / src).encode(), cflags=self._cflags())
        fns = {name: self._bpf.load_func(name.encode(), kind) for name, kind in funcs.items()}
        for name, fn in fns.items():
            self.progs[name] = fn.fd
            pin = c.pin_dir / f"prog_{name}"
            pin.unlink(missing_ok=True)
            bm.obj_pin(fn.fd, pin)
        self.adopt()
        self._write_config()
        with netns(c.netns):
            for ifname in c.interfaces:
                if c.role == "edge":
                    # the encapsulated packet we XDP_PASS carries this host's own address
                    # as its source; without accept_local the kernel drops it as martian
                    Path(f"/proc/sys/net/ipv4/conf/{ifname}/accept_local").write_text("1")
                    BPF.attach_xdp(ifname, fns["edge_xdp"], c.xdp_flags)
                else:
                    BPF.attach_xdp(ifname, fns["worker_ingress"], c.xdp_flags)
                    self._attach_tc_egress(ifname, fns["worker_egress"].fd)

    def _attach_tc_egress(self, ifname: str, fd: int) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            try:
                ipr.tc("add", "clsact", idx)
            except Exception as e:  # pyroute2 NetlinkError: clsact already there
                if getattr(e, "code", None) != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name="worker_egress",
                   parent=TC_EGRESS, prio=TC_PRIO, classid=1, direct_action=True)

    def adopt(self) -> None:
        """Open the pinned maps and rebuild the id assignment from them (no compile)."""
        for m in self.maps.values():
            m.close()
        self.maps = bm.open_maps(self.config.pin_dir, self.config.role)
        if self.config.role == "edge":
            self._rebuild_cache()
            if not self.progs:
                pin = self.config.pin_dir / "prog_edge_sweep"
                if pin.exists():
                    self.progs["edge_sweep"] = bm.obj_get(pin)

    def close(self) -> None:
        """Let go of fds; the attached programs and pinned maps keep running."""
        for m in self.maps.values():
            m.close()
        self.maps = {}
        self._bpf = None
        self.progs = {}

    def unload(self) -> None:
        """Detach from every interface and remove the pins: the fast path stops."""
        from bcc import BPF

        c = self.config
        with netns(c.netns):
            for ifname in c.interfaces:
                with suppress(Exception):  # interface already gone
                    BPF.remove_xdp(ifname, c.xdp_flags)
                if c.role == "worker":
                    self._detach_tc_egress(ifname)
        self.close()
        if c.pin_dir.exists():
            shutil.rmtree(c.pin_dir)

    def _detach_tc_egress(self, ifname: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return
            with suppress(Exception):  # filter already gone
                ipr.tc("del-filter", "bpf", found[0], ":1", parent=TC_EGRESS, prio=TC_PRIO)

    def _write_config(self) -> None:
        c = self.config
        flags = (bm.CFG_REFUSE_RST if c.refuse_with_rst else 0) | (
            bm.CFG_RESTEER if c.resteer_without_conntrack else 0)
        self.maps["config"].update(bm.U32(0), bm.DpConfig(
            host_addr=bm.be32(c.host_address), flags=flags, flood_cap=c.flood_cap))

    # ------------------------------------------------------- adoption cache

    def _rebuild_cache(self) -> None:
        self._services.clear()
        self._machine_ids.clear()
        self._machines.clear()
        self._markers.clear()
        services, labels = self.maps["services"], self.maps["service_labels"]
        by_id: dict[int, _Service] = {}
        for key, value in services.items():
            if value.flags & bm.SVC_F_VIP_MARKER:
                self._markers.add(int(key.addr))
                continue
            svc = by_id.get(value.id)
            if svc is None:
                backends = []
                for i in range(value.backend_count):
                    b = self.maps["backends"].lookup(bm.BackendKey(value.id, value.gen, i))
                    if b is not None:
                        backends.append((int(b.machine), int(b.tier_start), int(b.tier_len)))
                svc = by_id[value.id] = _Service(int(value.id), set(), value, tuple(backends))
            svc.keys.add((int(key.addr), int(key.port)))
        for sid, svc in by_id.items():
            label = labels.lookup(bm.U32(sid))
            if label is not None:
                self._services[_unlabel(label)[1]] = svc
        machines, mlabels = self.maps["machines"], self.maps["machine_labels"]
        for mid in range(self.config.max_machines):
            mv = machines.lookup(bm.U32(mid))
            if mv is None or not mv.flags & bm.MACHINE_F_IN_USE:
                continue
            label = mlabels.lookup(bm.U32(mid))
            app, name = _unlabel(label) if label is not None else ("", f"#{mid}")
            self._machines[mid] = (app, name, mv)
            self._machine_ids[(name, bm.from_be16(mv.port))] = mid

    # ---------------------------------------------------------------- sync

    def _machine_id(self, b: Backend, result: list[int]) -> int:
        key = (b.machine_id, b.port)
        value = bm.MachineValue(addr=bm.be32(b.address), worker=bm.be32(b.worker_address),
                                port=bm.be16(b.port), flags=bm.MACHINE_F_IN_USE)
        mid = self._machine_ids.get(key)
        if mid is None:
            used = set(self._machines)
            mid = next(i for i in range(self.config.max_machines + 1) if i not in used)
            if mid >= self.config.max_machines:
                raise RuntimeError("machine table full")
            # a fresh id starts from zero: its stats and live count
            zero_stats = bm.MachineStats()
            self.maps["machine_stats"].update(bm.U32(mid), zero_stats)
            self.maps["machine_active"].update(bm.U32(mid), bm.U64(0))
            self.maps["machine_labels"].update(bm.U32(mid), _label(b.app, b.machine_id))
            self._machine_ids[key] = mid
            result[0] += 1
        old = self._machines.get(mid)
        if old is None or bytes(old[2]) != bytes(value):
            self.maps["machines"].update(bm.U32(mid), value)
        self._machines[mid] = (b.app, b.machine_id, value)
        return mid

    def sync(self, tables: Sequence[ServiceTable]) -> SyncResult:
        """Make the maps say what ``tables`` say (raw-TCP services only).

        Per service, a changed backend list is written into the inactive generation
        (Maglev slots + backend list), then the service entries flip to it in one
        map update each, then the old generation is deleted: a packet sees either
        the whole old table or the whole new one. Established flows follow
        conntrack and never move.
        """
        maps = self.maps
        added = [0]
        written = removed = 0
        desired = {t.service_id: t for t in tables if t.raw_tcp}
        referenced: set[int] = set()
        markers = {bm.be32(a) for t in desired.values() for a in t.addresses}
        # markers first: a new VIP is known as ours before its ports are
        for addr in markers - self._markers:
            maps["services"].update(bm.ServiceKey(addr, 0, bm.IPPROTO_TCP),
                                    bm.ServiceValue(id=0xFFFFFFFF, flags=bm.SVC_F_VIP_MARKER))

        for sid, t in desired.items():
            backends: list[tuple[int, int, int]] = []
            for tier in t.tiers:
                start = len(backends)
                for b in tier:
                    mid = self._machine_id(b, added)
                    referenced.add(mid)
                    backends.append((mid, start, len(tier)))
            tier0 = [b for b in (t.tiers[0] if t.tiers else ())]
            size = maglev.table_size(len(tier0))
            keys = {(bm.be32(a), bm.be16(p)) for a in t.addresses for p in t.ports}
            cur = self._services.get(sid)
            if cur is None:
                svc_id = self._free_service_id()
                maps["service_labels"].update(bm.U32(svc_id), _label(t.app, sid))
                maps["service_stats"].update(bm.U32(svc_id), bm.ServiceStats())
                cur = _Service(svc_id, set(), bm.ServiceValue(id=svc_id, gen=1), ())
                self._services[sid] = cur
            value = bm.ServiceValue(id=cur.id, gen=cur.value.gen, maglev_size=size,
                                    backend_count=len(backends), hard_limit=t.hard_limit)
            old_gen = None
            if tuple(backends) != cur.backends or size != cur.value.maglev_size or not cur.keys:
                value.gen = 1 - cur.value.gen
                old_gen = cur.value
                self._write_generation(cur.id, value.gen, tier0, backends, size)
            if bytes(value) != bytes(cur.value) or keys != cur.keys:
                for addr, port in keys:  # the flip: one atomic update per (VIP, port)
                    maps["services"].update(bm.ServiceKey(addr, port, bm.IPPROTO_TCP), value)
                for addr, port in cur.keys - keys:
                    maps["services"].delete(bm.ServiceKey(addr, port, bm.IPPROTO_TCP))
                written += 1
            if old_gen is not None and cur.keys:
                self._delete_generation(cur.id, old_gen)
            cur.keys, cur.value, cur.backends = keys, value, tuple(backends)

        for sid in list(self._services):
            if sid in desired:
                continue
            cur = self._services.pop(sid)
            for addr, port in cur.keys:
                maps["services"].delete(bm.ServiceKey(addr, port, bm.IPPROTO_TCP))
            self._delete_generation(cur.id, cur.value)
            maps["service_labels"].update(bm.U32(cur.id), bm.Label())
            removed += 1
        for addr in self._markers - markers:
            maps["services"].delete(bm.ServiceKey(addr, 0, bm.IPPROTO_TCP))
        self._markers = markers

        # a machine id is freed once nothing routes to it and no flow is live on it
        freed = 0
        for mid in list(self._machines):
            if mid in referenced:
                continue
            active = maps["machine_active"].lookup(bm.U32(mid))
            if active is not None and active.value:
                continue  # draining: keeps its id and address until its flows end
            _, name, mv = self._machines.pop(mid)
            self._machine_ids.pop((name, bm.from_be16(mv.port)), None)
            maps["machines"].update(bm.U32(mid), bm.MachineValue())
            maps["machine_labels"].update(bm.U32(mid), bm.Label())
            freed += 1
        return SyncResult(written, removed, added[0], freed)

    def _free_service_id(self) -> int:
        used = {s.id for s in self._services.values()}
        for i in range(self.config.max_services):
            if i not in used:
                return i
        raise RuntimeError("service table full")

    def _write_generation(self, svc_id: int, gen: int, tier0: list[Backend],
                          backends: list[tuple[int, int, int]], size: int) -> None:
        names = [f"{b.machine_id}:{b.port}" for b in tier0]
        table = maglev.build(names, size)
        tier0_ids = [mid for mid, start, _ in backends if start == 0]
        slots = self.maps["maglev"]
        for slot, idx in enumerate(table):
            slots.update(bm.MaglevKey(svc_id, gen, slot), bm.U32(tier0_ids[idx]))
        for i, (mid, start, length) in enumerate(backends):
            self.maps["backends"].update(bm.BackendKey(svc_id, gen, i),
                                         bm.BackendValue(mid, start, length))

    def _delete_generation(self, svc_id: int, value: bm.ServiceValue) -> None:
        for slot in range(value.maglev_size):
            self.maps["maglev"].delete(bm.MaglevKey(svc_id, value.gen, slot))
        for i in range(value.backend_count):
            self.maps["backends"].delete(bm.BackendKey(svc_id, value.gen, i))

    # ------------------------------------------------------------- reading

    def _sum(self, name: str, key: int) -> Any:
        rows = self.maps[name].lookup_percpu(bm.U32(key))
        if not rows:
            return None
        if isinstance(rows[0], bm.U64):
            return sum(r.value for r in rows)
        total = type(rows[0])()
        for f, _ in total._fields_:
            setattr(total, f, sum(getattr(r, f) for r in rows))
        return total

    def read_counters(self) -> Counters:
        """Every counter, summed over CPUs, with ids decoded into names."""
        if self.config.role == "worker":
            stats = {n: self._sum("worker_stats", i) or 0 for i, n in enumerate(bm.WORKER_STATS)}
            return Counters(stats=stats)
        machines = []
        for mid, (app, name, mv) in sorted(self._machines.items()):
            s = self._sum("machine_stats", mid)
            active = self.maps["machine_active"].lookup(bm.U32(mid))
            machines.append(MachineCounters(
                app, name, bm.from_be16(mv.port), s.opened, active.value if active else 0,
                s.closed, s.reset, s.expired, s.packets_in, s.bytes_in, s.packets_out,
                s.bytes_out))
        services = []
        for sid, svc in sorted(self._services.items()):
            s = self._sum("service_stats", svc.id)
            label = self.maps["service_labels"].lookup(bm.U32(svc.id))
            app = _unlabel(label)[0] if label is not None else ""
            services.append(ServiceCounters(app, sid, s.refused, s.dropped, s.no_backend,
                                            s.flood, s.resteered))
        stats = {n: self._sum("edge_stats", i) or 0 for i, n in enumerate(bm.EDGE_STATS)}
        anomalies = {n: self._sum("anomalies", i) or 0 for i, n in enumerate(bm.ANOMALIES)}
        return Counters(tuple(machines), tuple(services), stats, anomalies)

    def flows(self) -> list[Flow]:
        """The conntrack table, decoded (edge role)."""
        now = time.monotonic_ns()
        by_id = {svc.id: sid for sid, svc in self._services.items()}
        out = []
        for key, v in self.maps["conntrack"].items():
            app, name, _ = self._machines.get(v.machine, ("", f"#{v.machine}", None))
            f = v.flags
            state = ("expired" if f & bm.CT_EXPIRED else "reset" if f & bm.CT_RST
                     else "closed" if f & bm.CT_CLOSED else "fin-in" if f & bm.CT_FIN_IN
                     else "fin-out" if f & bm.CT_FIN_OUT else "open")
            out.append(Flow(bm.from_be32(key.saddr), bm.from_be16(key.sport),
                            bm.from_be32(key.daddr), bm.from_be16(key.dport), app,
                            by_id.get(v.service, ""), name, state,
                            max(0.0, (now - v.last_seen_ns) / 1e9)))
        return out

    def sweep(self, idle_timeout: float | None = None) -> tuple[int, int]:
        """Expire flows idle longer than ``idle_timeout`` seconds (default: config).

        Each candidate goes through the ``edge_sweep`` program (BPF_PROG_TEST_RUN),
        which closes it with the datapath's own fetch_or, so a flow closing at the
        same moment is decremented once. Returns (expired open flows, removed closed
        entries).
        """
        idle_ns = int((self.config.idle_timeout if idle_timeout is None else idle_timeout) * 1e9)
        prog = self.progs["edge_sweep"]
        now = time.monotonic_ns()
        expired = removed = 0
        for key, v in self.maps["conntrack"].items():
            if v.last_seen_ns + idle_ns > now:
                continue
            rc, _, _ = bm.prog_test_run(prog, bytes(bm.SweepRequest(key, idle_ns)))
            expired += rc == bm.SWEEP_EXPIRED
            removed += rc == bm.SWEEP_REMOVED
        return expired, removed
