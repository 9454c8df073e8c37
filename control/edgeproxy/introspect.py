"""Look at one instance's pinned fast path: programs, maps, their entries, decoded.

Everything here reads what is pinned under ``/sys/fs/bpf/edgeproxy/<instance>/``,
so it works with no daemon running. Counters and flows come from the same reader
the metrics endpoint uses (``Dataplane.read_counters()`` / ``flows()``); map
metadata comes from the kernel (``BPF_OBJ_GET_INFO_BY_FD``, ``/proc/self/fdinfo``)
and program metadata and attach points from ``bpftool`` (JSON).
"""

from __future__ import annotations

import ctypes as ct
import errno
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

from . import bpfmaps as bm
from .dataplane import PIN_ROOT, XDP_FLAGS_SKB_MODE, Counters, Dataplane, DataplaneConfig

Role = Literal["edge", "worker"]
BPFTOOL_TIMEOUT_S = 10.0
BATCH_ENTRIES = 4096  # entries per BPF_MAP_LOOKUP_BATCH call

#: BPF map type numbers (uapi enum bpf_map_type) for the kinds we pin
MAP_TYPES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash",
             10: "lru_percpu_hash"}
HASH_TYPES = frozenset({"hash", "percpu_hash", "lru_hash", "lru_percpu_hash"})


class InspectError(Exception):
    """A problem the CLI reports in one line; ``exit_code`` follows its conventions."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


NOT_FOUND = 1
UNUSABLE = 2  # usage error, including missing permissions


def permission_error(path: Path, what: str) -> InspectError:
    return InspectError(
        f"permission denied {what} {path}: reading pinned BPF objects needs root "
        "(CAP_BPF and CAP_SYS_ADMIN)", UNUSABLE)


# ------------------------------------------------------------------ opening


def pin_dir(instance: str, pin_root: Path = PIN_ROOT) -> Path:
    return pin_root / instance


def detect_role(directory: Path) -> Role:
    """edge or worker, from which maps are pinned; InspectError when neither."""
    try:
        names = {p.name for p in directory.iterdir()}
    except FileNotFoundError:
        raise InspectError(f"no pinned maps for this instance: {directory} does not exist "
                           "(is the data plane loaded? see `edgectl load`)", NOT_FOUND) from None
    except PermissionError:
        raise permission_error(directory, "listing") from None
    if "conntrack" in names:
        return "edge"
    if "worker_flows" in names:
        return "worker"
    raise InspectError(f"no pinned maps for this instance in {directory}", NOT_FOUND)


def _open_map(path: Path, key: Any, value: Any, percpu: bool = False) -> bm.BpfMap:
    try:
        return bm.BpfMap.open_pinned(path, key, value, percpu)
    except FileNotFoundError:
        raise InspectError(f"{path} is not pinned", NOT_FOUND) from None
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise permission_error(path, "opening") from None
        raise


def open_dataplane(instance: str, pin_root: Path = PIN_ROOT) -> Dataplane:
    """A Dataplane that adopted the instance's pinned maps (nothing is loaded)."""
    directory = pin_dir(instance, pin_root)
    role = detect_role(directory)
    config_map = _open_map(directory / "config", bm.U32, bm.DpConfig)
    try:
        value = config_map.lookup(bm.U32(0))
    finally:
        config_map.close()
    host = bm.from_be32(value.host_addr) if value is not None else IPv4Address(0)
    config = DataplaneConfig(instance=instance, role=role, host_address=host, pin_root=pin_root)
    if role == "edge":
        machines, services, flows = _edge_limits(directory)
        config = replace(config, max_machines=machines, max_services=services, max_flows=flows)
    dp = Dataplane(config)
    try:
        dp.adopt()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise permission_error(directory, "opening maps in") from None
        raise
    return dp


def _edge_limits(directory: Path) -> tuple[int, int, int]:
    """(max machines, services, flows) the instance was compiled with, from map sizes."""
    sizes = []
    for map_name, key, value in (("machines", bm.U32, bm.MachineValue),
                                 ("service_labels", bm.U32, bm.Label),
                                 ("conntrack", bm.CtKey, bm.CtValue)):
        m = _open_map(directory / map_name, key, value)
        sizes.append(m.max_entries)
        m.close()
    return sizes[0], sizes[1], sizes[2]


# ------------------------------------------------------------- programs


@dataclass(frozen=True, slots=True)
class Attachment:
    device: str
    hook: str  # "xdp" | "tc"
    mode: str  # xdp: driver | generic | offload; tc: clsact/egress, clsact/ingress


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    name: str
    id: int
    tag: str
    type: str
    loaded_at: int  # Unix time
    attachments: tuple[Attachment, ...]


def _bpftool(*args: str) -> Any:
    tool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    try:
        done = subprocess.run([tool, "-j", *args], capture_output=True, text=True,
                              timeout=BPFTOOL_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise InspectError("bpftool is not installed (apt-get install bpftool)",
                           UNUSABLE) from None
    if done.returncode != 0:
        message = done.stderr.strip() or done.stdout.strip()
        if "Operation not permitted" in message or "Permission denied" in message:
            raise InspectError(f"bpftool {' '.join(args)}: {message}: needs root "
                               "(CAP_BPF and CAP_SYS_ADMIN)", UNUSABLE)
        raise InspectError(f"bpftool {' '.join(args)}: {message}", UNUSABLE)
    return json.loads(done.stdout or "null")


def attachments_by_program() -> dict[int, list[Attachment]]:
    """Program id -> where it is attached, in this network namespace."""
    out: dict[int, list[Attachment]] = {}
    for ns in _bpftool("net", "show") or []:
        for entry in ns.get("xdp", []):
            out.setdefault(int(entry["id"]), []).append(
                Attachment(entry["devname"], "xdp", entry.get("mode", "")))
        for entry in ns.get("tc", []):
            out.setdefault(int(entry["id"]), []).append(
                Attachment(entry["devname"], "tc", entry.get("kind", "")))
    return out


def programs(directory: Path) -> list[ProgramInfo]:
    """The instance's pinned programs with their attach points in this namespace."""
    pins = sorted(p for p in directory.glob("prog_*"))
    if not pins:
        return []
    attached = attachments_by_program()
    out = []
    for pin in pins:
        info = _bpftool("prog", "show", "pinned", str(pin))
        out.append(ProgramInfo(
            name=pin.name.removeprefix("prog_"), id=int(info["id"]), tag=str(info["tag"]),
            type=str(info["type"]), loaded_at=int(info.get("loaded_at", 0)),
            attachments=tuple(attached.get(int(info["id"]), ()))))
    return out


def xdp_flags_for(attachments: list[Attachment]) -> int:
    return XDP_FLAGS_SKB_MODE if any(a.mode == "generic" for a in attachments) else 0


# ----------------------------------------------------------------- maps


@dataclass(frozen=True, slots=True)
class MapInfo:
    name: str
    type: str
    entries: int  # in use: hash maps count keys; arrays count entries not all zero
    max_entries: int
    memory_bytes: int | None  # memlock from fdinfo
    key_size: int
    value_size: int


def map_memory(fd: int) -> int | None:
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "memlock":
            return int(value.strip())
    return None


def map_type(m: bm.BpfMap) -> str:
    number = int(m.info().type)
    return MAP_TYPES.get(number, f"type-{number}")


def describe_maps(maps: Mapping[str, bm.BpfMap]) -> list[MapInfo]:
    out = []
    for name, m in sorted(maps.items()):
        info = m.info()
        kind = map_type(m)
        out.append(MapInfo(name, kind, count_entries(m, kind), int(info.max_entries),
                           map_memory(m.fd), int(info.key_size), int(info.value_size)))
    return out


def count_entries(m: bm.BpfMap, kind: str) -> int:
    if kind in HASH_TYPES:
        return sum(1 for _ in scan_raw(m))
    return sum(1 for _, value in scan_raw(m) if any(value))


class _BatchAttr(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64),
                ("keys", ct.c_uint64), ("values", ct.c_uint64), ("count", ct.c_uint32),
                ("map_fd", ct.c_uint32), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


BPF_MAP_LOOKUP_BATCH = 24


def scan_raw(m: bm.BpfMap) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) as bytes, BATCH_ENTRIES per syscall; per-CPU values are the
    CPUs' values concatenated, each padded to 8 bytes."""
    key_size = ct.sizeof(m.key_type)
    value_size = ct.sizeof(m.value_type)
    if m.percpu:
        value_size = (value_size + 7) // 8 * 8 * bm.possible_cpus()
    token_size = max(key_size, 8)
    keys = ct.create_string_buffer(key_size * BATCH_ENTRIES)
    values = ct.create_string_buffer(value_size * BATCH_ENTRIES)
    tokens = (ct.create_string_buffer(token_size), ct.create_string_buffer(token_size))
    first = True
    # bounded: each call returns >= 1 entry or ends the scan
    for _ in range(m.max_entries + 1):
        attr = _BatchAttr(in_batch=0 if first else ct.addressof(tokens[0]),
                          out_batch=ct.addressof(tokens[1]), keys=ct.addressof(keys),
                          values=ct.addressof(values), count=BATCH_ENTRIES, map_fd=m.fd)
        ended = False
        try:
            bm.bpf(BPF_MAP_LOOKUP_BATCH, attr, ct.sizeof(attr))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            ended = True
        key_bytes, value_bytes = keys.raw, values.raw  # .raw copies: once per batch
        for i in range(attr.count):
            yield (key_bytes[i * key_size:(i + 1) * key_size],
                   value_bytes[i * value_size:(i + 1) * value_size])
        if ended or attr.count == 0:
            return
        ct.memmove(tokens[0], tokens[1], token_size)
        first = False


# ------------------------------------------------------------- decoding


Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Names:
    """Dense ids -> (app, name), from the label maps."""

    machines: Mapping[int, tuple[str, str]]
    services: Mapping[int, tuple[str, str]]

    def machine(self, mid: int) -> tuple[str, str]:
        return self.machines.get(mid, ("", f"#{mid}"))

    def service(self, sid: int) -> tuple[str, str]:
        return self.services.get(sid, ("", f"#{sid}"))


def read_names(maps: Mapping[str, bm.BpfMap]) -> Names:
    def labels(name: str) -> dict[int, tuple[str, str]]:
        if name not in maps:
            return {}
        out = {}
        for key, value in scan_raw(maps[name]):
            label = bm.Label.from_buffer_copy(value)
            if label.app or label.name:
                out[int.from_bytes(key, "little")] = (
                    label.app.decode(errors="replace"), label.name.decode(errors="replace"))
        return out

    return Names(labels("machine_labels"), labels("service_labels"))


def _summed(m: bm.BpfMap, raw: bytes) -> Any:
    """A per-CPU value summed field by field (or the value itself)."""
    size = ct.sizeof(m.value_type)
    if not m.percpu:
        return m.value_type.from_buffer_copy(raw[:size])
    stride = (size + 7) // 8 * 8
    rows = [m.value_type.from_buffer_copy(raw[i:i + size]) for i in range(0, len(raw), stride)]
    if m.value_type in (bm.U32, bm.U64):
        return m.value_type(sum(r.value for r in rows))
    total = m.value_type()
    for f, _ in total._fields_:
        setattr(total, f, sum(getattr(r, f) for r in rows))
    return total


def _endpoint(addr: int, port: int) -> str:
    return f"{bm.from_be32(addr)}:{bm.from_be16(port)}"


def _flag_names(flags: int, names: Mapping[int, str]) -> str:
    return ",".join(n for bit, n in names.items() if flags & bit) or "-"


CT_FLAGS = {bm.CT_FIN_IN: "fin-in", bm.CT_FIN_OUT: "fin-out", bm.CT_RST: "rst",
            bm.CT_CLOSED: "closed", bm.CT_EXPIRED: "expired", bm.CT_REUSED: "reused"}
CFG_FLAGS = {bm.CFG_REFUSE_RST: "refuse-rst", bm.CFG_RESTEER: "resteer"}


def _mac(octets: Any) -> str:
    return ":".join(f"{b:02x}" for b in bytes(octets))


def _decode_services(k: Any, v: Any, n: Names) -> Row:
    if v.flags & bm.SVC_F_VIP_MARKER:
        return {"vip": str(bm.from_be32(k.addr)), "port": 0, "proto": int(k.proto),
                "app": "", "service": "", "flags": "vip-marker"}
    app, service = n.service(v.id)
    return {"vip": str(bm.from_be32(k.addr)), "port": bm.from_be16(k.port),
            "proto": int(k.proto), "app": app, "service": service, "id": int(v.id),
            "gen": int(v.gen), "maglev_size": int(v.maglev_size),
            "backends": int(v.backend_count), "hard_limit": int(v.hard_limit), "flags": "-"}


def _decode_maglev(k: Any, v: Any, n: Names) -> Row:
    app, service = n.service(k.service)
    return {"app": app, "service": service, "gen": int(k.gen), "slot": int(k.slot),
            "machine": n.machine(v.value)[1]}


def _decode_backends(k: Any, v: Any, n: Names) -> Row:
    app, service = n.service(k.service)
    return {"app": app, "service": service, "gen": int(k.gen), "index": int(k.index),
            "machine": n.machine(v.machine)[1], "tier_start": int(v.tier_start),
            "tier_len": int(v.tier_len)}


def _decode_machines(k: Any, v: Any, n: Names) -> Row:
    app, machine = n.machine(k.value)
    return {"id": int(k.value), "app": app, "machine": machine,
            "address": _endpoint(v.addr, v.port), "worker": str(bm.from_be32(v.worker)),
            "flags": "in-use" if v.flags & bm.MACHINE_F_IN_USE else "-"}


def _decode_labels(k: Any, v: Any, n: Names) -> Row:
    return {"id": int(k.value), "app": v.app.decode(errors="replace"),
            "name": v.name.decode(errors="replace")}


def _decode_conntrack(k: Any, v: Any, n: Names) -> Row:
    app, machine = n.machine(v.machine)
    return {"client": _endpoint(k.saddr, k.sport), "vip": _endpoint(k.daddr, k.dport),
            "app": app, "service": n.service(v.service)[1], "machine": machine,
            "flags": _flag_names(int(v.flags), CT_FLAGS), "last_seen_ns": int(v.last_seen_ns),
            "created_ns": int(v.created_ns), "packets_in": int(v.packets_in),
            "bytes_in": int(v.bytes_in), "packets_out": int(v.packets_out),
            "bytes_out": int(v.bytes_out)}


def _decode_vip_filter(k: Any, v: Any, n: Names) -> Row:
    return {"word": int(k.value), "bits": f"{int(v.value):016x}"}


def _decode_key_epoch(k: Any, v: Any, n: Names) -> Row:
    return {"slot": int(k.value), "epoch": int(v.value)}


def _decode_machine_active(k: Any, v: Any, n: Names) -> Row:
    app, machine = n.machine(k.value)
    return {"id": int(k.value), "app": app, "machine": machine, "active": int(v.value)}


def _decode_machine_stats(k: Any, v: Any, n: Names) -> Row:
    app, machine = n.machine(k.value)
    return {"id": int(k.value), "app": app, "machine": machine,
            **{f: int(getattr(v, f)) for f, _ in v._fields_}}


def _decode_service_stats(k: Any, v: Any, n: Names) -> Row:
    app, service = n.service(k.value)
    return {"id": int(k.value), "app": app, "service": service,
            **{f: int(getattr(v, f)) for f, _ in v._fields_}}


def _named_counter(names: tuple[str, ...]) -> Callable[[Any, Any, Names], Row]:
    def decode(k: Any, v: Any, n: Names) -> Row:
        index = int(k.value)
        return {"counter": names[index] if index < len(names) else f"#{index}",
                "value": int(v.value)}
    return decode


def _decode_config(k: Any, v: Any, n: Names) -> Row:
    return {"host_address": str(bm.from_be32(v.host_addr)),
            "flags": _flag_names(int(v.flags), CFG_FLAGS), "flood_cap": int(v.flood_cap)}


def _decode_flood(k: Any, v: Any, n: Names) -> Row:
    return {"window_start_ns": int(v.window_start_ns), "count": int(v.count)}


def _decode_worker_flows(k: Any, v: Any, n: Names) -> Row:
    return {"machine": _endpoint(k.machine_addr, k.machine_port),
            "client": _endpoint(k.client_addr, k.client_port),
            "vip": _endpoint(v.vip, v.vport), "edge": str(bm.from_be32(v.edge)),
            "ifindex": int(v.ifindex), "edge_mac": _mac(v.edge_mac),
            "local_mac": _mac(v.local_mac)}


Decoder = Callable[[Any, Any, Names], Row]
DECODERS: Mapping[str, Decoder] = {
    "config": _decode_config,
    "services": _decode_services,
    "maglev": _decode_maglev,
    "backends": _decode_backends,
    "machines": _decode_machines,
    "machine_labels": _decode_labels,
    "service_labels": _decode_labels,
    "conntrack": _decode_conntrack,
    "vip_filter": _decode_vip_filter,
    "key_epoch": _decode_key_epoch,
    "machine_active": _decode_machine_active,
    "machine_stats": _decode_machine_stats,
    "service_stats": _decode_service_stats,
    "edge_stats": _named_counter(bm.EDGE_STATS),
    "anomalies": _named_counter(bm.ANOMALIES),
    "flood": _decode_flood,
    "worker_flows": _decode_worker_flows,
    "worker_stats": _named_counter(bm.WORKER_STATS),
}
#: arrays whose all-zero entries mean "unused" and are left out of a dump
SPARSE_ARRAYS = frozenset({"machines", "machine_labels", "service_labels", "machine_active",
                           "machine_stats", "service_stats", "vip_filter", "key_epoch"})


def dump_map(maps: Mapping[str, bm.BpfMap], name: str, *, app: str | None = None,
             raw: bool = False) -> list[Row]:
    """Every entry of one map decoded into names (or hex with ``raw``)."""
    m = maps[name]
    names = read_names(maps)
    rows = []
    for key_bytes, value_bytes in scan_raw(m):
        if name in SPARSE_ARRAYS and not any(value_bytes):
            continue
        key = m.key_type.from_buffer_copy(key_bytes)
        value = _summed(m, value_bytes)
        row = DECODERS[name](key, value, names)
        if app is not None and row.get("app") != app:
            continue
        if raw:
            row = {"key": key_bytes.hex(), "value": value_bytes.hex(), **row}
        rows.append(row)
    return rows


# ---------------------------------------------------------- per-app view


@dataclass(frozen=True, slots=True)
class AppTcpTotals:
    """One app's raw-TCP counters, summed over its machines and services."""

    app: str
    connects: int = 0
    disconnects: int = 0
    active: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0


def app_tcp_totals(counters: Counters) -> dict[str, AppTcpTotals]:
    sums: dict[str, dict[str, int]] = {}
    for m in counters.machines:
        s = sums.setdefault(m.app, {})
        for name, value in (("connects", m.opened), ("active", m.active),
                            ("disconnects", m.closed + m.reset + m.expired),
                            ("bytes_in", m.bytes_in), ("bytes_out", m.bytes_out),
                            ("packets_in", m.packets_in), ("packets_out", m.packets_out)):
            s[name] = s.get(name, 0) + value
    for svc in counters.services:
        s = sums.setdefault(svc.app, {})
        s["refused"] = s.get("refused", 0) + svc.refused
    return {app: AppTcpTotals(app, **values) for app, values in sorted(sums.items())}

