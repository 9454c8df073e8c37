"""xdp: per-packet cost of the edge XDP program, beside a no-op XDP program.

Method (say which, the issue asks): the edge program rewrites and grows the
packet, and with ``repeat > 1`` BPF_PROG_TEST_RUN would hand it its own output
next time. So every case runs **repeat=1, once per call, with the original
packet given again on each call**, for ``calls`` (≥ 100,000) calls, and we sum
the kernel's own ``duration`` (ns, measured with ktime around the program run
inside the kernel, so no syscall or Python time is in it). That sum still holds
one ktime read per call; we measure that overhead in the same run as
(no-op at repeat=1) - (no-op at repeat=1,000,000) and subtract it from every
case. Programs that leave the packet alone (no-op, pass-through) are also timed
the classic way (repeat=1,000,000, kernel-amortised) as a cross-check.

Cases: established flow (a data packet of a flow in conntrack), SYN (the same
SYN each call, its conntrack entry deleted between calls, so each is a full new
flow choice), new flows (a different 5-tuple every call, conntrack growing to
``calls`` entries), pass-through (TCP to an address that is not a VIP). Each
call's verdict is checked; a wrong one fails the scenario.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

from edgebench.common import BenchError, Result, Row, relate

XDP_PASS = 2
BPF_PROG_TEST_RUN = 10
NR_BPF = 321  # x86-64
AMORTISED_REPEAT = 1_000_000

EDGE = "198.18.220.11"
WORKER = "198.18.220.21"
VIP = "198.18.220.100"
OTHER = "198.18.220.99"  # not a VIP: pass-through
CLIENT_NET = "198.18.220.128"  # new-flow sources: .128-.255 and every port
MACHINES = ("198.18.220.64", "198.18.220.65", "198.18.220.66")

NOOP_SRC = b"""
#include <uapi/linux/bpf.h>
int noop(struct xdp_md *ctx) { return XDP_PASS; }
"""

TARGETS = {  # case -> bound on the ratio to the no-op (issue 3)
    "established": 5.0,
    "syn": 12.0,
    "pass-through": 2.0,
    "new-flows": 16.0,
}


_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class TestRunner:
    """BPF_PROG_TEST_RUN with buffers reused across calls."""

    OUT_SIZE = 512

    def __init__(self) -> None:
        self.inp = ct.create_string_buffer(self.OUT_SIZE)
        self.out = ct.create_string_buffer(self.OUT_SIZE)
        from edgeproxy.bpfmaps import TestRunAttr

        self.attr = TestRunAttr()
        self._size = ct.sizeof(self.attr)
        self._ref = ct.byref(self.attr)

    def run(self, fd: int, pkt: bytes, repeat: int = 1) -> tuple[int, int]:
        """(verdict, kernel duration ns per iteration, truncated to whole ns)."""
        ct.memmove(self.inp, pkt, len(pkt))
        a = self.attr
        a.prog_fd, a.data_size_in, a.data_size_out = fd, len(pkt), self.OUT_SIZE
        a.data_in, a.data_out = ct.addressof(self.inp), ct.addressof(self.out)
        a.repeat, a.duration, a.retval = repeat, 0, 0
        if _libc.syscall(NR_BPF, BPF_PROG_TEST_RUN, self._ref, self._size) < 0:
            err = ct.get_errno()
            raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
        return int(a.retval), int(a.duration)

    def amortised(self, fd: int, pkt: bytes, repeat: int) -> float:
        """ns per iteration at ``repeat``: the kernel reports whole ns (6.9 -> 6), so the
        fraction comes from the wall time of the one call, clamped to [d, d + 1)."""
        t0 = time.perf_counter_ns()
        rc, d = self.run(fd, pkt, repeat)
        wall = (time.perf_counter_ns() - t0) / repeat
        if rc != XDP_PASS:
            raise BenchError(f"amortised run: verdict {rc}")
        return min(max(wall, float(d)), d + 0.999)

    def output(self) -> bytes:
        return self.out.raw[: self.attr.data_size_out]


# ---------------------------------------------------------------- packets


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int,
               payload: bytes = b"", seq: int = 1000, ack: int = 0) -> bytes:
    """Ethernet + IPv4 (DF, TTL 63) + TCP (no options), valid checksums."""
    s, d = IPv4Address(src).packed, IPv4Address(dst).packed
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 8192, 0, 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 7, 0x4000, 63, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = bytes.fromhex("020000000002" "020000000001" "0800")
    return eth + ip + tcp


SYN, ACK, PSH = 0x02, 0x10, 0x08


def new_flow_packets(count: int) -> list[bytes]:
    base = int(IPv4Address(CLIENT_NET))
    pkts = []
    for i in range(count):
        src = str(IPv4Address(base + i % 128))
        sport = 1024 + i // 128
        pkts.append(tcp_packet(src, VIP, sport, 7, SYN))
    return pkts


# ---------------------------------------------------------------- loading


def _load_noop() -> tuple[Any, int]:
    from bcc import BPF

    b = BPF(text=NOOP_SRC)
    return b, b.load_func(b"noop", BPF.XDP).fd


def _edge_dataplane(max_flows: int) -> Any:
    from edgeproxy.dataplane import Dataplane, DataplaneConfig
    from edgeproxy.routing import Backend, ServiceTable

    cfg = DataplaneConfig(
        instance=f"bench-{os.getpid()}-xdp", role="edge", host_address=IPv4Address(EDGE),
        max_services=64, max_machines=64, max_flows=max_flows, max_maglev_slots=8192,
        max_backend_entries=1024, flood_cap=0)
    dp = Dataplane(cfg)
    try:
        dp.load()
        tier = tuple(Backend(f"m{i}", "bench", "ord", IPv4Address(a), 7000, IPv4Address(WORKER))
                     for i, a in enumerate(MACHINES))
        # hard_limit far above what the runs open, so the capacity check runs but never refuses
        dp.sync([ServiceTable("bench-tcp", "bench", (IPv4Address(VIP),), (7,), (),
                              "connections", 10**9 // 2, 10**9, (tier,))])
    except BaseException:
        dp.unload()
        raise
    return dp


def _clear_flows(dp: Any) -> None:
    from edgeproxy import bpfmaps as bm

    ct_map = dp.maps["conntrack"]
    for key in list(ct_map.keys()):
        ct_map.delete(key)
    for mid in range(dp.config.max_machines):
        dp.maps["machine_active"].update(bm.U32(mid), bm.U64(0))


# ---------------------------------------------------------------- measuring


def _is_forward(inp: bytes, out: bytes) -> bool:
    """The edge's forward: IPIP (+8-byte option) to the worker, 28 bytes longer."""
    return (len(out) == len(inp) + 28 and out[23] == 4
            and out[30:34] == IPv4Address(WORKER).packed)


def _loop(tr: TestRunner, fd: int, pkts: list[bytes], calls: int,
          check: Callable[[bytes, int, bytes], bool],
          between: Callable[[], None] | None = None) -> float:
    """Sum of kernel durations over ``calls`` repeat=1 runs; ns per call."""
    total = 0
    n = len(pkts)
    for i in range(calls):
        pkt = pkts[i % n]
        rc, dur = tr.run(fd, pkt)
        if not check(pkt, rc, tr.output()):
            raise BenchError(f"wrong verdict {rc} (output {len(tr.output())} bytes) "
                             f"on call {i}")
        total += dur
        if between is not None:
            between()
    return total / calls


def measure(result: Result, runs: int, calls: int) -> None:
    from edgeproxy import bpfmaps as bm

    if os.geteuid() != 0:
        raise BenchError("xdp needs root (loads BPF programs)")
    noop_obj, noop_fd = _load_noop()
    dp = _edge_dataplane(max_flows=max(1 << 17, calls * 2))
    tr = TestRunner()
    try:
        fd = dp.progs["edge_xdp"]
        flows = new_flow_packets(calls)
        syn = tcp_packet("198.18.220.120", VIP, 40000, 7, SYN)
        est_syn = tcp_packet("198.18.220.121", VIP, 40001, 7, SYN)
        est = tcp_packet("198.18.220.121", VIP, 40001, 7, ACK | PSH, b"x" * 64, seq=1001,
                         ack=5001)
        passing = tcp_packet("198.18.220.121", OTHER, 40001, 80, ACK | PSH, b"x" * 64)
        syn_key = bm.CtKey(bm.be32(IPv4Address("198.18.220.120")), bm.be32(IPv4Address(VIP)),
                           bm.be16(40000), bm.be16(7), 6)

        def passed(pkt: bytes, rc: int, out: bytes) -> bool:
            return rc == XDP_PASS and out == pkt

        def forwarded(pkt: bytes, rc: int, out: bytes) -> bool:
            return rc == XDP_PASS and _is_forward(pkt, out)

        def forget_syn() -> None:
            dp.maps["conntrack"].delete(syn_key)

        series: dict[str, list[float]] = {k: [] for k in (
            "noop", "noop-amortised", "timer", "pass-through", "pass-through-amortised",
            "established", "syn", "new-flows")}
        for _ in range(runs):
            _clear_flows(dp)
            noop_r1 = _loop(tr, noop_fd, [passing], calls, passed)
            noop_am = tr.amortised(noop_fd, passing, AMORTISED_REPEAT)
            timer = noop_r1 - noop_am
            series["timer"].append(timer)
            series["noop"].append(noop_am)
            series["noop-amortised"].append(noop_am)
            series["pass-through"].append(_loop(tr, fd, [passing], calls, passed) - timer)
            series["pass-through-amortised"].append(
                tr.amortised(fd, passing, AMORTISED_REPEAT))
            rc, _ = tr.run(fd, est_syn)
            if rc != XDP_PASS:
                raise BenchError(f"SYN that opens the established flow: verdict {rc}")
            series["established"].append(_loop(tr, fd, [est], calls, forwarded) - timer)
            series["syn"].append(_loop(tr, fd, [syn], calls, forwarded, forget_syn) - timer)
            _clear_flows(dp)
            series["new-flows"].append(_loop(tr, fd, flows, calls, forwarded) - timer)
            opened = len(list(dp.maps["conntrack"].keys()))
            if opened < calls:
                raise BenchError(f"new flows: {opened} conntrack entries after {calls} SYNs")
        _clear_flows(dp)
    finally:
        dp.unload()
        del noop_obj

    notes = {
        "noop": "no-op XDP program (returns XDP_PASS), repeat=1,000,000 kernel-amortised",
        "pass-through": "TCP to a non-VIP address: verdict XDP_PASS, packet untouched",
        "pass-through-amortised": "same packet, repeat=1,000,000 (cross-check)",
        "established": "64-byte data segment of a flow in conntrack; forwarded (IPIP +28 B)",
        "syn": "the same SYN each call, its conntrack entry deleted between calls",
        "new-flows": f"{calls} distinct SYNs (new 5-tuple each), conntrack grows to {calls}",
        "timer": "ktime overhead per repeat=1 call, subtracted from every repeat=1 case",
    }
    for name, values in series.items():
        if name == "noop-amortised":
            continue
        result.rows.append(Row(name, "cost", "ns/packet", values, better="lower",
                               notes=notes.get(name, "")).finish())
    for name, bound in TARGETS.items():
        relate(result.rows, name, "noop", "cost", ("<=", bound))
    relate(result.rows, "pass-through-amortised", "noop", "cost")
    result.notes += [
        f"Every repeat=1 case: {calls:,} calls per run, kernel-measured duration summed, "
        "minus the timer overhead measured in the same run; verdict and output checked "
        "on every call.",
        "Ratios are medians over runs of (case ns / no-op ns at repeat=1,000,000).",
    ]
    result.notes.append(
        "repeat=1 calls start with cooler caches than a NAPI batch would; the gap between "
        "pass-through at repeat=1 and at repeat=1,000,000 shows how much that adds.")
