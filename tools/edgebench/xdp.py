"""xdp: per-packet cost of the edge XDP program, beside a no-op XDP program.

Method (say which, the issue asks). The issue's method is BPF_PROG_TEST_RUN with
repeat ≥ 100k; a program that rewrites the packet must get it restored each
iteration, and the verdict checked. With ``repeat > 1`` the kernel keeps the
xdp_buff between iterations (an ``adjust_head`` stays applied, rewritten bytes
stay), so:

- **Rewriting cases** (established, SYN, new flows) run at repeat=``calls`` through
  a small wrapper XDP program (``WRAP_SRC``). Each iteration it (1) compares the
  packet the previous iteration left with the expected forward, byte for byte
  except the fields that legitimately differ between new flows, and counts
  mismatches; (2) undoes the ``adjust_head`` (``bpf_xdp_adjust_head`` is called
  every iteration on both sides, with offset 0 around the no-op, so the helper call
  cancels) and copies the original packet back;
  (3) SYN: deletes the tuple's conntrack entry, so every iteration is a full new
  flow choice; new flows: writes the next 5-tuple (and recomputes both checksums);
  (4) tail-calls the edge program. The same wrapper around the no-op program is
  timed too, and ``W(edge) - W(no-op) + no-op`` is reported, so the wrapper's work
  cancels; what does not cancel is charged to the edge program (the 28 more bytes
  compared, and for SYN deleting an existing entry instead of missing one), so the
  figures err high. The SYN's share is the larger: bracketed with
  ``bpf_ktime_get_ns()`` on a warm LRU map of the same shape, deleting an entry
  costs ~34 ns and missing one ~13 ns, so ~20 ns of the SYN figure is the
  wrapper's. It cannot be made to cancel: the no-op side could only delete an
  existing entry by inserting it first, which would subtract an insert the SYN
  really does (~57 ns), and a pool of pre-made entries would be cold where the
  SYN's is warm; both would make the SYN look cheaper than it is. Checks: every
  iteration's output (mismatch count 0, iteration count = repeat), the last
  iteration's verdict and bytes, and the edge program's own verdict counters (all
  ``repeat`` iterations forwarded, nothing passed, dropped, refused, and no
  anomaly, so none was e.g. resteered without conntrack into the same bytes; and
  ``repeat`` flows opened for SYN and new flows, none for established, so no SYN
  stuck to an entry the wrapper failed to delete).
- **Pass-through** does not rewrite (verdict XDP_PASS, packet untouched), so it is
  timed like the no-op at repeat=1,000,000, verdict and unchanged output checked.
- Every case is also measured the way this file did before, as a secondary
  ``*-repeat1`` row: ``calls`` repeat=1 calls with the original packet given again
  each call, the kernel's ``duration`` summed, minus the ktime overhead of a
  repeat=1 call measured in the same run ((no-op at repeat=1) - (no-op at
  repeat=1,000,000)). Each such call starts with caches the syscall path has
  cooled, unlike packets in a NAPI batch and unlike the no-op it is compared to, so
  those are the pessimistic figures.

Not used: ``BPF_F_TEST_XDP_LIVE_FRAMES``. In that mode an XDP_PASS frame is
injected into the stack of the given interface inside the timed batch (all our
forwarded packets are XDP_PASS, so the figure would be mostly the kernel's
forwarding), and packet data in recycled pages is not reset between iterations
(only the frame pointers are), so a rewriting program can see its own output.

Cases: established flow (a data packet of a flow in conntrack), SYN (the same
SYN each time, its conntrack entry deleted in between, so each is a full new flow
choice), new flows (a different 5-tuple each time, conntrack growing to ``calls``
entries), pass-through (TCP to an address that is not a VIP).
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
        fraction comes from the wall time of the one call, clamped to [d, d + 1).
        Only for programs that leave the packet alone: verdict XDP_PASS and the output
        equal to the input are checked."""
        t0 = time.perf_counter_ns()
        rc, d = self.run(fd, pkt, repeat)
        wall = (time.perf_counter_ns() - t0) / repeat
        if rc != XDP_PASS or self.output() != pkt:
            raise BenchError(f"amortised run: verdict {rc}, output "
                             f"{'unchanged' if self.output() == pkt else 'changed'}")
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


# ------------------------------------------------- restore-and-check wrapper

#: XDP wrapper for the rewriting cases at repeat=N: every iteration it checks the
#: packet the previous iteration left (masked compare with the expected output,
#: mismatches counted), restores the original bytes (and adjust_head back), in
#: "newflow" mode gives it the next 5-tuple (checksums recomputed), in "syn" mode
#: deletes the tuple's conntrack entry, then tail-calls the measured program.
WRAP_SRC = """
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include "edgeproxy_consts.h"
#include "edgeproxy_structs.h"
struct ref { u8 in[IN_PAD]; u8 out[OUT_PAD]; u8 mask[OUT_PAD]; struct ct_key key; };
BPF_ARRAY(refs, struct ref, 1);
BPF_ARRAY(st, u64, 2);          /* 0: iterations, 1: mismatched outputs */
BPF_PROG_ARRAY(jmp, 1);
#if MODE_SYN
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, conntrack, MAX_FLOWS, CT_PIN);
#endif

static __always_inline u16 fold(u64 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

int wrap(struct xdp_md *ctx)
{
    u32 z = 0, one = 1;
    struct ref *r = refs.lookup(&z);
    u64 *it = st.lookup(&z), *bad = st.lookup(&one);
    if (!r || !it || !bad)
        return XDP_ABORTED;
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    long len = end - data;
    if (*it) {
        u64 diff = len != OUT_LEN;
        if (!diff && data + OUT_LEN <= end) {
            #pragma unroll
            for (int i = 0; i + 8 <= OUT_LEN; i += 8)
                diff |= (*(u64 *)(data + i) ^ *(u64 *)(r->out + i)) & *(u64 *)(r->mask + i);
            #pragma unroll
            for (int i = OUT_LEN / 8 * 8; i < OUT_LEN; i++)
                diff |= (((u8 *)data)[i] ^ r->out[i]) & r->mask[i];
        } else {
            diff = 1;
        }
        if (diff)
            *bad += 1;
    }
    /* unconditional, so the wrapper around the no-op (offset 0) makes the same
     * helper call as the one around the edge program (offset +28): the helper's
     * work does not depend on the offset, and it is not the measured program's */
    if (bpf_xdp_adjust_head(ctx, (int)(len - IN_LEN)))
        return XDP_ABORTED;
    data = (void *)(long)ctx->data;
    end = (void *)(long)ctx->data_end;
    if (data + IN_LEN > end || IN_LEN < 54)
        return XDP_ABORTED;
    __builtin_memcpy(data, r->in, IN_LEN);
#if MODE_NEWFLOW
    {
        u64 i = *it;
        struct iphdr *ip = data + 14;
        struct tcphdr *tcp = data + 34;
        ((u8 *)&ip->saddr)[3] = 128 + (i % 128);
        tcp->source = bpf_htons(1024 + (i / 128));
        ip->check = 0;
        u64 sum = 0;
        #pragma unroll
        for (int k = 0; k < 10; k++)
            sum += ((u16 *)ip)[k];
        ip->check = fold(sum);
        tcp->check = 0;
        sum = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) +
              (ip->daddr >> 16) + bpf_htons(IPPROTO_TCP) + bpf_htons(20);
        #pragma unroll
        for (int k = 0; k < 10; k++)
            sum += ((u16 *)tcp)[k];
        tcp->check = fold(sum);
    }
#endif
#if MODE_SYN
    conntrack.delete(&r->key);
#endif
    *it += 1;
    jmp.call(ctx, 0);
    return XDP_ABORTED;
}
"""


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


class Wrapped:
    """One wrapper program around one target, for one case."""

    def __init__(self, target_fd: int, pkt: bytes, out: bytes, mask: bytes, mode: str,
                 dp: Any, key: Any = None) -> None:
        from bcc import BPF

        from edgeproxy import bpfmaps as bm
        from edgeproxy.dataplane import BPF_DIR

        c = dp.config
        self.pkt = pkt
        self.out = out
        self.mask = mask
        self.bpf = BPF(text=WRAP_SRC.encode(), cflags=[
            f"-I{BPF_DIR}", f"-DIN_LEN={len(pkt)}", f"-DIN_PAD={_pad8(len(pkt))}",
            f"-DOUT_LEN={len(out)}", f"-DOUT_PAD={_pad8(len(out))}",
            f"-DMODE_NEWFLOW={int(mode == 'newflow')}", f"-DMODE_SYN={int(mode == 'syn')}",
            f"-DMAX_FLOWS={c.max_flows}", f'-DCT_PIN="{c.pin_dir / "conntrack"}"',
            "-Wno-unused-function"])
        ref = self.bpf[b"refs"].Leaf()
        raw = (pkt.ljust(_pad8(len(pkt)), b"\0") + out.ljust(_pad8(len(out)), b"\0")
               + mask.ljust(_pad8(len(out)), b"\0") + (bytes(key) if key is not None
                                                          else bytes(ct.sizeof(bm.CtKey))))
        if len(raw) > ct.sizeof(ref):  # the C struct ref and this packing must agree
            raise BenchError(f"wrapper reference: {len(raw)} bytes > {ct.sizeof(ref)}")
        ct.memmove(ct.addressof(ref), raw, len(raw))
        self.bpf[b"refs"][ct.c_int(0)] = ref
        self.bpf[b"jmp"][ct.c_int(0)] = ct.c_int(target_fd)
        self.fd = self.bpf.load_func(b"wrap", self.bpf.XDP).fd

    def run(self, tr: TestRunner, repeat: int) -> int:
        """Kernel ns per iteration (whole ns); raises unless every iteration's output
        matched and the last verdict is XDP_PASS with the expected bytes."""
        st = self.bpf[b"st"]
        st[ct.c_int(0)] = ct.c_ulonglong(0)
        st[ct.c_int(1)] = ct.c_ulonglong(0)
        rc, d = tr.run(self.fd, self.pkt, repeat)
        out = tr.output()
        iters, bad = st[ct.c_int(0)].value, st[ct.c_int(1)].value
        masked_ok = len(out) == len(self.out) and all(
            (a ^ b) & m == 0 for a, b, m in zip(out, self.out, self.mask, strict=True))
        if rc != XDP_PASS or not masked_ok or iters != repeat or bad:
            raise BenchError(f"wrapped run: verdict {rc}, {iters} iterations, "
                             f"{bad} wrong outputs")
        return d

    def close(self) -> None:
        self.bpf.cleanup()


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


def _mask(n: int, holes: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Compare mask of n bytes: 0xff, except the [a, b) ranges that may differ."""
    m = bytearray(b"\xff" * n)
    for a, b in holes:
        m[a:b] = bytes(b - a)
    return bytes(m)


#: bytes that differ between new flows: in the SYN given (IP checksum, source
#: address, source port, TCP checksum) and in its forward (inner IP checksum,
#: source, destination = the chosen machine, source port, TCP checksum)
NEWFLOW_IN_HOLES = ((24, 26), (26, 30), (34, 36), (50, 52))
NEWFLOW_OUT_HOLES = ((52, 54), (54, 58), (58, 62), (62, 64), (78, 80))


def _audit(dp: Any, before: dict[str, int], repeat: int, what: str, opened: int) -> None:
    """Every iteration of a wrapped run must have been forwarded, with no anomaly
    (so none took the resteer or a refusal path that happens to give the same bytes),
    and have opened ``opened`` flows in all (SYN, new flows: one each, so none stuck
    to an existing entry; established: none)."""
    after = _verdicts(dp)
    delta = {k: after[k] - before[k] for k in after}
    want = {k: 0 for k in delta} | {"forwarded": repeat, "opened": opened}
    if delta != want:
        raise BenchError(f"{what}: {delta} after {repeat} iterations, expected {want}")


def _verdicts(dp: Any) -> dict[str, int]:
    from edgeproxy import bpfmaps as bm

    out = {}
    for i in (bm.EDGE_STATS.index(n) for n in ("forwarded", "passed", "rst_sent", "dropped")):
        out[bm.EDGE_STATS[i]] = sum(int(v.value) for v in
                                    dp.maps["edge_stats"].lookup_percpu(bm.U32(i)))
    out["anomalies"] = sum(sum(int(v.value) for v in dp.maps["anomalies"].lookup_percpu(
        bm.U32(i))) for i in range(len(bm.ANOMALIES)))
    out["opened"] = sum(sum(int(v.opened) for v in dp.maps["machine_stats"].lookup_percpu(
        bm.U32(i))) for i in range(dp.config.max_machines))
    return out


def measure(result: Result, runs: int, calls: int) -> None:
    from edgeproxy import bpfmaps as bm

    if os.geteuid() != 0:
        raise BenchError("xdp needs root (loads BPF programs)")
    noop_obj, noop_fd = _load_noop()
    dp = _edge_dataplane(max_flows=max(1 << 17, calls * 2))
    tr = TestRunner()
    wrapped: dict[str, tuple[Wrapped, Wrapped]] = {}
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

        def open_est() -> None:
            rc, _ = tr.run(fd, est_syn)
            if rc != XDP_PASS:
                raise BenchError(f"SYN that opens the established flow: verdict {rc}")

        def expected(pkt: bytes) -> bytes:
            """The forward of pkt, from one repeat=1 run (checked like every call)."""
            rc, _ = tr.run(fd, pkt)
            if not forwarded(pkt, rc, tr.output()):
                raise BenchError(f"probe: verdict {rc}")
            return tr.output()

        # the expected outputs, then a clean table (the probes' flows are forgotten)
        open_est()
        est_out = expected(est)
        syn_out = expected(syn)
        flow_out = expected(flows[0])
        _clear_flows(dp)
        for name, pkt, out, in_holes, out_holes, mode, key in (
                ("established", est, est_out, (), (), "restore", None),
                ("syn", syn, syn_out, (), (), "syn", syn_key),
                ("new-flows", flows[0], flow_out, NEWFLOW_IN_HOLES, NEWFLOW_OUT_HOLES,
                 "newflow", None)):
            wrapped[name] = (
                Wrapped(fd, pkt, out, _mask(len(out), out_holes), mode, dp, key),
                Wrapped(noop_fd, pkt, pkt, _mask(len(pkt), in_holes), mode, dp, key))

        def wrapped_cost(name: str, noop_am: float) -> float:
            """W(edge) - W(no-op) + no-op: the wrapper's own work cancels."""
            edge_w, noop_w = wrapped[name]
            before = _verdicts(dp)
            d_edge = edge_w.run(tr, calls)
            _audit(dp, before, calls, name, 0 if name == "established" else calls)
            return d_edge - noop_w.run(tr, calls) + noop_am

        series: dict[str, list[float]] = {k: [] for k in (
            "noop", "noop-amortised", "timer", "pass-through", "pass-through-repeat1",
            "established", "established-repeat1", "syn", "syn-repeat1",
            "new-flows", "new-flows-repeat1")}
        for _ in range(runs):
            _clear_flows(dp)
            noop_r1 = _loop(tr, noop_fd, [passing], calls, passed)
            noop_am = tr.amortised(noop_fd, passing, AMORTISED_REPEAT)
            timer = noop_r1 - noop_am
            series["timer"].append(timer)
            series["noop"].append(noop_am)
            series["noop-amortised"].append(noop_am)
            series["pass-through-repeat1"].append(
                _loop(tr, fd, [passing], calls, passed) - timer)
            series["pass-through"].append(tr.amortised(fd, passing, AMORTISED_REPEAT))
            open_est()
            series["established-repeat1"].append(
                _loop(tr, fd, [est], calls, forwarded) - timer)
            series["established"].append(wrapped_cost("established", noop_am))
            series["syn-repeat1"].append(
                _loop(tr, fd, [syn], calls, forwarded, forget_syn) - timer)
            series["syn"].append(wrapped_cost("syn", noop_am))
            for name in ("new-flows-repeat1", "new-flows"):
                _clear_flows(dp)
                series[name].append(
                    _loop(tr, fd, flows, calls, forwarded) - timer if name.endswith("1")
                    else wrapped_cost(name, noop_am))
                opened = len(list(dp.maps["conntrack"].keys()))
                if opened < calls:
                    raise BenchError(f"{name}: {opened} conntrack entries after {calls} SYNs")
        _clear_flows(dp)
    finally:
        for pair in wrapped.values():
            for w in pair:
                w.close()
        dp.unload()
        del noop_obj

    notes = {
        "noop": "no-op XDP program (returns XDP_PASS), repeat=1,000,000 kernel-amortised",
        "pass-through": "TCP to a non-VIP address: verdict XDP_PASS, packet untouched; "
                        "repeat=1,000,000 kernel-amortised like the no-op (it does not "
                        "rewrite), output checked equal to the input",
        "pass-through-repeat1": "same packet, repeat=1 calls with the timer subtracted "
                                "(secondary: cold-cache figure)",
        "established": "64-byte data segment of a flow in conntrack; forwarded (IPIP +28 B); "
                       f"repeat={calls:,}, restored and checked each iteration by the "
                       "wrapper, wrapper cost (around a no-op) subtracted",
        "established-repeat1": "same packet, repeat=1 calls with the timer subtracted",
        "syn": "the same SYN each iteration, its conntrack entry deleted by the wrapper "
               "first (the delete is charged to the SYN: ~20 ns more than the no-op "
               "side's delete of a missing key)",
        "syn-repeat1": "same SYN, repeat=1 calls, its entry deleted from userspace between",
        "new-flows": f"{calls:,} distinct SYNs (the wrapper writes the next 5-tuple each "
                     f"iteration), conntrack grows to {calls:,}",
        "new-flows-repeat1": f"the same {calls:,} SYNs as repeat=1 calls",
        "timer": "ktime overhead per repeat=1 call, subtracted from every repeat=1 case",
    }
    for name, values in series.items():
        if name == "noop-amortised":
            continue
        result.rows.append(Row(name, "cost", "ns/packet", values, better="lower",
                               notes=notes.get(name, "")).finish())
    for name, bound in TARGETS.items():
        relate(result.rows, name, "noop", "cost", ("<=", bound))
    for name in ("pass-through-repeat1", "established-repeat1", "syn-repeat1",
                 "new-flows-repeat1"):
        relate(result.rows, name, "noop", "cost")
    result.notes += [
        f"Rewriting cases (established, SYN, new flows): repeat={calls:,} in one call "
        "through a wrapper program that, every iteration, compares the packet the "
        "previous iteration left with the expected forward (mismatches counted, must be "
        "0), restores the original bytes (adjust_head back, called with offset 0 around "
        "the no-op so the helper call cancels; SYN: conntrack entry deleted, new flows: "
        "next 5-tuple written) and tail-calls the edge program; the same "
        "wrapper around the no-op is measured and subtracted. The edge program's own "
        "counters must show every iteration forwarded, no anomaly, and one flow opened "
        "per iteration for SYN and new flows (none for established).",
        f"The *-repeat1 rows: {calls:,} repeat=1 calls per run, kernel-measured duration "
        "summed, minus the timer overhead measured in the same run; verdict and output "
        "checked on every call. Each call starts with caches the syscall path has "
        "cooled, so they are the pessimistic (cold) figures.",
        "Pass-through leaves the packet alone, so it is measured like the no-op "
        "(repeat=1,000,000, kernel-amortised; verdict and unchanged output checked).",
        "Ratios are medians over runs of (case ns / no-op ns at repeat=1,000,000).",
    ]
