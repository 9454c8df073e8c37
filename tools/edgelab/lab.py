"""Bringing the lab up and down: namespaces, links, machines, daemons.

Everything created is written to the run dir's lab.json before or right after it
exists, so `down` can clean a lab whose `up` crashed anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgelab import netns, xdp
from edgelab.processes import (
    LabProcess,
    is_alive,
    record_of,
    spawn_in_namespace,
    start_time_of,
    stop,
)
from edgelab.rundir import BPF_ROOT, RUN_DIR, LabRecord, load_record, machine_dir, node_dir
from edgelab.statefile import LabState, Machine, Service, load_lab_state
from edgelab.topology import NAMESPACE_PREFIX, Link, Node, Topology, build_topology

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
DEFAULT_STATE = TOOLS / "edgelab" / "state.yaml"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
DAEMON_SOURCE = REPO / "control" / "edgeproxy" / "daemon.py"
# Where delayed links meet when the kernel has no netem (see delayline.py).
WIRE_NAMESPACE = NAMESPACE_PREFIX + "wire"
WIRE_NODE = "wire"
MACHINE_READY_TIMEOUT_S = 20.0
DAEMON_READY_TIMEOUT_S = 90.0
READY_POLL_S = 0.05
DAEMON_METRICS_LISTEN = "127.0.0.1:9109"
LOG_TAIL_LINES = 30
LOCK_FILE = Path("/run/edgeproxy-lab.lock")
LOCK_TIMEOUT_S = 240.0  # longer than the slowest up (daemons get 90 s to be ready)

Say = Callable[[str], None]


class LabError(RuntimeError):
    """`up` could not finish; the message says what failed (the lab is left for `down`)."""


def default_say(line: str) -> None:
    print(f"[lab] {line}", flush=True)


def process_env(node: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": f"{TOOLS}:{path}" if path else str(TOOLS),
        "EDGEPROXY_INSTANCE": node,
    }


def log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {log})"
    return "\n".join(lines[-LOG_TAIL_LINES:])


@dataclass
class Pending:
    """A spawned process we wait on until its ready file appears."""

    popen: subprocess.Popen[bytes]
    process: LabProcess
    ready_file: Path
    log: Path


def wait_ready(pending: list[Pending], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = list(pending)
    while waiting:
        for item in list(waiting):
            if item.ready_file.exists():
                waiting.remove(item)
            elif item.popen.poll() is not None:
                raise LabError(
                    f"{what} {item.process.name} on {item.process.node} exited with "
                    f"status {item.popen.returncode}; last lines of {item.log}:\n"
                    f"{log_tail(item.log)}"
                )
        if waiting and time.monotonic() > deadline:
            item = waiting[0]
            raise LabError(
                f"{what} {item.process.name} on {item.process.node} not ready after "
                f"{timeout_s:.0f}s ({item.ready_file} missing); last lines of {item.log}:\n"
                f"{log_tail(item.log)}"
            )
        if waiting:
            time.sleep(READY_POLL_S)


# ---------------------------------------------------------------- building


class Builder:
    """One `up`: creates things in order and records each in lab.json as it goes."""

    def __init__(self, state: LabState, topo: Topology, say: Say,
                 record: LabRecord | None = None) -> None:
        self.state = state
        self.topo = topo
        self.say = say
        if record is None:
            record = LabRecord(state_path=str(state.path))
            record.nodes = [n.name for n in topo.nodes]
        self.record = record

    def spawn(self, node: str, namespace: str, argv: list[str], kind: str, name: str,
              log: Path, ready_file: Path) -> Pending:
        ready_file.unlink(missing_ok=True)
        popen = spawn_in_namespace(namespace, argv, log, process_env(node))
        process = record_of(popen, kind, name, node)
        self.record.add_process(process)
        return Pending(popen, process, ready_file, log)

    def namespaces(self) -> None:
        for node in self.topo.nodes:
            self.record.add_namespace(node.namespace)  # recorded first: a crash still cleans it
            netns.create_namespace(node.namespace)
        self.record.delay_method = (
            "netem" if netns.netem_available(self.topo.nodes[0].namespace) else "delayline"
        )
        self.record.save()
        if self.record.delay_method == "delayline":
            self.say("kernel has no netem qdisc: delayed links go through userspace delay lines")
            self.record.add_namespace(WIRE_NAMESPACE)
            netns.create_namespace(WIRE_NAMESPACE)

    def links(self) -> list[Pending]:
        pending = []
        for link in self.topo.links:
            if link.delay_ms == 0 or self.record.delay_method == "netem":
                self._direct_link(link)
            else:
                pending.append(self._delayed_link(link))
        return pending

    def _direct_link(self, link: Link) -> None:
        a, b = link.end(link.a), link.end(link.b)
        netns.create_veth(NAMESPACE_PREFIX + a.node, a.ifname,
                          NAMESPACE_PREFIX + b.node, b.ifname, link.mtu)
        if link.delay_ms:
            for end in (a, b):
                netns.add_netem(NAMESPACE_PREFIX + end.node, end.ifname, link.delay_ms)
        for end, peer in ((a, b), (b, a)):
            if self._edge_faces_client(link, peer.node):
                xdp.attach_pass(NAMESPACE_PREFIX + end.node, end.ifname)

    def _edge_faces_client(self, link: Link, node: str) -> bool:
        """Whether `node` is the edge of a client-edge link. An edge refuses with an
        RST sent by XDP_TX, and a veth hands such frames only to a peer that runs XDP
        itself (see edgelab/xdp.py), so the veth facing it gets XDP_PASS."""
        roles = {self.topo.node(n).role for n in (link.a, link.b)}
        return roles == {"client", "edge"} and self.topo.node(node).role == "edge"

    def _delayed_link(self, link: Link) -> Pending:
        wire_ends = []
        for side, end in (("a", link.end(link.a)), ("b", link.end(link.b))):
            wire_if = f"w{link.index}{side}"
            netns.create_veth(NAMESPACE_PREFIX + end.node, end.ifname,
                              WIRE_NAMESPACE, wire_if, link.mtu)
            netns.batch(WIRE_NAMESPACE, [f"link set {wire_if} up"])
            netns.enable_gro(WIRE_NAMESPACE, wire_if)
            if self._edge_faces_client(link, end.node):
                xdp.attach_pass(WIRE_NAMESPACE, wire_if)
            wire_ends.append(wire_if)
        name = f"{link.a}--{link.b}"
        argv = [sys.executable, "-m", "edgelab.delayline", *wire_ends,
                "--delay-ms", str(link.delay_ms),
                "--ready-file", str(node_dir(WIRE_NODE) / f"{name}.ready")]
        return self.spawn(WIRE_NODE, WIRE_NAMESPACE, argv, "delayline", name,
                          node_dir(WIRE_NODE) / f"{name}.log",
                          node_dir(WIRE_NODE) / f"{name}.ready")

    def addressing(self) -> None:
        for node in self.topo.nodes:
            ends = [lk.end(node.name) for lk in self.topo.links_of(node.name)]
            netns.set_sysctls(node.namespace,
                              netns.routing_sysctls(node.forwards, [e.ifname for e in ends]))
            commands = netns.address_commands("lo", [
                netns.host_prefix(a)
                for a in (*node.host_addresses, *node.host_addresses6,
                          *node.local_app_addresses)
            ])
            for end in ends:
                link = self.topo.link_between(end.node, end.peer)
                commands.append(f"address add {end.address}/{link.subnet.prefixlen} "
                                f"dev {end.ifname}")
                if end.address6 is not None and link.subnet6 is not None:
                    commands.append(f"address add {end.address6}/{link.subnet6.prefixlen} "
                                    f"dev {end.ifname} nodad")
                commands.append(f"link set {end.ifname} up")
            netns.batch(node.namespace, commands)
        for node in self.topo.nodes:
            rules = self.topo.rules.get(node.name, ())
            rules6 = [r for r in rules if ":" in r.source]
            netns.batch(node.namespace, [
                *netns.rule_commands(r for r in rules if r not in rules6),
                *netns.route_commands(self.topo.routes.get(node.name, ())),
            ])
            # `ip rule` takes its family from -6, not from the address (`ip route` does).
            netns.batch(node.namespace, netns.rule_commands(rules6), ipv6=True)

    def machines(self) -> list[Pending]:
        pending = []
        for machine in self.state.machines:
            if machine.state == "started":
                pending += self.machine(machine)
        return pending

    def machine(self, machine: Machine) -> list[Pending]:
        """Give one machine its address and start its servers (one per service)."""
        node = self.topo.node(machine.host)
        netns.batch(node.namespace, netns.address_commands("lo", [f"{machine.address}/32"]))
        return [self._machine(node, machine, service)
                for service in self.state.services_of(machine.app)]

    def _machine(self, node: Node, machine: Machine, service: Service) -> Pending:
        name = machine_process_name(machine, service)
        kind = "http" if service.is_http else "whoami"
        ready = machine_dir() / f"{name}.ready"
        argv = [sys.executable, "-m", "edgelab.machines", kind, "--id", machine.id,
                "--region", node.region, "--app", machine.app, "--address", machine.address,
                "--port", str(service.internal_port), "--ready-file", str(ready)]
        return self.spawn(node.name, node.namespace, argv, "machine", name,
                          machine_dir() / f"{name}.log", ready)

    def daemons(self) -> list[Pending]:
        return [self.daemon(node) for node in self.topo.nodes
                if node.role in ("edge", "worker")]

    def daemon(self, node: Node) -> Pending:
        python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
        config = write_daemon_config(node, self.topo, self.state.path)
        argv = [python, "-m", "edgeproxy.daemon", "--config", str(config)]
        return self.spawn(node.name, node.namespace, argv, "daemon", node.name,
                          node_dir(node.name) / "daemon.log", node_dir(node.name) / "ready")


def machine_process_name(machine: Machine, service: Service) -> str:
    return f"{machine.id}:{service.internal_port}"


def daemon_config(node: Node, topo: Topology, state_path: Path) -> dict[str, object]:
    run = node_dir(node.name)
    return {
        "instance": node.name,
        "role": node.role,
        "host_id": node.name,
        "state": {"source": "file", "path": str(state_path)},
        "interfaces": list(topo.interfaces_of(node.name)),
        "metrics": {"listen": DAEMON_METRICS_LISTEN},
        "ready_file": str(run / "ready"),
    }


def write_daemon_config(node: Node, topo: Topology, state_path: Path) -> Path:
    path = node_dir(node.name) / "daemon.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(daemon_config(node, topo, state_path), sort_keys=False))
    (node_dir(node.name) / "ready").unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- health


def lab_namespaces(topo: Topology | None) -> list[str]:
    names = list(topo.namespaces) if topo else []
    return [*names, WIRE_NAMESPACE]


def topology_of(record: LabRecord | None) -> Topology | None:
    """The topology the record's state file describes, else the default one."""
    for path in ([Path(record.state_path)] if record else []) + [DEFAULT_STATE]:
        try:
            return build_topology(load_lab_state(path))
        except (ValueError, OSError):
            continue
    return None


def problems_of(record: LabRecord) -> list[str]:
    present = netns.list_namespaces()
    problems = [f"namespace {ns} missing" for ns in record.namespaces if ns not in present]
    problems += [
        f"{p.kind} {p.name} (pid {p.pid}) not running"
        for p in record.processes if start_time_of(p.pid) != p.start_time
    ]
    if record.phase != "up":
        problems.insert(0, "a previous up did not finish")
    return problems


# ---------------------------------------------------------------- commands


@contextlib.contextmanager
def held_lock(path: Path, timeout_s: float, poll_s: float = READY_POLL_S) -> Iterator[None]:
    """An exclusive flock on `path`, waited for at most `timeout_s` (TimeoutError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held for more than {timeout_s:.0f}s") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    """One up or down at a time (parallel test sessions share the one lab). The
    lock file lives beside the run dir because `down` removes the run dir."""
    try:
        with held_lock(LOCK_FILE, LOCK_TIMEOUT_S):
            yield
    except TimeoutError as exc:
        raise LabError(f"another tools/lab up/down: {exc}") from None


def up(state_path: Path, start_daemons: bool, say: Say = default_say) -> None:
    state = load_lab_state(state_path)
    topo = build_topology(state)
    if _already_up(state, say):
        record = load_record()
        if start_daemons and DAEMON_SOURCE.exists() and record and not any(
                p.kind == "daemon" for p in record.processes):
            say("note: this lab runs without daemons; `tools/lab down` then `up` starts them")
        return
    started = time.monotonic()
    builder = Builder(state, topo, say)
    builder.record.save()
    builder.namespaces()
    pending = builder.links()
    builder.addressing()
    wait_ready(pending, MACHINE_READY_TIMEOUT_S, "delay line")
    wait_ready(builder.machines(), MACHINE_READY_TIMEOUT_S, "machine")
    _start_daemons(builder, start_daemons, say)
    builder.record.phase = "up"
    builder.record.save()
    machines = sum(1 for p in builder.record.processes if p.kind == "machine")
    say(f"up in {time.monotonic() - started:.1f}s: {len(topo.nodes)} nodes, "
        f"{len(topo.links)} links ({builder.record.delay_method}), {machines} machines, "
        f"state {state.path}")


def _already_up(state: LabState, say: Say) -> bool:
    """True when a healthy lab with this state is up; cleans a partial or broken one."""
    record = load_record()
    if record is None:
        leftovers = set(lab_namespaces(build_topology(state))) & netns.list_namespaces()
        if leftovers:
            say(f"removing leftover lab namespaces: {', '.join(sorted(leftovers))}")
            down(say)
        return False
    problems = problems_of(record)
    if not problems and record.state_path == str(state.path):
        say(f"lab is already up (state {record.state_path}); nothing to do")
        return True
    if not problems:
        raise LabError(f"lab is up with another state ({record.state_path}); "
                       "run `tools/lab down` first")
    say(f"rebuilding a lab that is not whole: {'; '.join(problems[:3])}")
    down(say)
    return False


def _start_daemons(builder: Builder, start_daemons: bool, say: Say) -> None:
    if not start_daemons:
        builder.record.notes.append("daemons skipped (--no-daemons)")
        say("daemons not started (--no-daemons)")
    elif not DAEMON_SOURCE.exists():
        builder.record.notes.append(f"daemons skipped: {DAEMON_SOURCE} absent")
        say(f"daemons not started: {DAEMON_SOURCE.relative_to(REPO)} does not exist yet")
    else:
        pending = builder.daemons()
        say(f"waiting for {len(pending)} daemons to be ready (up to {DAEMON_READY_TIMEOUT_S:.0f}s)")
        wait_ready(pending, DAEMON_READY_TIMEOUT_S, "daemon")
    builder.record.save()


# ---------------------------------------------------------------- machines


def _up_record() -> LabRecord:
    record = load_record()
    if record is None or record.phase != "up":
        raise LabError("the lab is not up; run `tools/lab up` first")
    return record


def _running_machines(record: LabRecord) -> dict[str, list[LabProcess]]:
    running: dict[str, list[LabProcess]] = {}
    for process in record.processes:
        if process.kind == "machine" and is_alive(process):
            running.setdefault(process.name.split(":")[0], []).append(process)
    return running


def _stop_machines(record: LabRecord, ids: set[str]) -> None:
    gone = [p for p in record.processes if p.kind == "machine" and p.name.split(":")[0] in ids]
    stop(gone)
    record.processes = [p for p in record.processes if p not in gone]
    record.save()


def _start_machines(record: LabRecord, machines: list[Machine], say: Say) -> None:
    state = load_lab_state(Path(record.state_path))
    builder = Builder(state, build_topology(state), say, record)
    pending = [p for machine in machines for p in builder.machine(machine)]
    wait_ready(pending, MACHINE_READY_TIMEOUT_S, "machine")


def machine_stop(machine_id: str, say: Say = default_say) -> None:
    """Stop one machine's servers (a crash, as far as anyone can tell); state untouched."""
    record = _up_record()
    if machine_id not in _running_machines(record):
        raise LabError(f"machine {machine_id} is not running")
    _stop_machines(record, {machine_id})
    say(f"stopped machine {machine_id}")


def machine_start(machine_id: str, say: Say = default_say) -> None:
    """Start a stopped machine's servers again (whatever its state in the state file)."""
    record = _up_record()
    state = load_lab_state(Path(record.state_path))
    machine = next((m for m in state.machines if m.id == machine_id), None)
    if machine is None:
        raise LabError(f"machine {machine_id} is not in {record.state_path}")
    if machine_id in _running_machines(record):
        say(f"machine {machine_id} is already running")
        return
    _start_machines(record, [machine], say)
    say(f"started machine {machine_id}")


def sync(say: Say = default_say) -> None:
    """Make the running machines match the state file again: start the `started`
    machines that have no server, stop the servers of machines now stopped or gone."""
    record = _up_record()
    state = load_lab_state(Path(record.state_path))
    wanted = {m.id: m for m in state.machines if m.state == "started"}
    running = _running_machines(record)
    extra = set(running) - set(wanted)
    missing = [m for mid, m in wanted.items() if mid not in running]
    _stop_machines(record, extra)
    _start_machines(record, missing, say)
    say(f"sync: started {len(missing)}, stopped {len(extra)} machines")


# ---------------------------------------------------------------- daemons


def _daemon_node(record: LabRecord, node_name: str) -> Node:
    state = load_lab_state(Path(record.state_path))
    node = next((n for n in build_topology(state).nodes if n.name == node_name), None)
    if node is None or node.role not in ("edge", "worker"):
        raise LabError(f"{node_name} is not an edge or worker of this lab")
    if any(note.startswith("daemons skipped") for note in record.notes):
        raise LabError("this lab runs without daemons")
    return node


def daemon_stop(node_name: str, say: Say = default_say) -> None:
    """Stop one node's daemon (SIGTERM, then SIGKILL); its kernel programs stay."""
    record = _up_record()
    _daemon_node(record, node_name)
    mine = [p for p in record.processes if p.kind == "daemon" and p.name == node_name]
    if not any(is_alive(p) for p in mine):
        raise LabError(f"the daemon of {node_name} is not running")
    survivors = stop(mine)
    if survivors:
        raise LabError(f"the daemon of {node_name} (pid {survivors[0].pid}) survived SIGKILL")
    record.processes = [p for p in record.processes if p not in mine]
    record.save()
    say(f"stopped the daemon of {node_name}")


def daemon_start(node_name: str, say: Say = default_say) -> None:
    """Start one node's daemon again (a no-op when it runs) and wait until it is ready.
    A daemon that died or was killed is forgotten first."""
    record = _up_record()
    node = _daemon_node(record, node_name)
    mine = [p for p in record.processes if p.kind == "daemon" and p.name == node_name]
    if any(is_alive(p) for p in mine):
        say(f"the daemon of {node_name} is already running")
        return
    record.processes = [p for p in record.processes if p not in mine]
    record.save()
    state = load_lab_state(Path(record.state_path))
    builder = Builder(state, build_topology(state), say, record)
    started = time.monotonic()
    wait_ready([builder.daemon(node)], DAEMON_READY_TIMEOUT_S, "daemon")
    say(f"started the daemon of {node_name} (ready in {time.monotonic() - started:.1f}s)")


def _orphans(namespaces: list[str]) -> list[LabProcess]:
    """Processes still inside lab namespaces that the record does not know
    (e.g. started by `tools/lab exec`, or spawned just before a crash)."""
    orphans = []
    for namespace in namespaces:
        try:
            pids = netns.run(["ip", "netns", "pids", namespace]).split()
        except netns.NetnsError:
            continue
        for pid in (int(p) for p in pids):
            started = start_time_of(pid)
            if started is not None and pid != os.getpid():
                orphans.append(LabProcess(pid, started, "orphan", str(pid), namespace))
    return orphans


def _remove_pins(nodes: list[str], say: Say) -> None:
    for node in nodes:
        pins = BPF_ROOT / node
        if pins.exists():
            shutil.rmtree(pins, ignore_errors=True)
            say(f"removed pinned objects {pins}")
    if BPF_ROOT.is_dir() and not any(BPF_ROOT.iterdir()):
        BPF_ROOT.rmdir()


def down(say: Say = default_say) -> bool:
    """Remove everything the lab made. True when nothing is left behind."""
    record = load_record()
    topo = topology_of(record)
    recorded = record.processes if record else []
    survivors = stop(recorded)
    present = netns.list_namespaces()
    namespaces = [ns for ns in dict.fromkeys(
        (record.namespaces if record else []) + lab_namespaces(topo)) if ns in present]
    orphans = _orphans(namespaces)
    survivors += stop(orphans)
    for namespace in namespaces:
        try:
            netns.delete_namespace(namespace)
        except netns.NetnsError as exc:
            say(f"WARNING: {exc}")
    nodes = list(dict.fromkeys((record.nodes if record else [])
                               + ([n.name for n in topo.nodes] if topo else [])))
    _remove_pins(nodes, say)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    for process in survivors:
        say(f"WARNING: {process.kind} {process.name} (pid {process.pid}) survived SIGKILL")
    say(f"down: stopped {len(recorded) + len(orphans)} processes, "
        f"removed {len(namespaces)} namespaces")
    return not survivors
