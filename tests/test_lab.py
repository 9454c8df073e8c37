"""The namespace lab: addressing plan, machines, delays, exec, and clean teardown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import h11
import pytest

from conftest import DEFAULT_STATE, TOOLS, LabHandle, run_lab
from edgelab.machines import Identity, http_response
from edgelab.statefile import load_lab_state
from edgelab.topology import BACKHAUL_MTU, build_topology

LAB_NAMESPACES = {"ep-client", "ep-edge-ord", "ep-edge-ams", "ep-worker-ord",
                  "ep-worker-ams", "ep-worker-syd", "ep-wire"}
EXPECTED_NODES = {
    "client": ("client", "ord", {"198.18.0.2", "198.18.0.3"}),
    "edge-ord": ("edge", "ord", {"198.18.0.11", "198.19.0.80"}),
    "edge-ams": ("edge", "ams", {"198.18.0.12", "198.19.0.80"}),
    "worker-ord": ("worker", "ord", {"198.18.0.21"}),
    "worker-ams": ("worker", "ams", {"198.18.0.22"}),
    "worker-syd": ("worker", "syd", {"198.18.0.23"}),
}
BPF_ROOT = Path("/sys/fs/bpf/edgeproxy")
RUN_RECORD = Path("/run/edgeproxy-lab/lab.json")

# Runs in the client namespace: reaches every machine directly, reports what it
# said and how long a TCP handshake took (one RTT through the emulated links).
PROBE = r"""
import asyncio, json, sys, time
TIMEOUT = 10

async def connect(m, source):
    return await asyncio.wait_for(
        asyncio.open_connection(m["address"], m["port"], local_addr=(source, 0)), TIMEOUT)

async def probe(m, source):
    _, warm = await connect(m, source)  # first contact also pays for ARP on each hop
    warm.close()
    started = time.monotonic()
    r, w = await connect(m, source)
    rtt = time.monotonic() - started
    if m["app"] == "echo":
        said = (await asyncio.wait_for(r.readline(), TIMEOUT)).decode()
        w.write(b"ping\n"); await w.drain()
        said += (await asyncio.wait_for(r.readline(), TIMEOUT)).decode()
    else:
        w.write(f"GET /who HTTP/1.1\r\nHost: web.lab\r\nConnection: close\r\n\r\n".encode())
        said = (await asyncio.wait_for(r.read(), TIMEOUT)).decode()
    w.close()
    return {"id": m["id"], "source": source, "rtt": rtt, "said": said}

async def main():
    machines = json.loads(sys.stdin.read())
    jobs = [probe(m, s) for m in machines for s in ("198.18.0.2", "198.18.0.3")]
    print(json.dumps(await asyncio.gather(*jobs)))

asyncio.run(main())
"""


def _recorded_processes() -> list[dict[str, Any]]:
    processes: list[dict[str, Any]] = json.loads(RUN_RECORD.read_text())["processes"]
    return processes


def _alive(pid: int, start_time: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and int(fields[19]) == start_time


def _lab_namespaces_present() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line} & LAB_NAMESPACES


def _assert_clean(processes: list[dict[str, Any]]) -> None:
    assert not _lab_namespaces_present()
    assert not [p for p in processes if _alive(p["pid"], p["start_time"])]
    lab_pins = {"client", *EXPECTED_NODES} & {p.name for p in BPF_ROOT.glob("*")}
    assert not lab_pins
    assert not RUN_RECORD.exists()


# ---------------------------------------------------------------- pure logic (no root)


def test_topology_follows_design() -> None:
    topo = build_topology(load_lab_state(DEFAULT_STATE))
    delays = {(lk.a, lk.b): lk.delay_ms for lk in topo.links}
    assert delays == {
        ("client", "edge-ord"): 0, ("client", "edge-ams"): 45,
        ("edge-ord", "worker-ord"): 0, ("edge-ord", "worker-ams"): 45,
        ("edge-ord", "worker-syd"): 95, ("edge-ams", "worker-ord"): 45,
        ("edge-ams", "worker-ams"): 0, ("edge-ams", "worker-syd"): 140,
    }
    assert all(str(lk.subnet).startswith("198.18.1.") and lk.subnet.prefixlen == 30
               for lk in topo.links)
    assert {lk.mtu for lk in topo.links if lk.a != "client"} == {BACKHAUL_MTU}
    assert topo.node("worker-syd").machine_subnets == ("198.18.66.0/24",)
    assert topo.rules["client"][0].source == "198.18.0.3"


def test_http_machine_answers_with_identity_and_hook_header() -> None:
    request = h11.Request(method="POST", target="/x", headers=[
        ("host", "web.lab"), ("content-length", "4"),
        ("x-lab-reply-header", "Fly-Replay: region=ord"),
    ])
    status, headers, body = http_response(Identity("web-ams-1", "ams", "web"), request, b"data")
    assert status == 200 and body == b"data"
    assert (b"x-machine-id", b"web-ams-1") in headers
    assert (b"Fly-Replay", b"region=ord") in headers


# ---------------------------------------------------------------- the lab (root)

@pytest.fixture(scope="module")
def probes(lab: LabHandle) -> dict[tuple[str, str], dict[str, Any]]:
    machines = [m for m in lab.status()["machines"] if m["state"] == "started"]
    done = lab.exec("client", sys.executable, "-c", PROBE, input=json.dumps(machines))
    assert done.returncode == 0, done.stderr
    return {(p["id"], p["source"]): p for p in json.loads(done.stdout)}


@pytest.mark.root
@pytest.mark.lab
def test_status_lists_nodes_apps_and_state_source(lab: LabHandle) -> None:
    status = lab.status()
    assert status["up"] is True
    nodes = {n["name"]: n for n in status["nodes"]}
    assert set(nodes) == set(EXPECTED_NODES)
    for name, (role, region, addresses) in EXPECTED_NODES.items():
        assert nodes[name]["namespace"] == f"ep-{name}"
        assert (nodes[name]["role"], nodes[name]["region"]) == (role, region)
        assert set(nodes[name]["addresses"]) == addresses
    apps = {a["name"]: a for a in status["apps"]}
    assert apps["echo"] == {"name": "echo", "addresses": ["198.19.1.1"], "ports": [7],
                            "handlers": []}
    assert apps["web"]["handlers"] == ["http"]
    assert len(status["machines"]) == 14 and all(m["alive"] for m in status["machines"])
    assert {d["state_source"]["path"] for d in status["daemons"]} == {str(lab.state_path)}


@pytest.mark.root
@pytest.mark.lab
def test_client_reaches_every_machine_directly(
        lab: LabHandle, probes: dict[tuple[str, str], dict[str, Any]]) -> None:
    for machine in lab.status()["machines"]:
        region = machine["host"].removeprefix("worker-")
        for source in ("198.18.0.2", "198.18.0.3"):
            said = probes[(machine["id"], source)]["said"]
            if machine["app"] == "echo":
                assert said == f"{machine['id']} {region}\nping\n"
            else:
                head = said.lower()
                assert head.startswith("http/1.1 200")
                assert f"x-machine-id: {machine['id']}" in head
                assert f"x-machine-region: {region}" in head


@pytest.mark.root
@pytest.mark.lab
def test_delays_follow_regions(probes: dict[tuple[str, str], dict[str, Any]]) -> None:
    # Loose on purpose: this checks the topology, not the emulator's precision.
    assert probes[("echo-ord-1", "198.18.0.2")]["rtt"] < 0.050
    assert probes[("echo-syd-1", "198.18.0.2")]["rtt"] >= 0.150  # 2 x 95 ms via edge-ord
    # From 198.18.0.3 the path is via edge-ams: 2 x 45 ms before reaching ams.
    assert probes[("echo-ams-1", "198.18.0.3")]["rtt"] >= 0.060
    assert probes[("echo-ams-1", "198.18.0.3")]["rtt"] < 0.150


@pytest.mark.root
@pytest.mark.lab
def test_websocket_echo_on_http_machine(lab: LabHandle) -> None:
    code = (
        "import asyncio\n"
        "from websockets.asyncio.client import connect\n"
        "async def main():\n"
        "    async with connect('ws://198.18.65.12:8080/ws', open_timeout=10) as ws:\n"
        "        await ws.send('hello')\n"
        "        print(ws.response.headers['x-machine-id'], await ws.recv())\n"
        "asyncio.run(main())\n"
    )
    done = lab.python("client", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["web-ams-2", "hello"]


@pytest.mark.root
@pytest.mark.lab
def test_exec_passes_exit_code_and_instance(lab: LabHandle) -> None:
    assert lab.exec("client", "false").returncode == 1
    assert lab.exec("worker-syd", "sh", "-c", "exit 7").returncode == 7
    done = lab.exec("edge-ams", "sh", "-c", "echo $EDGEPROXY_INSTANCE; ip -br addr show lo")
    assert done.stdout.startswith("edge-ams\n") and "198.19.0.80/32" in done.stdout
    assert lab.exec("nosuchnode", "true").returncode == 125


@pytest.mark.root
@pytest.mark.lab
def test_up_twice_is_harmless(lab: LabHandle) -> None:
    before = {m["id"]: m["pid"] for m in lab.status()["machines"]}
    done = run_lab(*lab.up_args)
    assert done.returncode == 0, done.stderr
    assert "already up" in done.stdout
    assert {m["id"]: m["pid"] for m in lab.status()["machines"]} == before


# Destructive tests last: each takes the lab down and brings it back for later tests.


@pytest.mark.root
@pytest.mark.lab
def test_down_removes_everything(lab: LabHandle) -> None:
    try:
        processes = _recorded_processes()
        (BPF_ROOT / "edge-ord").mkdir(parents=True, exist_ok=True)  # as a daemon would pin
        # A process the lab did not start itself, left running inside a lab namespace.
        stray = lab.popen("client", "sleep", "300", stdout=subprocess.DEVNULL)
        done = run_lab("down")
        assert done.returncode == 0, done.stderr
        assert stray.wait(timeout=5) != 0  # stopped by down, not finished
        _assert_clean(processes)
        again = run_lab("down")
        assert again.returncode == 0, again.stderr
    finally:
        lab.ensure_up()


CRASH_MIDWAY = """
import os, signal
from edgelab.lab import Builder, DEFAULT_STATE
from edgelab.statefile import load_lab_state
from edgelab.topology import build_topology
state = load_lab_state(DEFAULT_STATE)
builder = Builder(state, build_topology(state), print)
builder.record.save()
builder.namespaces()
builder.links()
builder.addressing()
builder.machines()
os.kill(os.getpid(), signal.SIGKILL)  # dies with namespaces, links and machines made
"""


@pytest.mark.root
@pytest.mark.lab
def test_down_cleans_after_crash_midway(lab: LabHandle) -> None:
    try:
        assert run_lab("down").returncode == 0
        crashed = subprocess.run(
            [sys.executable, "-c", CRASH_MIDWAY], capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": str(TOOLS), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            check=False,
        )
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        processes = _recorded_processes()
        assert len([p for p in processes if p["kind"] == "machine"]) == 14
        assert _lab_namespaces_present()
        done = run_lab("down")
        assert done.returncode == 0, done.stderr
        _assert_clean(processes)
    finally:
        lab.ensure_up()


def _greeting(lab: LabHandle, address: str) -> subprocess.CompletedProcess[str]:
    return lab.exec("client", "socat", "-T", "3", "-", f"TCP:{address}:7000", input="x\n",
                    timeout=20)


@pytest.mark.root
@pytest.mark.lab
def test_machine_stop_start_and_sync_follow_the_state(lab: LabHandle) -> None:
    try:
        lab.machine("stop", "echo-syd-2")
        assert not lab.machines()["echo-syd-2"]["alive"]
        assert _greeting(lab, "198.18.66.2").returncode != 0  # nothing listens any more
        lab.machine("start", "echo-syd-2")
        assert _greeting(lab, "198.18.66.2").stdout.startswith("echo-syd-2 syd")

        stopped = lab.state_path.read_text().replace(
            "address: 198.18.66.2, state: started", "address: 198.18.66.2, state: stopped")
        lab.write_state(stopped)
        assert "echo-syd-2" not in {m for m, info in lab.machines().items() if info["alive"]}
        lab.reset_state()
        assert lab.machines()["echo-syd-2"]["alive"]
        assert _greeting(lab, "198.18.66.2").stdout.startswith("echo-syd-2 syd")
    finally:
        lab.reset_state()
