"""End to end on the real kernel, in namespaces of our own (not the lab):

    client ns --veth-- edge ns --veth (MTU 1600)-- worker ns [echo server on a machine addr]

The edge and worker programs are loaded and fed by dataplane.py from a separate
process that then exits (the "daemon" is gone, the fast path must keep working);
the test process adopts the pinned maps to read the counters, then restarts the
loader and checks nothing that was right changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bpf_harness import need_root_kernel
from edgeproxy.dataplane import Dataplane, DataplaneConfig

pytestmark = [pytest.mark.root, pytest.mark.kernel]

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TAG = f"ept{os.getpid() % 100000}"
NS_C, NS_E, NS_W = f"{TAG}c", f"{TAG}e", f"{TAG}w"
EDGE_HOST, WORKER_HOST = "198.18.200.129", "198.18.200.130"
MACHINE, VIP = "198.18.201.1", "198.19.200.1"
ATTACH_MODES = ("xdp", "tc")


def instances(mode: str) -> tuple[str, str]:
    """(edge, worker) instance names of one attach mode's run."""
    return f"test-{os.getpid()}-e2e-{mode}-edge", f"test-{os.getpid()}-e2e-{mode}-worker"

ECHO_SERVER = textwrap.dedent(
    """
    import socket, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("%s", 7000)); s.listen(64); print("ready", flush=True)
    def serve(c):
        c.sendall(b"m1 test\\n")
        while data := c.recv(65536):
            c.sendall(data)
        c.close()
    while True:
        c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
    % MACHINE
)

CLIENT = textwrap.dedent(
    """
    import socket, sys
    n = int(sys.argv[1])
    s = socket.create_connection(("%s", 7), timeout=10)
    greeting = b""
    while not greeting.endswith(b"\\n"):
        greeting += s.recv(1)
    payload = bytes(range(256)) * (n // 256)
    s.sendall(payload); s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    print(greeting.decode().strip(), len(got), got == payload)
"""
    % VIP
)

LOADER = textwrap.dedent(
    """
    import sys
    from ipaddress import IPv4Address as A
    from edgeproxy.dataplane import Dataplane, DataplaneConfig
    from edgeproxy.routing import Backend, ServiceTable
    kw = dict(max_services=64, max_machines=64, max_flows=1024, max_maglev_slots=8192,
              max_backend_entries=1024)
    edge = Dataplane(DataplaneConfig("%(ie)s", "edge", A("%(eh)s"), ("e0", "e1"), netns="%(ne)s",
                                     attach=sys.argv[1], **kw))
    worker = Dataplane(DataplaneConfig("%(iw)s", "worker", A("%(wh)s"), ("w0",),
                                       netns="%(nw)s", attach=sys.argv[1], **kw))
    edge.load(); worker.load()
    m = Backend("m1", "echo", "ord", A("%(m)s"), 7000, A("%(wh)s"))
    edge.sync([ServiceTable("echo-tcp", "echo", (A("%(vip)s"),), (7,), (), "connections",
                            50, 100, ((m,),))])
    print("loaded")
"""
    % dict(
        ie="%(ie)s",
        iw="%(iw)s",
        eh=EDGE_HOST,
        wh=WORKER_HOST,
        ne=NS_E,
        nw=NS_W,
        m=MACHINE,
        vip=VIP,
    )
)


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def nsx(ns: str, *cmd: str) -> str:
    return sh("ip", "netns", "exec", ns, *cmd)


def build_namespaces() -> None:
    for ns in (NS_C, NS_E, NS_W):
        sh("ip", "netns", "add", ns)
        nsx(ns, "ip", "link", "set", "lo", "up")
        nsx(
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        )
    sh("ip", "link", "add", "c0", "netns", NS_C, "type", "veth", "peer", "e0", "netns", NS_E)
    sh(
        "ip",
        "link",
        "add",
        "e1",
        "netns",
        NS_E,
        "mtu",
        "1600",
        "type",
        "veth",
        "peer",
        "w0",
        "netns",
        NS_W,
        "mtu",
        "1600",
    )
    nsx(NS_C, "ip", "addr", "add", "198.18.200.2/30", "dev", "c0")
    nsx(NS_E, "ip", "addr", "add", "198.18.200.1/30", "dev", "e0")
    nsx(NS_E, "ip", "addr", "add", "198.18.200.5/30", "dev", "e1")
    nsx(NS_W, "ip", "addr", "add", "198.18.200.6/30", "dev", "w0")
    nsx(NS_E, "ip", "addr", "add", f"{EDGE_HOST}/32", "dev", "lo")
    nsx(NS_W, "ip", "addr", "add", f"{WORKER_HOST}/32", "dev", "lo")
    nsx(NS_W, "ip", "addr", "add", f"{MACHINE}/32", "dev", "lo")
    for ns, dev in ((NS_C, "c0"), (NS_E, "e0"), (NS_E, "e1"), (NS_W, "w0")):
        nsx(ns, "ip", "link", "set", dev, "up")
    nsx(NS_C, "ip", "route", "add", "default", "via", "198.18.200.1")
    nsx(NS_E, "ip", "route", "add", f"{WORKER_HOST}/32", "via", "198.18.200.6")
    nsx(NS_E, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    # the worker routes clients toward an edge; TC egress redirects to the flow's edge
    nsx(NS_W, "ip", "route", "add", "default", "via", "198.18.200.5")


@pytest.fixture(scope="module")
def topo() -> Iterator[subprocess.Popen[str]]:
    need_root_kernel()
    server = None
    try:
        build_namespaces()
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS_W, PY, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield server
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        for mode in ATTACH_MODES:
            for inst in instances(mode):
                subprocess.run(["rm", "-rf", f"/sys/fs/bpf/edgeproxy/{inst}"], check=False)
        for ns in (NS_C, NS_E, NS_W):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def connect(nbytes: int) -> str:
    return nsx(NS_C, PY, "-c", CLIENT, str(nbytes)).strip()


def edge_view(mode: str) -> Dataplane:
    dp = Dataplane(
        DataplaneConfig(
            instances(mode)[0],
            "edge",
            IPv4Address(EDGE_HOST),
            ("e0", "e1"),
            netns=NS_E,
            max_machines=64,
            max_services=64,
        )
    )
    dp.adopt()
    return dp


def wait_closed(dp: Dataplane, opened: int) -> None:
    for _ in range(50):  # bounded: up to 5 s for the last FIN/ACKs
        c = dp.read_counters().machine("m1")
        if c is not None and c.opened == opened and c.active == 0:
            return
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ATTACH_MODES)
def test_echo_through_the_fast_path(topo: subprocess.Popen[str], mode: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "control"))
    ie, iw = instances(mode)
    loader = LOADER % dict(ie=ie, iw=iw)
    done = subprocess.run(
        [PY, "-c", loader, mode], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]
    # the loader process has exited: programs stay attached, maps stay pinned

    n = 256 * 1024
    assert connect(n) == f"m1 test {n} True"
    # no socket on the edge: the connection never touched its stack
    sockets = nsx(NS_E, "ss", "-tan")
    assert VIP not in sockets and "198.18.200.2" not in sockets, sockets

    dp = edge_view(mode)
    try:
        wait_closed(dp, 1)
        c = dp.read_counters().machine("m1")
        assert c is not None
        assert (c.opened, c.active, c.closed + c.reset) == (1, 0, 1), c
        assert c.bytes_in == n
        assert c.bytes_out == n + len(b"m1 test\n")
        assert c.packets_in > 2 and c.packets_out > 2
        (flow,) = dp.flows()
        assert flow.state in ("closed", "reset") and flow.machine == "m1"

        # restart the loader in-process: re-adopts, re-attaches; counters survive
        cfg = DataplaneConfig(
            ie,
            "edge",
            IPv4Address(EDGE_HOST),
            ("e0", "e1"),
            netns=NS_E,
            max_services=64,
            max_machines=64,
            max_flows=1024,
            max_maglev_slots=8192,
            max_backend_entries=1024,
            attach=mode,  # type: ignore[arg-type]
        )
        restarted = Dataplane(cfg)
        restarted.load()
        try:
            assert restarted.read_counters().machine("m1") == c
            assert connect(1024) == "m1 test 1024 True"
            wait_closed(restarted, 2)
            c2 = restarted.read_counters().machine("m1")
            assert c2 is not None and (c2.opened, c2.active) == (2, 0)
            assert c2.bytes_in == n + 1024
        finally:
            restarted.close()
    finally:
        dp.close()
    # still attached on the edge interfaces after every loader let go, in the one mode
    link = nsx(NS_E, "ip", "link", "show", "e0")
    ingress = nsx(NS_E, "tc", "filter", "show", "dev", "e0", "ingress")
    if mode == "xdp":
        assert "xdp" in link and "edge_tc" not in ingress
    else:
        assert "xdp" not in link and "edge_tc" in ingress, (link, ingress)
        assert "worker_ingress_tc" in nsx(NS_W, "tc", "filter", "show", "dev", "w0", "ingress")
    # detach this mode's programs so the next mode starts from a bare topology
    for inst, role, host, ifs, ns in ((ie, "edge", EDGE_HOST, ("e0", "e1"), NS_E),
                                      (iw, "worker", WORKER_HOST, ("w0",), NS_W)):
        Dataplane(DataplaneConfig(inst, role, IPv4Address(host), ifs, netns=ns,  # type: ignore[arg-type]
                                  attach=mode)).unload()  # type: ignore[arg-type]
