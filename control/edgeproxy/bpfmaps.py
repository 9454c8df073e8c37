"""The one Python mirror of the kernel maps: structs, constants, and map access.

Everything here mirrors ``bpf/edgeproxy_structs.h`` and ``bpf/edgeproxy_consts.h``;
``tests/test_bpf_structs.py`` compiles those headers and checks every size, field
offset and constant against this module. Map access goes through the ``bpf(2)``
syscall directly (no bcc), so the CLI can read pinned maps without compiling.

Addresses and ports are stored in network byte order, exactly as in packets;
``be32``/``be16`` convert to the integers ctypes stores on this (little-endian) host.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- constants
# edgeproxy_consts.h

EP_IPOPT_TYPE = 0x9E
EP_IPOPT_LEN = 8

CFG_REFUSE_RST = 1
CFG_RESTEER = 2

SVC_F_VIP_MARKER = 1
MACHINE_F_IN_USE = 1

CT_FIN_IN = 1
CT_FIN_OUT = 2
CT_RST = 4
CT_CLOSED = 8
CT_EXPIRED = 16
CT_REUSED = 32
WF_FIN_IN = 1
WF_FIN_OUT = 2
WF_RST = 4

#: key_epoch slots, and where a flow's key epoch sits in ct_value.flags
KEY_EPOCH_SLOTS = 65536
CT_EPOCH_SHIFT = 32
CT_FLAG_BITS = (1 << CT_EPOCH_SHIFT) - 1  # the CT_* part of ct_value.flags

SWEEP_KEPT = 0
SWEEP_EXPIRED = 1
SWEEP_REMOVED = 2

#: edge_stats offsets (STAT_*), in order
EDGE_STATS = ("packets", "forwarded", "returned", "passed", "rst_sent", "dropped")
#: anomalies offsets (ANOM_*), in order
ANOMALIES = (
    "trunc_eth",
    "bad_ip",
    "ip_options",
    "fragment",
    "non_tcp_vip",
    "trunc_tcp",
    "bad_doff",
    "bad_flags",
    "flood",
    "no_backend",
    "ct_miss",
    "bad_ipip",
    "return_no_ct",
    "bad_machine",
    "headroom",
)
#: worker_stats offsets (WSTAT_*), in order
WORKER_STATS = ("packets", "decap", "replies", "bad_ipip", "headroom")

#: the C macro name of every constant above, for the agreement test
C_CONSTANTS: dict[str, int] = {
    "EP_IPOPT_TYPE": EP_IPOPT_TYPE,
    "EP_IPOPT_LEN": EP_IPOPT_LEN,
    "CFG_REFUSE_RST": CFG_REFUSE_RST,
    "CFG_RESTEER": CFG_RESTEER,
    "SVC_F_VIP_MARKER": SVC_F_VIP_MARKER,
    "MACHINE_F_IN_USE": MACHINE_F_IN_USE,
    "CT_FIN_IN": CT_FIN_IN,
    "CT_FIN_OUT": CT_FIN_OUT,
    "CT_RST": CT_RST,
    "CT_CLOSED": CT_CLOSED,
    "CT_EXPIRED": CT_EXPIRED,
    "CT_REUSED": CT_REUSED,
    "WF_FIN_IN": WF_FIN_IN,
    "WF_FIN_OUT": WF_FIN_OUT,
    "WF_RST": WF_RST,
    "KEY_EPOCH_SLOTS": KEY_EPOCH_SLOTS,
    "CT_EPOCH_SHIFT": CT_EPOCH_SHIFT,
    "SWEEP_KEPT": SWEEP_KEPT,
    "SWEEP_EXPIRED": SWEEP_EXPIRED,
    "SWEEP_REMOVED": SWEEP_REMOVED,
    "STAT_MAX": len(EDGE_STATS),
    "ANOM_MAX": len(ANOMALIES),
    "WSTAT_MAX": len(WORKER_STATS),
    **{f"STAT_{n.upper()}": i for i, n in enumerate(EDGE_STATS)},
    **{f"ANOM_{n.upper()}": i for i, n in enumerate(ANOMALIES)},
    **{f"WSTAT_{n.upper()}": i for i, n in enumerate(WORKER_STATS)},
}

IPPROTO_TCP = 6


def be32(addr: IPv4Address) -> int:
    """An IPv4 address as the u32 the kernel stores (network order bytes)."""
    return int.from_bytes(addr.packed, "little")


def from_be32(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little"))


def be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


# ------------------------------------------------------------------ structs
# edgeproxy_structs.h, field for field


class ServiceKey(ct.Structure):
    _fields_ = [("addr", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8)]


class ServiceValue(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("gen", ct.c_uint32), ("maglev_size", ct.c_uint32),
                ("backend_count", ct.c_uint32), ("hard_limit", ct.c_uint32),
                ("flags", ct.c_uint32)]


class MaglevKey(ct.Structure):
    _fields_ = [("service", ct.c_uint32), ("gen", ct.c_uint32), ("slot", ct.c_uint32)]


class BackendKey(ct.Structure):
    _fields_ = [("service", ct.c_uint32), ("gen", ct.c_uint32), ("index", ct.c_uint32)]


class BackendValue(ct.Structure):
    _fields_ = [("machine", ct.c_uint32), ("tier_start", ct.c_uint16),
                ("tier_len", ct.c_uint16)]


class MachineValue(ct.Structure):
    _fields_ = [("addr", ct.c_uint32), ("worker", ct.c_uint32), ("port", ct.c_uint16),
                ("flags", ct.c_uint16), ("pad", ct.c_uint32)]


class Label(ct.Structure):
    _fields_ = [("app", ct.c_char * 64), ("name", ct.c_char * 64)]


class CtKey(ct.Structure):
    """Client-side 4-tuple; every flow is TCP, so the protocol is not stored (the
    12-byte key hashes and compares cheaper in the kernel). ``proto`` is still
    accepted (TCP only) and read back as TCP, for callers written against the
    older 16-byte key."""

    _fields_ = [("saddr", ct.c_uint32), ("daddr", ct.c_uint32), ("sport", ct.c_uint16),
                ("dport", ct.c_uint16)]

    def __init__(self, saddr: int = 0, daddr: int = 0, sport: int = 0, dport: int = 0,
                 proto: int = IPPROTO_TCP) -> None:
        if proto != IPPROTO_TCP:
            raise ValueError(f"conntrack keys are TCP only, not protocol {proto}")
        super().__init__(saddr, daddr, sport, dport)

    @property
    def proto(self) -> int:
        return IPPROTO_TCP


class CtValue(ct.Structure):
    _fields_ = [("flags", ct.c_uint64), ("last_seen_ns", ct.c_uint64),
                ("machine", ct.c_uint32), ("service", ct.c_uint32),
                ("created_ns", ct.c_uint64),
                ("packets_in", ct.c_uint64), ("bytes_in", ct.c_uint64),
                ("packets_out", ct.c_uint64), ("bytes_out", ct.c_uint64)]


class MachineStats(ct.Structure):
    _fields_ = [(n, ct.c_uint64) for n in (
        "opened", "closed", "reset", "expired",
        "packets_in", "bytes_in", "packets_out", "bytes_out")]


class ServiceStats(ct.Structure):
    _fields_ = [(n, ct.c_uint64) for n in (
        "refused", "dropped", "no_backend", "flood", "resteered")]


class DpConfig(ct.Structure):
    _fields_ = [("host_addr", ct.c_uint32), ("flags", ct.c_uint32),
                ("flood_cap", ct.c_uint32), ("pad", ct.c_uint32)]


class FloodState(ct.Structure):
    _fields_ = [("window_start_ns", ct.c_uint64), ("count", ct.c_uint64)]


class SweepRequest(ct.Structure):
    _fields_ = [("key", CtKey), ("pad", ct.c_uint32), ("idle_ns", ct.c_uint64)]


class WorkerFlowKey(ct.Structure):
    _fields_ = [("machine_addr", ct.c_uint32), ("client_addr", ct.c_uint32),
                ("machine_port", ct.c_uint16), ("client_port", ct.c_uint16)]


class WorkerFlowValue(ct.Structure):
    _fields_ = [("vip", ct.c_uint32), ("edge", ct.c_uint32), ("ifindex", ct.c_uint32),
                ("vport", ct.c_uint16), ("edge_mac", ct.c_uint8 * 6),
                ("local_mac", ct.c_uint8 * 6), ("pad", ct.c_uint16),
                ("pad2", ct.c_uint32), ("flags", ct.c_uint64)]


U32 = ct.c_uint32
U64 = ct.c_uint64

#: every mirrored struct by its C name, for the agreement test
C_STRUCTS: dict[str, type[ct.Structure]] = {
    "service_key": ServiceKey,
    "service_value": ServiceValue,
    "maglev_key": MaglevKey,
    "backend_key": BackendKey,
    "backend_value": BackendValue,
    "machine_value": MachineValue,
    "label": Label,
    "ct_key": CtKey,
    "ct_value": CtValue,
    "machine_stats": MachineStats,
    "service_stats": ServiceStats,
    "dp_config": DpConfig,
    "flood_state": FloodState,
    "sweep_request": SweepRequest,
    "worker_flow_key": WorkerFlowKey,
    "worker_flow_value": WorkerFlowValue,
}

#: map name -> (key type, value type, per-CPU); names are the pin file names
EDGE_MAPS: dict[str, tuple[type[Any], type[Any], bool]] = {
    "config": (U32, DpConfig, False),
    "services": (ServiceKey, ServiceValue, False),
    "maglev": (MaglevKey, U32, False),
    "backends": (BackendKey, BackendValue, False),
    "machines": (U32, MachineValue, False),
    "machine_labels": (U32, Label, False),
    "service_labels": (U32, Label, False),
    "vip_filter": (U32, U64, False),
    "key_epoch": (U32, U32, False),
    "conntrack": (CtKey, CtValue, False),
    "machine_active": (U32, U64, False),
    "machine_stats": (U32, MachineStats, True),
    "service_stats": (U32, ServiceStats, True),
    "edge_stats": (U32, U64, True),
    "anomalies": (U32, U64, True),
    "flood": (U32, FloodState, True),
}
WORKER_MAPS: dict[str, tuple[type[Any], type[Any], bool]] = {
    "config": (U32, DpConfig, False),
    "worker_flows": (WorkerFlowKey, WorkerFlowValue, False),
    "worker_stats": (U32, U64, True),
}


def _mix(h: int) -> int:
    """Mirror of hash_mix() in bpf/flow_hash.h (murmur3 finaliser)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def vip_filter_bits(max_services: int) -> int:
    """Bits of the VIP pre-filter (cflag VIP_FILTER_BITS): a power of two, 16 per
    possible service (a VIP per service at most), so at most ~6% of the bits are set."""
    return max(64, 1 << (16 * max(1, max_services) - 1).bit_length())


def vip_filter_bit(addr: int, bits: int) -> int:
    """Mirror of vip_filter_bit() in bpf/flow_hash.h; addr as stored (be32)."""
    h = (addr * 0x9E3779B1) & 0xFFFFFFFF
    return (h ^ (h >> 15)) & (bits - 1)


def key_epoch_slot(addr: int, port: int) -> int:
    """Mirror of key_epoch_slot() in bpf/flow_hash.h; addr/port as stored (be32/be16)."""
    h = (((addr + port * 0x85EBCA6B) & 0xFFFFFFFF) * 0x9E3779B1) & 0xFFFFFFFF
    return (h ^ (h >> 15)) & (KEY_EPOCH_SLOTS - 1)


def flow_hash(saddr: int, daddr: int, sport: int, dport: int) -> int:
    """Mirror of flow_hash() in bpf/flow_hash.h; arguments as stored (be32/be16)."""
    mix = _mix
    h = mix(0x9E3779B9 ^ saddr)
    h = mix(h ^ daddr)
    return mix(h ^ (((sport << 16) | dport) & 0xFFFFFFFF))


# ------------------------------------------------------------- bpf syscall

_NR_BPF = 321  # x86-64
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class _Attr(ct.Structure):
    # big enough for every command used here (the kernel zero-checks the tail)
    _fields_ = [("raw", ct.c_uint8 * 128)]


def bpf(cmd: int, attr: ct.Structure, size: int | None = None) -> int:
    """Raw bpf(2); returns the result or raises OSError."""
    ret = _libc.syscall(_NR_BPF, cmd, ct.byref(attr), size or ct.sizeof(attr))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return int(ret)


class _MapElemAttr(ct.Structure):
    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _BatchAttr(ct.Structure):
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


#: errors that mean "this map (type) has no batch op": fall back to one call per entry
_NO_BATCH = {errno.EINVAL, errno.EOPNOTSUPP, 524}  # 524: the kernel's ENOTSUPP
#: entries per batch syscall (bounds the kernel's work per call and our buffers)
BATCH_CHUNK = 65536


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32),
                ("file_flags", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                ("rest", ct.c_uint8 * 64)]


class TestRunAttr(ct.Structure):  # union bpf_attr, the .test member (kernel ABI)
    _fields_ = [("prog_fd", ct.c_uint32), ("retval", ct.c_uint32),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("data_in", ct.c_uint64), ("data_out", ct.c_uint64),
                ("repeat", ct.c_uint32), ("duration", ct.c_uint32),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("ctx_in", ct.c_uint64), ("ctx_out", ct.c_uint64),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32),
                ("pad", ct.c_uint32)]


def obj_get(path: str | Path) -> int:
    """Open a pinned map or program; returns a new fd."""
    p = ct.create_string_buffer(os.fsencode(str(path)))
    return bpf(BPF_OBJ_GET, _ObjAttr(pathname=ct.addressof(p)))


def obj_pin(fd: int, path: str | Path) -> None:
    p = ct.create_string_buffer(os.fsencode(str(path)))
    bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ct.addressof(p), bpf_fd=fd))


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1,
                  out_size: int = 4096) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: returns (retval, output packet, duration ns per run)."""
    inp = ct.create_string_buffer(bytes(data), len(data))
    out = ct.create_string_buffer(out_size)
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=len(data), data_size_out=out_size,
                        data_in=ct.addressof(inp), data_out=ct.addressof(out),
                        repeat=repeat)
    bpf(BPF_PROG_TEST_RUN, attr)
    return int(attr.retval), out.raw[: attr.data_size_out], int(attr.duration)


def possible_cpus() -> int:
    """Number of possible CPUs: the length of every per-CPU value array."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


#: a ctypes key or value: a Structure above, or U32/U64
CData = Any
CType = type[Any]


class BpfMap:
    """One BPF map by fd, with typed keys and values (a list per CPU if per-CPU)."""

    def __init__(self, fd: int, key_type: CType, value_type: CType, percpu: bool = False,
                 name: str = "") -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        self.name = name
        self._ncpu = possible_cpus() if percpu else 1
        self._stride = (ct.sizeof(value_type) + 7) // 8 * 8 if percpu else ct.sizeof(value_type)
        info = self.info()
        if info.key_size != ct.sizeof(key_type) or info.value_size != ct.sizeof(value_type):
            os.close(fd)
            raise ValueError(
                f"map {name or fd}: kernel layout key={info.key_size} value={info.value_size} "
                f"!= mirror key={ct.sizeof(key_type)} value={ct.sizeof(value_type)} "
                "(pinned by another version? unload first)")
        self.max_entries = int(info.max_entries)
        self.batch_ok = True  # False: BPF_MAP_*_BATCH unsupported (or off), one call per entry
        self.lookup_batch_ok = True  # the same for BPF_MAP_LOOKUP_BATCH (lookup_array)

    @classmethod
    def open_pinned(cls, path: Path, key_type: CType, value_type: CType,
                    percpu: bool = False) -> BpfMap:
        return cls(obj_get(path), key_type, value_type, percpu, name=path.name)

    def info(self) -> _MapInfo:
        info = _MapInfo()
        bpf(BPF_OBJ_GET_INFO_BY_FD,
            _InfoAttr(bpf_fd=self.fd, info_len=ct.sizeof(info), info=ct.addressof(info)))
        return info

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _elem(self, key: CData, buf: ct.Array[ct.c_char] | None = None,
              flags: int = 0) -> _MapElemAttr:
        return _MapElemAttr(map_fd=self.fd, key=ct.addressof(key),
                            value=ct.addressof(buf) if buf is not None else 0, flags=flags)

    def lookup_raw(self, key: CData) -> bytes | None:
        buf = ct.create_string_buffer(self._stride * self._ncpu)
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, self._elem(key, buf))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return buf.raw

    def lookup(self, key: CData) -> CData | None:
        """The value (CPU 0's for a per-CPU map; see lookup_percpu)."""
        raw = self.lookup_raw(key)
        return None if raw is None else self.value_type.from_buffer_copy(raw[: self._stride])

    def lookup_percpu(self, key: CData) -> list[CData]:
        raw = self.lookup_raw(key)
        if raw is None:
            return []
        size = ct.sizeof(self.value_type)
        return [self.value_type.from_buffer_copy(raw[i * self._stride: i * self._stride + size])
                for i in range(self._ncpu)]

    def update(self, key: CData, value: CData, flags: int = BPF_ANY) -> None:
        if self.percpu:
            data = (bytes(value).ljust(self._stride, b"\0")) * self._ncpu
        else:
            data = bytes(value)
        buf = ct.create_string_buffer(data, len(data))
        bpf(BPF_MAP_UPDATE_ELEM, self._elem(key, buf, flags))

    def delete(self, key: CData) -> bool:
        try:
            bpf(BPF_MAP_DELETE_ELEM, self._elem(key))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    # ----------------------------------------------------------- batch ops

    def _values_for_kernel(self, values: bytes | bytearray, count: int) -> bytearray:
        """Per-CPU maps take every CPU's copy: repeat each (padded) value ncpu times."""
        if not self.percpu:
            return values if isinstance(values, bytearray) else bytearray(values)
        if values.count(0) == len(values):  # zeroed counters of new ids: no per-entry copies
            return bytearray(count * self._stride * self._ncpu)
        size = ct.sizeof(self.value_type)
        one = [bytes(values[i * size:(i + 1) * size]).ljust(self._stride, b"\0") * self._ncpu
               for i in range(count)]
        return bytearray(b"".join(one))

    def update_batch(self, keys: bytes | bytearray, values: bytes | bytearray,
                     flags: int = BPF_ANY) -> None:
        """Write ``len(keys) / key size`` entries, packed back to back, in order.

        BPF_MAP_UPDATE_BATCH in chunks of ``BATCH_CHUNK``; a map type without it
        (or ``batch_ok`` False) gets one BPF_MAP_UPDATE_ELEM per entry, same order.
        """
        ks = ct.sizeof(self.key_type)
        count = len(keys) // ks
        if count == 0:
            return
        kbuf = keys if isinstance(keys, bytearray) else bytearray(keys)
        vbuf = self._values_for_kernel(values, count)
        vs = len(vbuf) // count
        kc = (ct.c_char * len(kbuf)).from_buffer(kbuf)
        vc = (ct.c_char * len(vbuf)).from_buffer(vbuf)
        done = 0
        while done < count and self.batch_ok:
            n = min(BATCH_CHUNK, count - done)
            attr = _BatchAttr(keys=ct.addressof(kc) + done * ks,
                              values=ct.addressof(vc) + done * vs, count=n, map_fd=self.fd,
                              elem_flags=flags)
            try:
                bpf(BPF_MAP_UPDATE_BATCH, attr)
            except OSError as e:
                if e.errno in _NO_BATCH and attr.count == 0:
                    self.batch_ok = False
                    break
                raise
            done += n
        for i in range(done, count):
            attr_e = _MapElemAttr(map_fd=self.fd, key=ct.addressof(kc) + i * ks,
                                  value=ct.addressof(vc) + i * vs, flags=flags)
            bpf(BPF_MAP_UPDATE_ELEM, attr_e)

    def delete_batch(self, keys: bytes | bytearray) -> int:
        """Delete entries (keys packed back to back); absent ones are skipped.

        Returns how many were deleted. BPF_MAP_DELETE_BATCH stops at the first absent
        key and says how far it got; the rest continue after it.
        """
        ks = ct.sizeof(self.key_type)
        count = len(keys) // ks
        if count == 0:
            return 0
        kbuf = keys if isinstance(keys, bytearray) else bytearray(keys)
        kc = (ct.c_char * len(kbuf)).from_buffer(kbuf)
        done = deleted = 0
        while done < count and self.batch_ok:
            n = min(BATCH_CHUNK, count - done)
            attr = _BatchAttr(keys=ct.addressof(kc) + done * ks, count=n, map_fd=self.fd)
            try:
                bpf(BPF_MAP_DELETE_BATCH, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    deleted += attr.count
                    done += attr.count + 1  # skip the absent key
                    continue
                if e.errno in _NO_BATCH and attr.count == 0:
                    self.batch_ok = False
                    break
                raise
            deleted += n
            done += n
        for i in range(done, count):
            try:
                bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=self.fd,
                                                      key=ct.addressof(kc) + i * ks))
                deleted += 1
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        return deleted

    def lookup_array(self, count: int) -> bytearray:
        """The raw values of keys ``0 .. count-1`` of an array map, back to back.

        Each value takes ``value_stride`` bytes: a per-CPU value is every possible
        CPU's copy, each padded to 8 bytes, in CPU order (what ``lookup_raw`` gives
        for one key). BPF_MAP_LOOKUP_BATCH, ``BATCH_CHUNK`` keys per call, so reading
        600,000 machines' counters is ten syscalls; without it (older kernel, or
        ``lookup_batch_ok`` False) one BPF_MAP_LOOKUP_ELEM per key.
        """
        count = max(0, min(count, self.max_entries))
        vs = self.value_stride
        out = bytearray(count * vs)
        if count == 0:
            return out
        oc = (ct.c_char * len(out)).from_buffer(out)
        kbuf = (ct.c_uint32 * min(BATCH_CHUNK, count))()
        token = ct.c_uint32(0)  # in: the last key of the call before; out: this call's
        done = 0
        while done < count and self.lookup_batch_ok:
            n = min(BATCH_CHUNK, count - done)
            attr = _BatchAttr(in_batch=ct.addressof(token) if done else 0,
                              out_batch=ct.addressof(token), keys=ct.addressof(kbuf),
                              values=ct.addressof(oc) + done * vs, count=n, map_fd=self.fd)
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:  # the end of the map: attr.count were read
                    done += attr.count
                    break
                if e.errno in _NO_BATCH and done == 0 and attr.count == 0:
                    self.lookup_batch_ok = False
                    break
                raise
            if attr.count == 0 or kbuf[0] != done:  # not an array's dense keys: be safe
                self.lookup_batch_ok = False
                break
            done += attr.count
        key = U32()
        for i in range(done, count):
            key.value = i
            raw = self.lookup_raw(key)
            if raw is not None:
                out[i * vs:(i + 1) * vs] = raw
        return out

    @property
    def value_stride(self) -> int:
        """Bytes per value as the kernel hands them out (per-CPU: all CPUs' copies)."""
        return self._stride * self._ncpu

    def keys(self) -> Iterator[CData]:
        """Every key (hash maps; a key deleted meanwhile restarts nothing, it is skipped)."""
        cur: CData | None = None
        nxt = self.key_type()
        for _ in range(self.max_entries + 1):  # bounded: a map never holds more
            attr = _MapElemAttr(map_fd=self.fd, key=ct.addressof(cur) if cur is not None else 0,
                                value=ct.addressof(nxt))
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            cur = self.key_type.from_buffer_copy(nxt)
            yield cur

    def items(self) -> Iterator[tuple[CData, CData]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value


def open_maps(pin_dir: Path, role: str) -> dict[str, BpfMap]:
    """Open every pinned map of an instance (edge or worker role)."""
    layout = EDGE_MAPS if role == "edge" else WORKER_MAPS
    maps: dict[str, BpfMap] = {}
    for name, (key_type, value_type, percpu) in layout.items():
        maps[name] = BpfMap.open_pinned(pin_dir / name, key_type, value_type,
                                        percpu)
    return maps
