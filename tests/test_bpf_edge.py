"""Fixtures for bpf/edge.bpf.c: packet in -> verdict, exact bytes out, map changes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, raw  # type: ignore[import-untyped]

from bpf_harness import (
    ATTACH_MODES,
    CLIENT,
    CLIENT_MAC,
    EDGE,
    EDGE_MAC,
    VIP,
    WORKER_A,
    WORKER_B,
    XDP_DROP,
    XDP_PASS,
    XDP_TX,
    backend,
    client_pkt,
    decapped,
    expected_forward,
    loaded,
    need_root_kernel,
    reply_pkt,
    reset,
    run,
    small_config,
    table,
)
from edgeproxy import bpfmaps as bm
from edgeproxy import maglev
from edgeproxy.dataplane import Dataplane

pytestmark = [pytest.mark.root, pytest.mark.kernel]

M1 = backend("echo-1", "198.18.201.1")
M2 = backend("echo-2", "198.18.201.2")
M3 = backend("echo-3", "198.18.201.3", worker=WORKER_B)


@pytest.fixture(scope="module")
def edge_loaded() -> Iterator[Dataplane]:
    need_root_kernel()
    yield from loaded(small_config("edge", "edge"))


@pytest.fixture(params=ATTACH_MODES)
def dp(edge_loaded: Dataplane, request: pytest.FixtureRequest) -> Dataplane:
    """The loaded edge, wiped; ``run(dp, "edge_xdp", ...)`` runs edge_xdp or, in the
    "tc" case, edge_tc (the same core on an skb) with the same expectations."""
    reset(edge_loaded)
    edge_loaded.config = dataclasses.replace(
        edge_loaded.config,
        refuse_with_rst=True,
        resteer_without_conntrack=True,
        flood_cap=0,
        attach=request.param,
    )
    edge_loaded._write_config()
    return edge_loaded


def set_config(dp: Dataplane, **kw: object) -> None:
    dp.config = dataclasses.replace(dp.config, **kw)  # type: ignore[arg-type]
    dp._write_config()


def ct_of(dp: Dataplane, sport: int = 40000, dport: int = 7) -> bm.CtValue | None:
    key = bm.CtKey(
        bm.be32(IPv4Address(CLIENT)), bm.be32(IPv4Address(VIP)), bm.be16(sport), bm.be16(dport), 6
    )
    return dp.maps["conntrack"].lookup(key)


def machine(dp: Dataplane, name: str) -> bm.BpfMap:
    c = dp.read_counters().machine(name)
    assert c is not None, name
    return c  # type: ignore[return-value]


def test_pass_through_untouched(dp: Dataplane) -> None:
    dp.sync([table((M1,)), table((M2,), ports=(80,), service="web", handlers=("http",))])
    cases = [
        raw(Ether(src=CLIENT_MAC, dst=EDGE_MAC, type=0x0806) / (b"\0" * 28)),  # ARP
        raw(Ether(src=CLIENT_MAC, dst=EDGE_MAC) / IP(src=CLIENT, dst="198.18.200.9") / ICMP()),
        client_pkt(dst="198.19.200.77"),  # not a VIP
        client_pkt(dport=8),  # VIP, unknown port
        client_pkt(dport=80),  # HTTP service: slow path
        raw(Ether(src=CLIENT_MAC, dst=EDGE_MAC, type=0x86DD) / (b"\0" * 40)),  # IPv6
    ]
    for pkt in cases:
        rc, out = run(dp, "edge_xdp", pkt)
        assert (rc, out) == (XDP_PASS, pkt)
    c = dp.read_counters()
    assert c.stats["passed"] == len(cases) and c.stats["forwarded"] == 0
    assert sum(c.anomalies.values()) == 0
    assert list(dp.maps["conntrack"].keys()) == []


def test_syn_is_dnated_and_encapsulated(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    pkt = client_pkt("S")
    rc, out = run(dp, "edge_xdp", pkt)
    assert rc == XDP_PASS
    assert out == expected_forward(pkt, "198.18.201.1", 7000)
    ct = ct_of(dp)
    assert ct is not None and ct.flags & bm.CT_FLAG_BITS == 0
    c = machine(dp, "echo-1")
    assert (c.opened, c.active, c.packets_in, c.bytes_in) == (1, 1, 1, 0)
    assert dp.read_counters().stats["forwarded"] == 1


def test_established_flow_counts_payload_and_sticks(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    run(dp, "edge_xdp", client_pkt("S"))
    # a new table with a different machine must not move the flow
    dp.sync([table((M2,))])
    pkt = client_pkt("PA", seq=1001, ack=5001, payload=b"hello world")
    rc, out = run(dp, "edge_xdp", pkt)
    assert rc == XDP_PASS
    assert out == expected_forward(pkt, "198.18.201.1", 7000)
    c = machine(dp, "echo-1")
    assert (c.opened, c.active, c.packets_in, c.bytes_in) == (1, 1, 2, 11)
    # while a new flow follows the new table
    pkt2 = client_pkt("S", sport=40001)
    assert run(dp, "edge_xdp", pkt2)[1] == expected_forward(pkt2, "198.18.201.2", 7000)


def test_maglev_choice_matches_the_mirror(dp: Dataplane) -> None:
    dp.sync([table((M1, M2, M3))])
    names = [f"{m.machine_id}:{m.port}" for m in (M1, M2, M3)]
    size = maglev.table_size(3)
    tbl = maglev.build(names, size)
    chosen = set()
    for sport in range(41000, 41040):
        h = bm.flow_hash(
            bm.be32(IPv4Address(CLIENT)), bm.be32(IPv4Address(VIP)), bm.be16(sport), bm.be16(7)
        )
        want = (M1, M2, M3)[tbl[h % size]]
        pkt = client_pkt("S", sport=sport)
        rc, out = run(dp, "edge_xdp", pkt)
        assert rc == XDP_PASS
        assert out == expected_forward(pkt, str(want.address), 7000, str(want.worker_address))
        chosen.add(want.machine_id)
    assert chosen == {"echo-1", "echo-2", "echo-3"}
    assert sum(m.opened for m in dp.read_counters().machines) == 40


def test_return_path_decapsulates_and_counts(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    run(dp, "edge_xdp", client_pkt("S"))
    pkt = reply_pkt("SA", payload=b"greeting\n")
    rc, out = run(dp, "edge_xdp", pkt)
    assert (rc, out) == (XDP_PASS, decapped(pkt))
    c = machine(dp, "echo-1")
    assert (c.packets_out, c.bytes_out) == (1, 9)
    assert dp.read_counters().stats["returned"] == 1


def test_return_without_conntrack_is_forwarded_and_counted(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    pkt = reply_pkt("A", dport=45555)
    assert run(dp, "edge_xdp", pkt) == (XDP_PASS, decapped(pkt))
    assert dp.read_counters().anomalies["return_no_ct"] == 1


def test_ipip_not_for_a_vip_passes_untouched(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    pkt = raw(
        Ether(src=CLIENT_MAC, dst=EDGE_MAC)
        / IP(src=WORKER_A, dst=EDGE, proto=4)
        / IP(src="198.18.201.1", dst=CLIENT)
        / TCP(sport=7000, dport=40000)
    )
    assert run(dp, "edge_xdp", pkt) == (XDP_PASS, pkt)
    assert dp.read_counters().anomalies["bad_ipip"] == 1


def open_flow(dp: Dataplane, sport: int = 40000) -> None:
    assert run(dp, "edge_xdp", client_pkt("S", sport=sport))[0] == XDP_PASS


@pytest.mark.parametrize("first", ["in", "out"])
def test_fin_both_ways_closes_once(dp: Dataplane, first: str) -> None:
    dp.sync([table((M1,))])
    open_flow(dp)
    fin_in = client_pkt("FA", seq=1001, ack=5001)
    fin_out = reply_pkt("FA", seq=5001, ack=1002)
    order = [fin_in, fin_out] if first == "in" else [fin_out, fin_in]
    run(dp, "edge_xdp", order[0])
    assert machine(dp, "echo-1").active == 1
    run(dp, "edge_xdp", order[1])
    # retransmitted FINs and the last ACK change nothing
    run(dp, "edge_xdp", fin_in)
    run(dp, "edge_xdp", fin_out)
    run(dp, "edge_xdp", client_pkt("A", seq=1002, ack=5002))
    c = machine(dp, "echo-1")
    assert (c.opened, c.active, c.closed, c.reset) == (1, 0, 1, 0)
    ct = ct_of(dp)
    assert ct is not None and ct.flags & bm.CT_CLOSED


@pytest.mark.parametrize("side", ["client", "machine"])
def test_rst_closes_once(dp: Dataplane, side: str) -> None:
    dp.sync([table((M1,))])
    open_flow(dp)
    rst = client_pkt("R", seq=1001) if side == "client" else reply_pkt("R", seq=5001)
    run(dp, "edge_xdp", rst)
    run(dp, "edge_xdp", rst)
    run(dp, "edge_xdp", client_pkt("FA", seq=1001))
    run(dp, "edge_xdp", reply_pkt("FA", seq=5001))
    c = machine(dp, "echo-1")
    assert (c.opened, c.active, c.closed, c.reset) == (1, 0, 0, 1)


def test_syn_on_closed_tuple_starts_a_new_flow(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    open_flow(dp)
    run(dp, "edge_xdp", client_pkt("R", seq=1001))
    open_flow(dp)
    c = machine(dp, "echo-1")
    assert (c.opened, c.active, c.reset) == (2, 1, 1)
    ct = ct_of(dp)
    assert ct is not None and ct.flags & bm.CT_FLAG_BITS == 0
    # a retransmitted SYN of the open flow is not a new flow
    open_flow(dp)
    assert machine(dp, "echo-1").opened == 2


def expected_rst(pkt: bytes, payload_len: int = 0) -> bytes:
    e = Ether(pkt)
    return raw(
        Ether(src=e.dst, dst=e.src)
        / IP(src=e[IP].dst, dst=e[IP].src, id=0, flags="DF", ttl=64, tos=0)
        / TCP(
            sport=e[TCP].dport,
            dport=e[TCP].sport,
            seq=0,
            ack=e[TCP].seq + 1 + payload_len,
            flags="RA",
            window=0,
        )
    )


def test_hard_limit_refuses_with_rst(dp: Dataplane) -> None:
    dp.sync([table((M1, M2), hard_limit=1)])
    outs = [run(dp, "edge_xdp", client_pkt("S", sport=p)) for p in (42000, 42001)]
    assert all(rc == XDP_PASS for rc, _ in outs)
    assert {machine(dp, n).active for n in ("echo-1", "echo-2")} == {1}
    pkt = client_pkt("S", sport=42002, payload=b"xyz")
    rc, out = run(dp, "edge_xdp", pkt)
    assert (rc, out) == (XDP_TX, expected_rst(pkt, 3))
    svc = dp.read_counters().services[0]
    assert (svc.refused, svc.no_backend, svc.dropped) == (1, 1, 0)
    assert ct_of(dp, 42002) is None
    assert sum(m.active for m in dp.read_counters().machines) == 2
    # drop instead of RST
    set_config(dp, refuse_with_rst=False)
    assert run(dp, "edge_xdp", client_pkt("S", sport=42003))[0] == XDP_DROP
    assert dp.read_counters().services[0].dropped == 1
    # a closed connection frees its slot
    run(dp, "edge_xdp", client_pkt("R", sport=42000, seq=1001))
    assert run(dp, "edge_xdp", client_pkt("S", sport=42004))[0] == XDP_PASS


def test_full_tier_falls_to_next_tier(dp: Dataplane) -> None:
    dp.sync([table((M1,), (M3,), hard_limit=1)])
    p1, p2 = client_pkt("S", sport=43000), client_pkt("S", sport=43001)
    assert run(dp, "edge_xdp", p1)[1] == expected_forward(p1, "198.18.201.1", 7000)
    assert run(dp, "edge_xdp", p2)[1] == expected_forward(p2, "198.18.201.3", 7000, WORKER_B)
    assert machine(dp, "echo-3").opened == 1


def test_no_backends_refuses(dp: Dataplane) -> None:
    dp.sync([table()])
    pkt = client_pkt("S")
    assert run(dp, "edge_xdp", pkt) == (XDP_TX, expected_rst(pkt))


def test_mid_flow_without_conntrack(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    pkt = client_pkt("A", seq=1001, ack=1, payload=b"ab")
    rc, out = run(dp, "edge_xdp", pkt)
    assert (rc, out) == (XDP_PASS, expected_forward(pkt, "198.18.201.1", 7000))
    c = dp.read_counters()
    assert c.services[0].resteered == 1 and c.anomalies["ct_miss"] == 1
    assert c.machine("echo-1").opened == 0  # type: ignore[union-attr]
    assert ct_of(dp) is None
    set_config(dp, resteer_without_conntrack=False)
    assert run(dp, "edge_xdp", pkt)[0] == XDP_DROP


def test_flood_guard_caps_new_flows_per_cpu(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    set_config(dp, flood_cap=2)
    verdicts = [run(dp, "edge_xdp", client_pkt("S", sport=p))[0] for p in range(44000, 44004)]
    assert verdicts == [XDP_PASS, XDP_PASS, XDP_TX, XDP_TX]
    c = dp.read_counters()
    assert c.anomalies["flood"] == 2 and c.services[0].flood == 2
    assert c.machine("echo-1").opened == 2  # type: ignore[union-attr]
    # established traffic is not capped
    assert run(dp, "edge_xdp", client_pkt("A", sport=44000, seq=1001))[0] == XDP_PASS


def vip_ip(**kw: object) -> IP:
    return IP(src=CLIENT, dst=VIP, **kw)


BAD = {
    # name: (packet, verdict, anomaly)
    # (< 14 bytes cannot be fed: BPF_PROG_TEST_RUN and drivers need an Ethernet header)
    "eth_only": (raw(Ether(dst=EDGE_MAC, type=0x0800)), XDP_PASS, "bad_ip"),
    "trunc_ip": (raw(Ether(dst=EDGE_MAC) / IP(src=CLIENT, dst=VIP))[:24], XDP_PASS, "bad_ip"),
    "ihl_4": (None, XDP_PASS, "bad_ip"),
    "ip_options": (
        raw(Ether(dst=EDGE_MAC) / vip_ip(options=[b"\x01\x01\x01\x00"]) / TCP(dport=7, flags="S")),
        XDP_DROP,
        "ip_options",
    ),
    "fragment": (
        raw(Ether(dst=EDGE_MAC) / vip_ip(flags="MF") / TCP(dport=7, flags="S")),
        XDP_DROP,
        "fragment",
    ),
    "later_fragment": (
        raw(Ether(dst=EDGE_MAC) / vip_ip(frag=100, proto=6) / (b"x" * 20)),
        XDP_DROP,
        "fragment",
    ),
    "udp_to_vip": (raw(Ether(dst=EDGE_MAC) / vip_ip() / UDP(dport=7)), XDP_PASS, "non_tcp_vip"),
    "icmp_to_vip": (raw(Ether(dst=EDGE_MAC) / vip_ip() / ICMP()), XDP_PASS, "non_tcp_vip"),
    "trunc_tcp": (
        raw(Ether(dst=EDGE_MAC) / vip_ip(proto=6) / (b"\x9c\x40\x00\x07" * 3)),
        XDP_DROP,
        "trunc_tcp",
    ),
    "doff_4": (None, XDP_DROP, "bad_doff"),
    "doff_beyond": (None, XDP_DROP, "bad_doff"),
    "syn_fin": (client_pkt("SF"), XDP_DROP, "bad_flags"),
    "syn_rst": (client_pkt("SR"), XDP_DROP, "bad_flags"),
}


def _patched(offset: int, value: int, fix_ip_len: int | None = None) -> bytes:
    b = bytearray(client_pkt("S"))
    b[offset] = value
    if fix_ip_len is not None:
        b[16:18] = fix_ip_len.to_bytes(2, "big")
    return bytes(b)


BAD["ihl_4"] = (_patched(14, 0x44), XDP_PASS, "bad_ip")
BAD["doff_4"] = (_patched(14 + 20 + 12, 0x40), XDP_DROP, "bad_doff")
BAD["doff_beyond"] = (_patched(14 + 20 + 12, 0xF0), XDP_DROP, "bad_doff")


# BPF_PROG_TEST_RUN cannot build an skb whose IPv4 header is cut short, so these
# two run through the XDP entry only (the TC entry shares the same parsing code).
SKB_UNBUILDABLE = ("eth_only", "trunc_ip")
BAD_CASES = [(mode, name) for mode in ATTACH_MODES for name in sorted(BAD)
             if not (mode == "tc" and name in SKB_UNBUILDABLE)]


@pytest.mark.parametrize(("dp", "name"), BAD_CASES, indirect=["dp"])
def test_bad_packets(dp: Dataplane, name: str) -> None:
    pkt, verdict, kind = BAD[name]
    dp.sync([table((M1,))])
    open_flow(dp, 40000)
    before = bytes(ct_of(dp) or bm.CtValue())
    rc, out = run(dp, "edge_xdp", pkt)
    assert rc == verdict
    if verdict == XDP_PASS:
        assert out == pkt
    c = dp.read_counters()
    assert c.anomalies[kind] == 1, c.anomalies
    assert sum(c.anomalies.values()) == 1
    # never touches another flow, never creates one
    assert bytes(ct_of(dp) or bm.CtValue()) == before
    assert len(list(dp.maps["conntrack"].keys())) == 1
    assert c.machine("echo-1").opened == 1  # type: ignore[union-attr]


def test_odd_packets_to_other_addresses_are_not_ours(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    pkt = raw(Ether(dst=EDGE_MAC) / IP(src=CLIENT, dst="198.18.200.9", flags="MF") / TCP(dport=7))
    assert run(dp, "edge_xdp", pkt) == (XDP_PASS, pkt)
    assert sum(dp.read_counters().anomalies.values()) == 0


def test_zero_length_and_pure_ack_are_forwarded(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    open_flow(dp)
    pkt = client_pkt("A", seq=1001, ack=5001)
    assert run(dp, "edge_xdp", pkt) == (XDP_PASS, expected_forward(pkt, "198.18.201.1", 7000))


def test_sweep_expires_idle_flows_once(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    open_flow(dp, 45000)
    open_flow(dp, 45001)
    run(dp, "edge_xdp", client_pkt("R", sport=45001, seq=1001))
    assert dp.sweep(3600) == (0, 0)
    assert dp.sweep(0) == (1, 1)
    c = machine(dp, "echo-1")
    assert (c.opened, c.active, c.expired, c.reset) == (2, 0, 1, 1)
    assert list(dp.maps["conntrack"].keys()) == []
    assert dp.sweep(0) == (0, 0)


def test_generation_flip_cleans_the_old_table(dp: Dataplane) -> None:
    dp.sync([table((M1, M2))])
    size2 = maglev.table_size(2)
    assert len(list(dp.maps["maglev"].keys())) == size2
    key = bm.ServiceKey(bm.be32(IPv4Address(VIP)), bm.be16(7), 6)
    gen = dp.maps["services"].lookup(key).gen
    r = dp.sync([table((M1, M2, M3))])
    assert r.services_written == 1
    v = dp.maps["services"].lookup(key)
    assert v.gen == 1 - gen and v.maglev_size == maglev.table_size(3)
    assert {k.gen for k in list(dp.maps["maglev"].keys())} == {v.gen}
    assert len(list(dp.maps["maglev"].keys())) == maglev.table_size(3)
    # the same tables again write nothing
    assert dp.sync([table((M1, M2, M3))]).services_written == 0
    # a removed service leaves nothing behind
    dp.sync([])
    for name in ("services", "maglev", "backends"):
        assert list(dp.maps[name].keys()) == [], name


def test_draining_machine_keeps_its_id_until_idle(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    open_flow(dp)
    assert dp.sync([table((M2,))]).machines_freed == 0
    pkt = client_pkt("A", seq=1001, ack=5001)
    assert run(dp, "edge_xdp", pkt)[1] == expected_forward(pkt, "198.18.201.1", 7000)
    run(dp, "edge_xdp", client_pkt("R", seq=1001))
    assert dp.sync([table((M2,))]).machines_freed == 1


def test_adoption_rebuilds_ids_from_the_maps(dp: Dataplane) -> None:
    tables = [table((M1, M2), (M3,)), table((M1,), ports=(9,), service="echo-2")]
    dp.sync(tables)
    open_flow(dp)
    before = dp.read_counters()
    other = Dataplane(dp.config)
    try:
        other.adopt()
        assert other.read_counters() == before
        r = other.sync(tables)
        assert (r.services_written, r.machines_added, r.machines_freed) == (0, 0, 0)
        assert other._machine_ids == dp._machine_ids
        assert [f.machine for f in other.flows()] == [f.machine for f in dp.flows()]
    finally:
        other.close()


def test_flows_are_decoded(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    open_flow(dp)
    (f,) = dp.flows()
    assert (str(f.client), f.client_port, str(f.vip), f.port) == (CLIENT, 40000, VIP, 7)
    assert (f.app, f.service, f.machine, f.state) == ("echo", "echo-tcp", "echo-1", "open")
    assert 0 <= f.idle < 60 and f.idle <= f.age < 60


def test_flow_counts_its_own_packets_and_bytes_each_way(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    run(dp, "edge_xdp", client_pkt("S"))
    run(dp, "edge_xdp", reply_pkt("SA", payload=b"greeting\n"))
    run(dp, "edge_xdp", client_pkt("PA", seq=1001, ack=5001, payload=b"hello world"))
    run(dp, "edge_xdp", client_pkt("A", seq=1012, ack=5010))
    run(dp, "edge_xdp", reply_pkt("PA", payload=b"hello world"))
    ct = ct_of(dp)
    assert ct is not None and ct.created_ns > 0 and ct.created_ns <= ct.last_seen_ns + 10**9
    assert (ct.packets_in, ct.bytes_in, ct.packets_out, ct.bytes_out) == (3, 11, 2, 20)
    (f,) = dp.flows()
    assert (f.packets_in, f.bytes_in, f.packets_out, f.bytes_out) == (3, 11, 2, 20)
    # the flow's own counters agree with its machine's (its only flow)
    c = machine(dp, "echo-1")
    assert (c.packets_in, c.bytes_in, c.packets_out, c.bytes_out) == (3, 11, 2, 20)


def filter_bit_set(dp: Dataplane, addr: str) -> bool:
    bit = bm.vip_filter_bit(bm.be32(IPv4Address(addr)), bm.vip_filter_bits(dp.config.max_services))
    word = dp.maps["vip_filter"].lookup(bm.U32(bit >> 6))
    return word is not None and bool(word.value >> (bit & 63) & 1)


def epoch_of(dp: Dataplane, dport: int) -> int:
    slot = bm.key_epoch_slot(bm.be32(IPv4Address(VIP)), bm.be16(dport))
    value = dp.maps["key_epoch"].lookup(bm.U32(slot))
    return int(value.value) if value is not None else 0


def test_vip_filter_follows_the_vips(dp: Dataplane) -> None:
    vip2 = "198.18.200.20"
    bits = bm.vip_filter_bits(dp.config.max_services)
    assert bm.vip_filter_bit(bm.be32(IPv4Address(vip2)), bits) != bm.vip_filter_bit(
        bm.be32(IPv4Address(VIP)), bits)
    dp.sync([table((M1,)), table((M2,), vip=vip2, service="echo-b")])
    assert filter_bit_set(dp, VIP) and filter_bit_set(dp, vip2)
    pkt = client_pkt("S", dst=vip2)
    assert run(dp, "edge_xdp", pkt) == (XDP_PASS, expected_forward(pkt, "198.18.201.2", 7000))
    # a restarted loader rebuilds the same filter from the maps
    other = Dataplane(dp.config)
    try:
        other.adopt()
        assert other._filter_words == dp._filter_words
    finally:
        other.close()
    dp.sync([table((M1,))])
    assert filter_bit_set(dp, VIP) and not filter_bit_set(dp, vip2)
    assert run(dp, "edge_xdp", pkt) == (XDP_PASS, pkt)
    dp.sync([])
    assert not any(int(v.value) for _, v in dp.maps["vip_filter"].items())


def test_vip_filter_false_positive_takes_the_lookup(dp: Dataplane) -> None:
    dp.sync([table((M1,))])
    other = "198.19.200.77"  # not a VIP; its bit forced on as if shared with one
    bit = bm.vip_filter_bit(bm.be32(IPv4Address(other)), bm.vip_filter_bits(dp.config.max_services))
    dp.maps["vip_filter"].update(bm.U32(bit >> 6), bm.U64(1 << (bit & 63)))
    cases = [client_pkt("S", dst=other), client_pkt("PA", dst=other, payload=b"x"),
             raw(Ether(src=CLIENT_MAC, dst=EDGE_MAC) / IP(src=CLIENT, dst=other, flags="MF")
                 / TCP(dport=7))]
    for pkt in cases:
        assert run(dp, "edge_xdp", pkt) == (XDP_PASS, pkt)
    c = dp.read_counters()
    assert c.stats["passed"] == len(cases) and sum(c.anomalies.values()) == 0
    assert list(dp.maps["conntrack"].keys()) == []


def test_removed_port_stops_established_flows_and_readding_keeps_them(dp: Dataplane) -> None:
    dp.sync([table((M1,), ports=(7, 9))])
    open_flow_9 = client_pkt("S", dport=9)
    assert run(dp, "edge_xdp", open_flow_9)[0] == XDP_PASS
    ct = ct_of(dp, dport=9)
    assert ct is not None and ct.flags >> bm.CT_EPOCH_SHIFT == epoch_of(dp, 9)
    data = client_pkt("PA", dport=9, seq=1001, ack=5001, payload=b"abc")
    assert run(dp, "edge_xdp", data) == (XDP_PASS, expected_forward(data, "198.18.201.1", 7000))
    # port 9 leaves the service: its flows' packets go to the kernel, as before
    before = epoch_of(dp, 9)
    dp.sync([table((M1,), ports=(7,))])
    assert epoch_of(dp, 9) == before + 1
    assert run(dp, "edge_xdp", data) == (XDP_PASS, data)
    reply = reply_pkt("A", sport=9, payload=b"xy")
    assert run(dp, "edge_xdp", reply) == (XDP_PASS, reply)
    assert dp.read_counters().anomalies["bad_ipip"] == 1
    # and back: the old flow sticks to its machine through the services lookup
    dp.sync([table((M2,), ports=(7, 9))])
    assert run(dp, "edge_xdp", data) == (XDP_PASS, expected_forward(data, "198.18.201.1", 7000))
    assert run(dp, "edge_xdp", reply) == (XDP_PASS, decapped(reply))
    c = machine(dp, "echo-1")
    assert (c.packets_in, c.bytes_in, c.packets_out, c.bytes_out) == (3, 6, 1, 2)
    # a flow opened now carries the current epoch
    assert run(dp, "edge_xdp", client_pkt("S", sport=40001, dport=9))[0] == XDP_PASS
    ct = ct_of(dp, sport=40001, dport=9)
    assert ct is not None and ct.flags >> bm.CT_EPOCH_SHIFT == epoch_of(dp, 9)
    assert ct.flags & bm.CT_FLAG_BITS == 0


def test_flows_stamped_by_older_programs_take_the_services_lookup(dp: Dataplane) -> None:
    # load() started every key epoch at 1 (sync only ever adds); older programs stamped 0
    raw = dp.maps["key_epoch"].lookup_array(bm.KEY_EPOCH_SLOTS)
    assert min(memoryview(raw).cast("I")) >= 1
    dp.sync([table((M1,), ports=(7, 9))])
    assert run(dp, "edge_xdp", client_pkt("S", dport=9))[0] == XDP_PASS
    key = bm.CtKey(bm.be32(IPv4Address(CLIENT)), bm.be32(IPv4Address(VIP)), bm.be16(40000),
                   bm.be16(9), 6)
    ct = dp.maps["conntrack"].lookup(key)
    assert ct is not None
    ct.flags = 0  # as an older program wrote it
    dp.maps["conntrack"].update(key, ct)
    data = client_pkt("PA", dport=9, seq=1001, ack=5001, payload=b"abc")
    assert run(dp, "edge_xdp", data) == (XDP_PASS, expected_forward(data, "198.18.201.1", 7000))
    # its key deleted by an older loader (no epoch bump): the lookup still decides
    skey = bm.ServiceKey(bm.be32(IPv4Address(VIP)), bm.be16(9), 6)
    value = dp.maps["services"].lookup(skey)
    dp.maps["services"].delete(skey)
    try:
        assert run(dp, "edge_xdp", data) == (XDP_PASS, data)
    finally:
        dp.maps["services"].update(skey, value)  # the loader's cache still has it
