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
import logging
import os
import shutil
import struct
import time
from array import array
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

from . import bpfmaps as bm
from . import counters, maglev
from .counters import Counters as Counters  # re-exported: the reader's types
from .counters import MachineCounters as MachineCounters
from .counters import ServiceCounters as ServiceCounters
from .routing import Backend, ServiceTable

log = logging.getLogger(__name__)

PIN_ROOT = Path("/sys/fs/bpf/edgeproxy")


def bpf_sources() -> Path:
    """Where the BPF C programs and headers are: ``edgeproxy/bpf/``, package data of
    an installed wheel (setup.py copies the checkout's bpf/ there), else the
    checkout's ``bpf/`` itself (an editable install has no copy)."""
    packaged = resources.files("edgeproxy") / "bpf"
    if isinstance(packaged, Path) and (packaged / "edge.bpf.c").is_file():
        return packaged  # bcc compiles from a file name: a zipped package would not do
    return Path(__file__).resolve().parents[2] / "bpf"


BPF_DIR = bpf_sources()
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
TC_EGRESS = "ffff:fff3"
TC_INGRESS = "ffff:fff2"
#: how the programs attach when the config does not say. Measured in
#: docs/DESIGN.md ("Attach mode"): TC keeps GSO super-packets whole.
DEFAULT_ATTACH: Literal["xdp", "tc"] = "tc"
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
    attach: Literal["xdp", "tc"] = DEFAULT_ATTACH  # ingress hook: XDP or TC clsact
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
    age: float = 0.0  # seconds since the flow was accepted
    packets_in: int = 0  # client -> machine
    bytes_in: int = 0  # TCP payload
    packets_out: int = 0  # machine -> client
    bytes_out: int = 0


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
    gen: int
    keys: tuple[bytes, ...]  # packed ServiceKey of each (VIP, port), sorted
    value: bytes  # packed ServiceValue the keys hold
    backends: bytes  # packed BackendValue list of the live generation
    table: ServiceTable | None  # the table it was written from (None: adopted)
    app: str = ""  # for counters: the label says it too, but reading it is a syscall


_U32 = struct.Struct("<I")
_KEY3 = struct.Struct("<III")  # MaglevKey, BackendKey
_BACKEND = struct.Struct("<IHH")  # BackendValue
_MID = struct.Struct("<I4x")  # the machine id of each packed BackendValue
_SVC = struct.Struct("<6I")  # ServiceValue
_MARKER_SUFFIX = b"\0\0" + bytes([bm.IPPROTO_TCP, 0])  # port 0, TCP: (vip, 0) marker
_MARKER_VALUE = _SVC.pack(0xFFFFFFFF, 0, 0, 0, 0, bm.SVC_F_VIP_MARKER)
_ZERO_MACHINE_STATS = bytes(ct.sizeof(bm.MachineStats))
_ZERO_SERVICE_STATS = bytes(ct.sizeof(bm.ServiceStats))
_ZERO_U64 = bytes(8)
_U64 = struct.Struct("<Q")
_EMPTY_LABEL = bytes(ct.sizeof(bm.Label))
_EMPTY_MACHINE = bytes(ct.sizeof(bm.MachineValue))
_IN_USE = bm.MACHINE_F_IN_USE.to_bytes(2, "little") + bytes(4)
_TCP = bytes([bm.IPPROTO_TCP, 0])


def _u32(value: int) -> bytes:
    return _U32.pack(value)


def _port_tcp(port: int) -> bytes:
    return port.to_bytes(2, "big") + _TCP


def _warn_unsteered(t: ServiceTable) -> None:
    """The programs steer IPv4 only: say so, once per change of a raw-TCP service's
    addresses, when it has IPv6 ones (they stay the kernel stack's, which answers
    nothing there), rather than let them fail silently."""
    v6 = [str(a) for a in t.addresses if a.version != 4]
    if v6:
        log.warning("service %s (app %s): not steered on %s: the fast path is IPv4 only",
                    t.service_id, t.app, ", ".join(v6))


def _machine_bytes(b: Backend) -> bytes:
    """A MachineValue, packed: addresses and port in network order, in use."""
    return b.address.packed + b.worker_address.packed + b.port.to_bytes(2, "big") + _IN_USE


def _port_of(machine_value: bytes) -> int:
    """The internal port of a packed MachineValue (network order at offset 8)."""
    return int.from_bytes(machine_value[8:10], "big")


def _label_bytes(app: str, name: str) -> bytes:
    return app.encode()[:63].ljust(64, b"\0") + name.encode()[:63].ljust(64, b"\0")


_MV_SIZE = ct.sizeof(bm.MachineValue)
#: queued new-machine and new-generation bytes that make a sync write them early
FLUSH_BYTES = 16 << 20


class _MachineTable(MutableMapping[int, tuple[str, str, bytes]]):
    """machine id -> (app, machine name, packed MachineValue), for ids in use.

    Parallel lists indexed by id and one bytearray of 16-byte values: at 600,000
    machines a dict of tuples (with an int key and a bytes object each) cost four
    times the memory. The names are the state's own (interned) strings.
    """

    __slots__ = ("_app", "_count", "_name", "_value")

    def __init__(self) -> None:
        self._app: list[str | None] = []  # None: id not in use
        self._name: list[str] = []
        self._value = bytearray()
        self._count = 0

    def __getitem__(self, mid: int) -> tuple[str, str, bytes]:
        if 0 <= mid < len(self._app):
            app = self._app[mid]
            if app is not None:
                return app, self._name[mid], bytes(self._value[mid * _MV_SIZE:(mid + 1) * _MV_SIZE])
        raise KeyError(mid)

    def __setitem__(self, mid: int, entry: tuple[str, str, bytes]) -> None:
        if mid >= len(self._app):
            grow = mid + 1 - len(self._app)
            self._app.extend([None] * grow)
            self._name.extend([""] * grow)
            self._value.extend(bytes(_MV_SIZE * grow))
        if self._app[mid] is None:
            self._count += 1
        app, name, value = entry
        self._app[mid], self._name[mid] = app, name
        self._value[mid * _MV_SIZE:(mid + 1) * _MV_SIZE] = value

    def __delitem__(self, mid: int) -> None:
        if not 0 <= mid < len(self._app) or self._app[mid] is None:
            raise KeyError(mid)
        self._app[mid], self._name[mid] = None, ""
        self._value[mid * _MV_SIZE:(mid + 1) * _MV_SIZE] = bytes(_MV_SIZE)
        self._count -= 1

    def __iter__(self) -> Iterator[int]:
        return (mid for mid, app in enumerate(self._app) if app is not None)

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._app, self._name, self._value, self._count = [], [], bytearray(), 0


class _EndpointIds(MutableMapping[tuple[str, int], int]):
    """(machine name, internal port) -> machine id, stored per port then name, so
    600,000 machines do not each need a (name, port) tuple as a key."""

    __slots__ = ("_by_port", "_count")

    def __init__(self) -> None:
        self._by_port: dict[int, dict[str, int]] = {}
        self._count = 0

    def __getitem__(self, key: tuple[str, int]) -> int:
        return self._by_port[key[1]][key[0]]

    def __setitem__(self, key: tuple[str, int], mid: int) -> None:
        names = self._by_port.setdefault(key[1], {})
        if key[0] not in names:
            self._count += 1
        names[key[0]] = mid

    def __delitem__(self, key: tuple[str, int]) -> None:
        names = self._by_port[key[1]]
        del names[key[0]]
        self._count -= 1
        if not names:
            del self._by_port[key[1]]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return ((name, port) for port, names in self._by_port.items() for name in names)

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._by_port, self._count = {}, 0


class _Writes:
    """Map writes of one sync phase, per map, flushed as one batch per map."""

    __slots__ = ("ops", "size")

    def __init__(self) -> None:
        self.ops: dict[tuple[str, bool], tuple[bytearray, bytearray]] = {}
        self.size = 0  # bytes queued

    def put(self, name: str, key: bytes, value: bytes) -> None:
        keys, values = self.ops.setdefault((name, False), (bytearray(), bytearray()))
        keys += key
        values += value
        self.size += len(key) + len(value)

    def delete(self, name: str, key: bytes) -> None:
        keys, _ = self.ops.setdefault((name, True), (bytearray(), bytearray()))
        keys += key
        self.size += len(key)

    def flush(self, maps: dict[str, bm.BpfMap]) -> None:
        for (name, is_delete), (keys, values) in self.ops.items():
            if is_delete:
                maps[name].delete_batch(keys)
            else:
                maps[name].update_batch(keys, values)
        self.ops.clear()
        self.size = 0


@dataclass(slots=True)
class _Pending:
    """What one sync has queued so far."""

    phase0: _Writes  # markers, machines, labels, zeroed counters
    phase1: _Writes  # new generations
    phase2: _Writes  # the flips
    flipped: set[bytes]  # service keys written in phase 2
    stale: set[bytes]  # service keys to delete (unless flipped)
    phase4: _Writes  # old generations, freed labels, gone markers
    markers: dict[bytes, bool]  # VIPs touched -> had a marker before


def _delete_generation(ops: _Writes, svc_id: int, value: bytes) -> None:
    _, gen, size, count, _, _ = _SVC.unpack(value)
    for slot in range(size):
        ops.delete("maglev", _KEY3.pack(svc_id, gen, slot))
    for i in range(count):
        ops.delete("backends", _KEY3.pack(svc_id, gen, i))


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


# What load_in_child runs: the config arrives pickled on stdin.
_LOAD_IN_CHILD = (
    "import pickle, sys\n"
    "from edgeproxy.dataplane import Dataplane\n"
    "dataplane = Dataplane(pickle.load(sys.stdin.buffer))\n"
    "dataplane.load()\n"
    "dataplane.close()\n"
)


class Dataplane:
    """One instance of the fast path (edge or worker role) on this host."""

    def __init__(self, config: DataplaneConfig) -> None:
        self.config = config
        self.maps: dict[str, bm.BpfMap] = {}
        self.progs: dict[str, int] = {}  # program name -> fd
        self._bpf: Any = None
        self._services: dict[str, _Service] = {}
        self._machine_ids = _EndpointIds()  # (machine name, port) -> id
        # id -> (app, machine name, packed MachineValue), in lists indexed by id
        self._machines = _MachineTable()
        self._markers: dict[bytes, int] = {}  # VIP (packed) -> service entries on it
        # the VIP pre-filter as written: word -> value, and bit -> VIPs (markers) on it
        self._filter_bits = bm.vip_filter_bits(config.max_services)
        self._filter_words: dict[int, int] = {}
        self._filter_refs: dict[int, int] = {}
        self._mrefs = array("i")  # machine id -> backend entries naming it
        self._unreferenced: set[int] = set()  # machine ids nothing names (maybe draining)
        self._free_sids: list[int] = []  # freed service ids, reused first
        self._next_sid = 0  # ids >= this were never handed out
        self._free_mids: list[int] = []
        self._next_mid = 0

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
            f"-DVIP_FILTER_BITS={bm.vip_filter_bits(c.max_services)}",
            "-Wno-unused-function",
        ]

    def load(self) -> None:
        """Compile and load; adopt pinned maps (flows and counters survive); attach
        to every interface, replacing an older program atomically."""
        from bcc import BPF  # imported here: reading pinned maps needs no bcc

        c = self.config
        c.pin_dir.mkdir(parents=True, exist_ok=True)
        # every entry is loaded in both attach modes (the fixtures run them all)
        if c.role == "edge":
            src, funcs = "edge.bpf.c", {"edge_xdp": BPF.XDP, "edge_tc": BPF.SCHED_CLS,
                                        "edge_sweep": BPF.XDP}
        else:
            src, funcs = "worker.bpf.c", {"worker_ingress": BPF.XDP,
                                          "worker_ingress_tc": BPF.SCHED_CLS,
                                          "worker_egress": BPF.SCHED_CLS}
        if not (c.bpf_dir / src).is_file():
            raise FileNotFoundError(f"BPF source {c.bpf_dir / src} is missing: this "
                                    "edgeproxy install carries no bpf/ (rebuild the wheel)")
        self._bpf = BPF(src_file=str(c.bpf_dir / src).encode(), cflags=self._cflags())
        fns = {name: self._bpf.load_func(name.encode(), kind) for name, kind in funcs.items()}
        for name, fn in fns.items():
            self.progs[name] = fn.fd
            pin = c.pin_dir / f"prog_{name}"
            pin.unlink(missing_ok=True)
            bm.obj_pin(fn.fd, pin)
        self.adopt()
        self._write_config()
        if c.role == "edge":
            self._write_vip_filter()  # before attaching: a new map starts empty
            self._start_key_epochs()
        ingress = ("edge_xdp", "edge_tc") if c.role == "edge" else (
            "worker_ingress", "worker_ingress_tc")
        with netns(c.netns):
            for ifname in c.interfaces:
                if c.role == "edge":
                    # the encapsulated packet we pass on carries this host's own address
                    # as its source; without accept_local the kernel drops it as martian
                    Path(f"/proc/sys/net/ipv4/conf/{ifname}/accept_local").write_text("1")
                else:
                    self._attach_tc(ifname, fns["worker_egress"].fd, "worker_egress",
                                    TC_EGRESS)
                # the new hook first, then the other mode's goes: no gap on a switch
                if c.attach == "tc":
                    self._attach_tc(ifname, fns[ingress[1]].fd, ingress[1], TC_INGRESS)
                    with suppress(Exception):  # no XDP program there
                        BPF.remove_xdp(ifname.encode(), c.xdp_flags)
                else:
                    BPF.attach_xdp(ifname.encode(), fns[ingress[0]], c.xdp_flags)
                    self._detach_tc(ifname, TC_INGRESS)

    def load_in_child(self, timeout_s: float = 120.0) -> None:
        """``load()`` in a short-lived child process, then ``adopt()`` what it pinned.

        Compiling with bcc brings LLVM into the process (about 180 MiB that never
        goes away); the programs, pins and attachments belong to the kernel and
        outlive the child, so a long-running daemon keeps only the map fds.
        """
        import pickle
        import subprocess
        import sys

        done = subprocess.run(
            [sys.executable, "-c", _LOAD_IN_CHILD], input=pickle.dumps(self.config),
            capture_output=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError("loading the programs failed: " + " | ".join(tail))
        self.adopt()

    def _attach_tc(self, ifname: str, fd: int, name: str, parent: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            try:
                ipr.tc("add", "clsact", idx)
            except Exception as e:  # pyroute2 NetlinkError: clsact already there
                if getattr(e, "code", None) != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name=name,
                   parent=parent, prio=TC_PRIO, classid=1, direct_action=True)

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
                with suppress(Exception):  # interface already gone / no XDP there
                    BPF.remove_xdp(ifname.encode(), c.xdp_flags)
                self._detach_tc(ifname, TC_INGRESS)
                if c.role == "worker":
                    self._detach_tc(ifname, TC_EGRESS)
        self.close()
        if c.pin_dir.exists():
            shutil.rmtree(c.pin_dir)

    def _detach_tc(self, ifname: str, parent: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return
            with suppress(Exception):  # filter already gone
                ipr.tc("del-filter", "bpf", found[0], ":1", parent=parent, prio=TC_PRIO)

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
        del self._mrefs[:]
        self._unreferenced.clear()
        services, labels = self.maps["services"], self.maps["service_labels"]
        by_id: dict[int, _Service] = {}
        for key, value in services.items():
            if value.flags & bm.SVC_F_VIP_MARKER:
                continue  # counted from the ports below
            svc = by_id.get(value.id)
            if svc is None:
                packed = bytearray()
                for i in range(value.backend_count):
                    b = self.maps["backends"].lookup(bm.BackendKey(value.id, value.gen, i))
                    if b is not None:
                        packed += bytes(b)
                svc = by_id[value.id] = _Service(int(value.id), int(value.gen), (),
                                                 bytes(value), bytes(packed), None)
            svc.keys = tuple(sorted((*svc.keys, bytes(key))))
        for sid, svc in by_id.items():
            label = labels.lookup(bm.U32(sid))
            if label is not None:
                svc.app, name = _unlabel(label)
                self._services[name] = svc
            for key in svc.keys:
                self._markers[key[:4]] = self._markers.get(key[:4], 0) + 1
        self._filter_words.clear()
        self._filter_refs.clear()
        for addr in self._markers:
            self._filter_ref(addr, 1)
        machines, mlabels = self.maps["machines"], self.maps["machine_labels"]
        size = ct.sizeof(bm.MachineValue)
        raw = machines.lookup_array(self.config.max_machines)  # one batch, not 1M lookups
        for mid in range(len(raw) // size):
            value = bytes(raw[mid * size:(mid + 1) * size])
            if not bm.MachineValue.from_buffer_copy(value).flags & bm.MACHINE_F_IN_USE:
                continue
            label = mlabels.lookup(bm.U32(mid))
            app, name = _unlabel(label) if label is not None else ("", f"#{mid}")
            self._machines[mid] = (app, name, value)
            self._machine_ids[(name, _port_of(value))] = mid
        for svc in self._services.values():
            self._ref(svc.backends, 1)
        refs = self._mrefs
        self._unreferenced = {mid for mid in self._machines if mid >= len(refs) or not refs[mid]}
        sids = {svc.id for svc in by_id.values()}
        self._next_sid = max(sids, default=-1) + 1
        self._free_sids = [i for i in reversed(range(self._next_sid)) if i not in sids]
        self._next_mid = max(self._machines, default=-1) + 1
        self._free_mids = [i for i in reversed(range(self._next_mid)) if i not in self._machines]

    # ---------------------------------------------------------------- sync
    #
    # The loader's cache says what the maps hold, per service and per machine id, in
    # the packed bytes the maps take, so "did this change" is a bytes comparison and
    # unchanged services cost one identity (or equality) test of their table.
    # Ids come from free lists (O(1)); every map write goes through _Writes, which
    # sends one BPF_MAP_*_BATCH per map and phase (per-entry where a map has none).

    def _alloc_service_id(self) -> int:
        if self._free_sids:
            return self._free_sids.pop()
        if self._next_sid >= self.config.max_services:
            raise RuntimeError("service table full")
        self._next_sid += 1
        return self._next_sid - 1

    def _alloc_machine_id(self) -> int:
        if self._free_mids:
            return self._free_mids.pop()
        if self._next_mid >= self.config.max_machines:
            raise RuntimeError("machine table full")
        self._next_mid += 1
        return self._next_mid - 1

    def _free_service_id(self) -> int:
        """The id the next new service gets (kept for tools; sync allocates itself)."""
        if self._free_sids:
            return self._free_sids[-1]
        if self._next_sid >= self.config.max_services:
            raise RuntimeError("service table full")
        return self._next_sid

    def _machine_id(self, b: Backend, ops: _Writes, result: list[int]) -> int:
        key = (b.machine_id, b.port)
        packed = _machine_bytes(b)
        mid = self._machine_ids.get(key)
        if mid is None:
            mid = self._alloc_machine_id()
            # a fresh id starts from zero: its stats and live count
            ops.put("machine_stats", _u32(mid), _ZERO_MACHINE_STATS)
            ops.put("machine_active", _u32(mid), _ZERO_U64)
            ops.put("machine_labels", _u32(mid), _label_bytes(b.app, b.machine_id))
            self._machine_ids[key] = mid
            self._machines[mid] = (b.app, b.machine_id, packed)
            ops.put("machines", _u32(mid), packed)
            result[0] += 1
            return mid
        old = self._machines.get(mid)
        if old is None or old[2] != packed:
            ops.put("machines", _u32(mid), packed)
            self._machines[mid] = (b.app, b.machine_id, packed)
        return mid

    def _ref(self, backends: bytes, delta: int) -> None:
        """Count references to machine ids; one that drops to 0 may be freed at the end."""
        refs = self._mrefs
        for (mid,) in _MID.iter_unpack(backends):
            if mid >= len(refs):
                refs.extend([0] * (mid + 1 - len(refs)))
            n = refs[mid] + delta
            refs[mid] = n
            if n:
                self._unreferenced.discard(mid)
            else:
                self._unreferenced.add(mid)

    def _filter_ref(self, addr: bytes, delta: int) -> int:
        """Count one VIP more or less on its pre-filter bit; returns the bit's word."""
        bit = bm.vip_filter_bit(int.from_bytes(addr, "little"), self._filter_bits)
        word = bit >> 6
        n = self._filter_refs.get(bit, 0) + delta
        if n > 0:
            self._filter_refs[bit] = n
            self._filter_words[word] = self._filter_words.get(word, 0) | 1 << (bit & 63)
        else:
            self._filter_refs.pop(bit, None)
            value = self._filter_words.get(word, 0) & ~(1 << (bit & 63))
            if value:
                self._filter_words[word] = value
            else:
                self._filter_words.pop(word, None)
        return word

    def _write_vip_filter(self, words: Iterable[int] | None = None,
                          keep: dict[int, int] | None = None) -> None:
        """Write pre-filter words from the cache (all of them when ``words`` is None),
        OR-ing in ``keep`` (word -> bits still needed until a later write clears them)."""
        if words is None:
            words = range(self._filter_bits // 64)
        keep = keep or {}
        keys, values = bytearray(), bytearray()
        for word in words:
            keys += _u32(word)
            values += _U64.pack(self._filter_words.get(word, 0) | keep.get(word, 0))
        self.maps["vip_filter"].update_batch(keys, values)

    def _start_key_epochs(self) -> None:
        """A key_epoch map that is all zero is new (first load, or an upgrade from
        programs without it): start every slot at 1, so flows stamped 0 by older
        programs, whose keys may have been deleted unseen, take the services lookup."""
        epochs = self.maps["key_epoch"]
        if any(epochs.lookup_array(bm.KEY_EPOCH_SLOTS)):
            return
        keys = b"".join(_u32(i) for i in range(bm.KEY_EPOCH_SLOTS))
        epochs.update_batch(keys, _u32(1) * bm.KEY_EPOCH_SLOTS)

    def _bump_epochs(self, deleted: Iterable[bytes], ops: _Writes) -> None:
        """Queue key_epoch + 1 for the bucket of every deleted services key: flows
        that began before see a different epoch and take the services lookup again."""
        slots = {bm.key_epoch_slot(int.from_bytes(k[:4], "little"),
                                   int.from_bytes(k[4:6], "little")) for k in deleted}
        if not slots:
            return
        epochs = self.maps["key_epoch"]
        if len(slots) > 256:  # one batch read instead of a lookup per slot
            raw = epochs.lookup_array(bm.KEY_EPOCH_SLOTS)
            current = {slot: _U32.unpack_from(raw, slot * 4)[0] for slot in slots}
        else:
            current = {}
            for slot in slots:
                cur = epochs.lookup(bm.U32(slot))
                current[slot] = int(cur.value) if cur is not None else 0
        for slot in sorted(slots):
            ops.put("key_epoch", _u32(slot), _u32((current[slot] + 1) & 0xFFFFFFFF))

    def _marker(self, addr: bytes, delta: int, touched: dict[bytes, bool]) -> None:
        """Count the (service, port) entries on a VIP; ``touched`` remembers whether
        each VIP had its (vip, 0) marker before this sync, to write the difference."""
        touched.setdefault(addr, addr in self._markers)
        n = self._markers.get(addr, 0) + delta
        if n > 0:
            self._markers[addr] = n
        else:
            self._markers.pop(addr, None)

    def sync(self, tables: Iterable[ServiceTable], *, partial: bool = False,
             removed: Iterable[str] = ()) -> SyncResult:
        """Make the maps say what ``tables`` say (raw-TCP services only).

        ``partial=False``: ``tables`` is every service; the others leave the maps.
        ``partial=True``: only the services in ``tables`` (and the ids in ``removed``)
        change; every other service is left as it is.

        A changed backend list is written into the service's inactive generation
        (Maglev slots + backend list); only when every changed service's new
        generation is in the maps do the service entries flip to it, one map update
        per (VIP, port); then old generations are deleted. A packet sees either the
        whole old table or the whole new one. Established flows follow conntrack and
        never move. Writes are batched per map and phase.
        """
        added = [0]
        written = 0
        # phase 0: markers, machines, labels; 1: new generations; 2: the flips;
        # 3: stale service entries; 4: old generations, freed labels, markers
        phase0, phase1, phase2, phase3, phase4 = (_Writes() for _ in range(5))
        w = _Pending(phase0, phase1, phase2, set(), set(), phase4, {})
        desired: set[str] = set()
        gone: list[str] = list(removed) if partial else []
        for t in tables:
            sid = t.service_id
            if not t.raw_tcp:
                if partial:
                    gone.append(sid)  # became HTTP: leaves the kernel
                continue
            desired.add(sid)
            cur = self._services.get(sid)
            if cur is not None and cur.table is not None and (
                    cur.table is t or cur.table == t):
                cur.table = t  # unchanged: nothing to write (keep the newer object)
                continue
            written += self._sync_service(t, cur, added, w)
            if phase0.size + phase1.size > FLUSH_BYTES:
                # New machines and inactive generations may land early: nothing routes
                # to them before the flips. Bounds a cold load's queued writes (and
                # the per-CPU copies made of them) instead of holding all 200k at once.
                phase0.flush(self.maps)
                phase1.flush(self.maps)
        if not partial:
            gone = [sid for sid in self._services if sid not in desired]
        removed_n = 0
        dead_ids: list[int] = []
        for sid in gone:
            cur = self._services.get(sid)
            if cur is None or sid in desired:
                continue
            del self._services[sid]
            for key in cur.keys:
                w.stale.add(key)
                self._marker(key[:4], -1, w.markers)
            _delete_generation(phase4, cur.id, cur.value)
            phase4.put("service_labels", _u32(cur.id), _EMPTY_LABEL)
            self._ref(cur.backends, -1)
            dead_ids.append(cur.id)
            removed_n += 1
        # VIP pre-filter: a new VIP's bit is set before its marker and ports exist,
        # a gone VIP's bit cleared after they are deleted (never a false negative)
        filter_set: set[int] = set()
        filter_clear: dict[int, int] = {}  # word -> bits of gone VIPs, kept until the end
        for addr, had in w.markers.items():
            has = addr in self._markers
            if has and not had:  # a new VIP is known as ours before its ports are
                filter_set.add(self._filter_ref(addr, 1))
                phase0.put("services", addr + _MARKER_SUFFIX, _MARKER_VALUE)
            elif had and not has:
                bit = bm.vip_filter_bit(int.from_bytes(addr, "little"), self._filter_bits)
                word = self._filter_ref(addr, -1)
                filter_clear[word] = filter_clear.get(word, 0) | 1 << (bit & 63)
                phase4.delete("services", addr + _MARKER_SUFFIX)
        deleted = sorted(w.stale - w.flipped)  # a key another service took is kept
        for key in deleted:
            phase3.delete("services", key)
        # after the deletes (phase 4 flushes after phase 3): a flow created from an
        # epoch read after the bump read it after its key was gone
        self._bump_epochs(deleted, phase4)

        if filter_set:  # a word shared with a gone VIP keeps its bit for now
            self._write_vip_filter(sorted(filter_set), filter_clear)
        for ops in (phase0, phase1, phase2, phase3, phase4):
            ops.flush(self.maps)
        if filter_clear:
            self._write_vip_filter(sorted(filter_clear))
        self._free_sids.extend(reversed(dead_ids))
        freed = self._free_unreferenced()
        if not self._services and len(self._free_sids) == self._next_sid:
            self._free_sids.clear()  # nothing left: start again from id 0
            self._next_sid = 0
        return SyncResult(written, removed_n, added[0], freed)

    def _sync_service(self, t: ServiceTable, cur: _Service | None, added: list[int],
                      w: _Pending) -> int:
        """Queue one service's writes; returns 1 if its service entries change."""
        phase0, phase1 = w.phase0, w.phase1
        packed = bytearray()
        tier0_ids: list[int] = []
        for n, tier in enumerate(t.tiers):
            start = len(packed) // 8
            for b in tier:
                mid = self._machine_id(b, phase0, added)
                packed += _BACKEND.pack(mid, start, len(tier))
                if n == 0:
                    tier0_ids.append(mid)
        backends = bytes(packed)
        size = maglev.table_size(len(tier0_ids))
        keys = tuple(sorted({a.packed + _port_tcp(p) for a in t.addresses if a.version == 4
                             for p in t.ports}))
        if cur is None or cur.table is None or cur.table.addresses != t.addresses:
            _warn_unsteered(t)
        if cur is None:
            svc_id = self._alloc_service_id()
            phase0.put("service_labels", _u32(svc_id), _label_bytes(t.app, t.service_id))
            phase0.put("service_stats", _u32(svc_id), _ZERO_SERVICE_STATS)
            cur = _Service(svc_id, 1, (), _SVC.pack(svc_id, 1, 0, 0, 0, 0), b"", None, t.app)
            self._services[t.service_id] = cur
        gen = cur.gen
        old_value = cur.value
        new_gen = backends != cur.backends or size != _SVC.unpack(old_value)[2] or not cur.keys
        if new_gen:
            gen = 1 - cur.gen
            names = [f"{b.machine_id}:{b.port}" for b in (t.tiers[0] if t.tiers else ())]
            table = maglev.build(names, size)
            for slot, idx in enumerate(table):
                phase1.put("maglev", _KEY3.pack(cur.id, gen, slot), _u32(tier0_ids[idx]))
            for i in range(len(backends) // 8):
                phase1.put("backends", _KEY3.pack(cur.id, gen, i), backends[i * 8:i * 8 + 8])
        value = _SVC.pack(cur.id, gen, size, len(backends) // 8, t.hard_limit, 0)
        changed = 0
        if value != old_value or keys != cur.keys:
            had = set(cur.keys)
            for key in keys:  # the flip: one atomic update per (VIP, port)
                w.phase2.put("services", key, value)
                w.flipped.add(key)
                if key not in had:
                    self._marker(key[:4], 1, w.markers)
            for key in had.difference(keys):
                w.stale.add(key)
                self._marker(key[:4], -1, w.markers)
            changed = 1
        if new_gen:
            _delete_generation(w.phase4, cur.id, old_value)
        self._ref(backends, 1)
        self._ref(cur.backends, -1)
        cur.gen, cur.keys, cur.value, cur.backends, cur.table = gen, keys, value, backends, t
        cur.app = t.app
        return changed

    def _free_unreferenced(self) -> int:
        """Free machine ids nothing routes to and no flow is live on (draining ones wait)."""
        freed = 0
        ops = _Writes()
        for mid in sorted(self._unreferenced):
            active = self.maps["machine_active"].lookup(bm.U32(mid))
            if active is not None and active.value:
                continue  # draining: keeps its id and address until its flows end
            self._unreferenced.discard(mid)
            entry = self._machines.pop(mid, None)
            if entry is None:
                continue
            self._machine_ids.pop((entry[1], _port_of(entry[2])), None)
            ops.put("machines", _u32(mid), _EMPTY_MACHINE)
            ops.put("machine_labels", _u32(mid), _EMPTY_LABEL)
            self._free_mids.append(mid)
            freed += 1
        ops.flush(self.maps)
        if not self._machines and len(self._free_mids) == self._next_mid:
            self._free_mids.clear()
            self._next_mid = 0
        return freed

    # ------------------------------------------------------------- reading

    def _sum(self, name: str, key: int) -> Any:
        return counters.sum_one(self.maps[name], key)

    def read_counters(self, *, skip_idle: bool = False) -> Counters:
        """Every counter, summed over CPUs, with ids decoded into names (``counters``).

        ``skip_idle``: leave out machines and services whose counters are all zero
        (no traffic since their id was assigned), as the metrics collector does.
        Reads are one batch syscall per map and 65,536 ids (``BpfMap.lookup_array``)
        summed over CPUs by numpy; rows come back in columns (``MachineRows``).
        """
        if self.config.role == "worker":
            return counters.read_worker(self.maps)
        return counters.read_edge(self.maps, self._machines, self._services, skip_idle)

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
                            max(0.0, (now - v.last_seen_ns) / 1e9),
                            max(0.0, (now - v.created_ns) / 1e9),
                            v.packets_in, v.bytes_in, v.packets_out, v.bytes_out))
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
            rc, _, _ = bm.prog_test_run(prog, bytes(bm.SweepRequest(key, 0, idle_ns)))
            expired += rc == bm.SWEEP_EXPIRED
            removed += rc == bm.SWEEP_REMOVED
        return expired, removed
