"""Fixture harness for the BPF programs: load through dataplane.py, run packets
through BPF_PROG_TEST_RUN, build expected packets with scapy the same way.

Not a product module: it also knows how to wipe an instance's state between
tests (cheaper than compiling again for every test).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Ether, IPOption, raw  # type: ignore[import-untyped]

from edgeproxy import bpfmaps as bm
from edgeproxy.dataplane import Dataplane, DataplaneConfig
from edgeproxy.routing import Backend, ServiceTable

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7

PIN_ROOT = Path("/sys/fs/bpf/edgeproxy")
_counter = itertools.count()

# test addresses: 198.18.200.0/24 hosts, 198.19.200.x VIPs (clear of the lab)
CLIENT = "198.18.200.100"
EDGE = "198.18.200.1"
WORKER_A = "198.18.200.21"
WORKER_B = "198.18.200.22"
VIP = "198.19.200.1"
CLIENT_MAC = "02:00:00:00:00:01"
EDGE_MAC = "02:00:00:00:00:02"
WORKER_MAC = "02:00:00:00:00:03"


def need_root_kernel() -> None:
    """Skip (with the reason) unless this process can load BPF programs."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF programs into the kernel")
    if not Path("/sys/fs/bpf").is_dir():
        pytest.skip("bpffs is not mounted at /sys/fs/bpf")
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("bcc (python3-bpfcc) is not importable")


def unique_instance(tag: str) -> str:
    return f"test-{os.getpid()}-{tag}-{next(_counter)}"


def small_config(role: str, tag: str, **kw: object) -> DataplaneConfig:
    host = kw.pop("host_address", IPv4Address(EDGE if role == "edge" else WORKER_A))
    return DataplaneConfig(
        instance=unique_instance(tag),
        role=role,
        host_address=host,  # type: ignore[arg-type]
        max_services=64,
        max_machines=64,
        max_flows=1024,
        max_maglev_slots=8192,
        max_backend_entries=1024,
        **kw,
    )  # type: ignore[arg-type]


def loaded(config: DataplaneConfig) -> Iterator[Dataplane]:
    """Compile + load (no interfaces); always remove the pins afterwards."""
    dp = Dataplane(config)
    try:
        dp.load()
        yield dp
    finally:
        dp.unload()
        assert not config.pin_dir.exists()


def reset(dp: Dataplane) -> None:
    """Wipe flows, routing and counters of a loaded edge instance."""
    for key in list(dp.maps["conntrack"].keys()):
        dp.maps["conntrack"].delete(key)
    for mid in range(dp.config.max_machines):
        dp.maps["machine_active"].update(bm.U32(mid), bm.U64(0))
    dp.sync([])
    for name, count in (
        ("machine_stats", dp.config.max_machines),
        ("service_stats", dp.config.max_services),
        ("edge_stats", len(bm.EDGE_STATS)),
        ("anomalies", len(bm.ANOMALIES)),
        ("flood", 1),
    ):
        m = dp.maps[name]
        for i in range(count):
            m.update(bm.U32(i), m.value_type())


#: the TC entry sharing each XDP entry's core
TC_ENTRY = {"edge_xdp": "edge_tc", "worker_ingress": "worker_ingress_tc"}
#: TC verdict -> the XDP verdict that means the same (TX = redirect out the ingress dev)
TC_AS_XDP = {TC_ACT_OK: XDP_PASS, TC_ACT_SHOT: XDP_DROP, TC_ACT_REDIRECT: XDP_TX}
ATTACH_MODES = ("xdp", "tc")


def run(dp: Dataplane, prog: str, pkt: bytes) -> tuple[int, bytes]:
    """Run ``prog`` on ``pkt``. An XDP entry runs as its TC twin when the instance's
    config says ``attach="tc"``; the TC verdict is then reported as the XDP verdict
    with the same meaning (unknown ones as -1000 - rc), so one expectation covers both."""
    if dp.config.attach == "tc" and prog in TC_ENTRY:
        rc, out, _ = bm.prog_test_run(dp.progs[TC_ENTRY[prog]], pkt)
        return TC_AS_XDP.get(rc, -1000 - rc), out
    rc, out, _ = bm.prog_test_run(dp.progs[prog], pkt)
    return rc, out


# ---------------------------------------------------------------- routing


def backend(
    name: str,
    addr: str,
    worker: str = WORKER_A,
    port: int = 7000,
    region: str = "ord",
    app: str = "echo",
) -> Backend:
    return Backend(name, app, region, IPv4Address(addr), port, IPv4Address(worker))


def table(
    *tiers: tuple[Backend, ...],
    hard_limit: int = 100,
    ports: tuple[int, ...] = (7,),
    vip: str = VIP,
    service: str = "echo-tcp",
    handlers: tuple[str, ...] = (),
) -> ServiceTable:
    return ServiceTable(
        service,
        "echo",
        (IPv4Address(vip),),
        ports,
        handlers,
        "connections",
        hard_limit // 2,
        hard_limit,
        tuple(tiers),
    )


# ---------------------------------------------------------------- packets


def client_pkt(
    flags: str = "S",
    sport: int = 40000,
    dport: int = 7,
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
    dst: str = VIP,
    src: str = CLIENT,
) -> bytes:
    return raw(
        Ether(src=CLIENT_MAC, dst=EDGE_MAC)
        / IP(src=src, dst=dst, id=7, flags="DF", ttl=63)
        / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=8192)
        / payload
    )


def expected_forward(
    pkt: bytes, machine: str, mport: int, worker: str = WORKER_A, edge: str = EDGE
) -> bytes:
    """What the edge must emit for client packet ``pkt`` steered to machine:mport."""
    e = Ether(pkt)
    inner = e[IP]
    vip, vport = inner.dst, inner[TCP].dport
    inner.dst = machine
    inner[TCP].dport = mport
    del inner.chksum
    del inner[TCP].chksum
    inner = IP(raw(inner))
    opt = IPOption(
        bytes([bm.EP_IPOPT_TYPE, bm.EP_IPOPT_LEN])
        + vport.to_bytes(2, "big")
        + IPv4Address(vip).packed
    )
    outer = IP(
        src=edge,
        dst=worker,
        id=0,
        ttl=64,
        proto=4,
        tos=inner.tos,
        flags=inner.flags & 2,
        options=[opt],
    )
    return raw(Ether(src=e.src, dst=e.dst) / outer / inner)


def reply_pkt(
    flags: str = "SA",
    sport: int = 7,
    dport: int = 40000,
    seq: int = 5000,
    ack: int = 1001,
    payload: bytes = b"",
    worker: str = WORKER_A,
    edge: str = EDGE,
) -> bytes:
    """A worker's encapsulated, reverse-NATed reply as it reaches the edge."""
    return raw(
        Ether(src=WORKER_MAC, dst=EDGE_MAC)
        / IP(src=worker, dst=edge, id=0, ttl=64, proto=4)
        / IP(src=VIP, dst=CLIENT, id=9, ttl=64)
        / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=8192)
        / payload
    )


def decapped(pkt: bytes, outer_len: int = 20) -> bytes:
    return pkt[:14] + pkt[14 + outer_len :]
