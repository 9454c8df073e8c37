"""Fixtures for bpf/worker.bpf.c: decap + remember on ingress, reverse NAT + encap on egress."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from scapy.all import IP, TCP, Ether, IPOption, raw  # type: ignore[import-untyped]

from bpf_harness import (
    ATTACH_MODES,
    CLIENT,
    EDGE,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    VIP,
    WORKER_A,
    XDP_PASS,
    decapped,
    loaded,
    need_root_kernel,
    run,
    small_config,
)
from edgeproxy import bpfmaps as bm
from edgeproxy.dataplane import Dataplane

pytestmark = [pytest.mark.root, pytest.mark.kernel]

EDGE_LINK_MAC = "02:00:00:00:00:0e"
WORKER_LINK_MAC = "02:00:00:00:00:0f"
MACHINE = "198.18.201.1"


@pytest.fixture(params=ATTACH_MODES)
def dp(request: pytest.FixtureRequest) -> Iterator[Dataplane]:
    """A worker instance; "worker_ingress" runs as worker_ingress_tc in the "tc" case."""
    need_root_kernel()
    yield from loaded(small_config("worker", "worker", attach=request.param))


def from_edge(
    flags: str = "S", opt: bytes | None = None, dst: str = WORKER_A, payload: bytes = b""
) -> bytes:
    if opt is None:
        opt = (
            bytes([bm.EP_IPOPT_TYPE, bm.EP_IPOPT_LEN])
            + (7).to_bytes(2, "big")
            + IPv4Address(VIP).packed
        )
    return raw(
        Ether(src=EDGE_LINK_MAC, dst=WORKER_LINK_MAC)
        / IP(src=EDGE, dst=dst, id=0, ttl=63, flags="DF", proto=4, options=[IPOption(opt)])
        / IP(src=CLIENT, dst=MACHINE, id=7, ttl=63, flags="DF")
        / TCP(sport=40000, dport=7000, flags=flags, seq=1000, window=8192)
        / payload
    )


def from_machine(flags: str = "SA", sport: int = 7000, payload: bytes = b"") -> bytes:
    # what the machine's stack hands to the worker's edge-facing interface
    return raw(
        Ether(src=WORKER_LINK_MAC, dst="02:00:00:00:00:aa")
        / IP(src=MACHINE, dst=CLIENT, id=3, ttl=64, flags="DF")
        / TCP(sport=sport, dport=40000, flags=flags, seq=5000, ack=1001, window=8192)
        / payload
    )


def test_ingress_decapsulates_and_remembers(dp: Dataplane) -> None:
    pkt = from_edge(payload=b"hi")
    rc, out = run(dp, "worker_ingress", pkt)
    assert (rc, out) == (XDP_PASS, decapped(pkt, 28))
    ((key, val),) = dp.maps["worker_flows"].items()
    assert (
        bm.from_be32(key.machine_addr),
        bm.from_be16(key.machine_port),
        bm.from_be32(key.client_addr),
        bm.from_be16(key.client_port),
    ) == (IPv4Address(MACHINE), 7000, IPv4Address(CLIENT), 40000)
    assert (bm.from_be32(val.vip), bm.from_be16(val.vport), bm.from_be32(val.edge)) == (
        IPv4Address(VIP),
        7,
        IPv4Address(EDGE),
    )
    assert bytes(val.edge_mac) == bytes.fromhex(EDGE_LINK_MAC.replace(":", ""))
    assert bytes(val.local_mac) == bytes.fromhex(WORKER_LINK_MAC.replace(":", ""))
    assert val.ifindex == 1  # test runs arrive on the namespace's loopback
    assert dp.read_counters().stats["decap"] == 1


@pytest.mark.parametrize("case", ["other_host", "no_option", "bad_option"])
def test_ingress_leaves_other_ipip_alone(dp: Dataplane, case: str) -> None:
    if case == "other_host":
        pkt = from_edge(dst="198.18.200.99")
    elif case == "no_option":
        pkt = raw(
            Ether() / IP(src=EDGE, dst=WORKER_A, proto=4) / IP(src=CLIENT, dst=MACHINE) / TCP()
        )
    else:
        pkt = from_edge(opt=b"\x9f\x08" + b"\0" * 6)
    assert run(dp, "worker_ingress", pkt) == (XDP_PASS, pkt)
    assert list(dp.maps["worker_flows"].keys()) == []
    stats = dp.read_counters().stats
    assert stats["bad_ipip"] == (0 if case == "other_host" else 1)


def test_egress_reverse_nats_and_encapsulates(dp: Dataplane) -> None:
    run(dp, "worker_ingress", from_edge())
    pkt = from_machine(payload=b"echo-1 ord\n")
    rc, out = run(dp, "worker_egress", pkt)
    assert rc == TC_ACT_REDIRECT
    inner = Ether(pkt)[IP]
    inner.src = VIP
    inner[TCP].sport = 7
    del inner.chksum
    del inner[TCP].chksum
    want = raw(
        Ether(src=WORKER_LINK_MAC, dst=EDGE_LINK_MAC)
        / IP(src=WORKER_A, dst=EDGE, id=0, ttl=64, flags="DF", proto=4)
        / IP(raw(inner))
    )
    assert out == want
    assert dp.read_counters().stats["replies"] == 1


def test_egress_leaves_unknown_flows_alone(dp: Dataplane) -> None:
    run(dp, "worker_ingress", from_edge())
    for pkt in (
        from_machine(sport=7001),
        raw(Ether() / IP(src=MACHINE, dst="198.18.200.55") / TCP(sport=7000, dport=1)),
    ):
        assert run(dp, "worker_egress", pkt) == (TC_ACT_OK, pkt)


def flow_flags(dp: Dataplane) -> int | None:
    rows = list(dp.maps["worker_flows"].items())
    return int(rows[0][1].flags) if rows else None


@pytest.mark.parametrize("first", ["client", "machine"])
def test_closed_flow_stops_rewriting_a_direct_connection(dp: Dataplane, first: str) -> None:
    """The bug: an entry outliving its connection re-NATed a later routed connection
    on the same tuple. After FINs both ways only the close's tail is rewritten; the
    next SYN-ACK on the tuple (not through us) is left alone and the entry forgotten."""
    run(dp, "worker_ingress", from_edge("S"))
    assert run(dp, "worker_egress", from_machine("SA"))[0] == TC_ACT_REDIRECT
    if first == "client":
        run(dp, "worker_ingress", from_edge("FA"))
        assert flow_flags(dp) == bm.WF_FIN_IN
        assert run(dp, "worker_egress", from_machine("FA"))[0] == TC_ACT_REDIRECT
    else:
        assert run(dp, "worker_egress", from_machine("FA"))[0] == TC_ACT_REDIRECT
        assert flow_flags(dp) == bm.WF_FIN_OUT
        run(dp, "worker_ingress", from_edge("FA"))
    assert flow_flags(dp) == bm.WF_FIN_IN | bm.WF_FIN_OUT
    # the tail: the last ACKs still go back through the edge, the entry stays closed
    run(dp, "worker_ingress", from_edge("A"))
    assert run(dp, "worker_egress", from_machine("A"))[0] == TC_ACT_REDIRECT
    assert flow_flags(dp) == bm.WF_FIN_IN | bm.WF_FIN_OUT
    # a direct connection reusing the tuple: untouched, and the entry is gone
    direct = from_machine("SA", payload=b"")
    assert run(dp, "worker_egress", direct) == (TC_ACT_OK, direct)
    assert list(dp.maps["worker_flows"].keys()) == []
    data = from_machine("PA", payload=b"direct\n")
    assert run(dp, "worker_egress", data) == (TC_ACT_OK, data)


@pytest.mark.parametrize("side", ["client", "machine"])
def test_rst_closes_the_flow(dp: Dataplane, side: str) -> None:
    run(dp, "worker_ingress", from_edge("S"))
    if side == "client":
        run(dp, "worker_ingress", from_edge("R"))
    else:
        assert run(dp, "worker_egress", from_machine("R"))[0] == TC_ACT_REDIRECT
    assert flow_flags(dp) == bm.WF_RST
    direct = from_machine("SA")
    assert run(dp, "worker_egress", direct) == (TC_ACT_OK, direct)
    assert list(dp.maps["worker_flows"].keys()) == []
    # a stray RST for an unknown flow creates nothing
    run(dp, "worker_ingress", from_edge("R"))
    assert list(dp.maps["worker_flows"].keys()) == []


def test_new_syn_through_the_edge_revives_a_closed_tuple(dp: Dataplane) -> None:
    run(dp, "worker_ingress", from_edge("S"))
    run(dp, "worker_ingress", from_edge("R"))
    assert flow_flags(dp) == bm.WF_RST
    run(dp, "worker_ingress", from_edge("A"))  # the tail does not revive it
    assert flow_flags(dp) == bm.WF_RST
    run(dp, "worker_ingress", from_edge("S"))
    assert flow_flags(dp) == 0
    assert run(dp, "worker_egress", from_machine("SA"))[0] == TC_ACT_REDIRECT
