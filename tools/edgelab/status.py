"""`tools/lab status`: what the lab is, from lab.json and the state file it follows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelab import netns
from edgelab.lab import lab_namespaces, machine_process_name, topology_of
from edgelab.processes import LabProcess, is_alive
from edgelab.rundir import LabRecord, load_record, node_dir
from edgelab.statefile import LabState, load_lab_state
from edgelab.topology import Topology, build_topology

Json = dict[str, Any]


def empty_status() -> Json:
    return {"up": False, "nodes": [], "apps": [], "machines": [], "daemons": []}


def _nodes(topo: Topology) -> list[Json]:
    nodes = []
    for node in topo.nodes:
        interfaces = []
        for link in topo.links_of(node.name):
            end = link.end(node.name)
            interface = {
                "name": end.ifname, "address": f"{end.address}/{link.subnet.prefixlen}",
                "peer": end.peer, "delay_ms": link.delay_ms, "mtu": link.mtu,
            }
            if end.address6 is not None and link.subnet6 is not None:
                interface["address6"] = f"{end.address6}/{link.subnet6.prefixlen}"
            interfaces.append(interface)
        on_lo = [*node.host_addresses, *node.host_addresses6, *node.local_app_addresses]
        nodes.append({
            "name": node.name, "namespace": node.namespace, "role": node.role,
            "region": node.region,
            # One list per family, so "addresses" means what it did before IPv6.
            "addresses": [a for a in on_lo if ":" not in a],
            "addresses6": [a for a in on_lo if ":" in a],
            "interfaces": interfaces,
        })
    return nodes


def _apps(state: LabState) -> list[Json]:
    apps = []
    for app in state.apps:
        services = state.services_of(app.name)
        apps.append({
            "name": app.name,
            "addresses": list(app.addresses),
            "ports": sorted({p for s in services for p in s.ports}),
            "handlers": sorted({h for s in services for h in s.handlers}),
        })
    return apps


def _by_name(record: LabRecord, kind: str) -> dict[str, LabProcess]:
    return {p.name: p for p in record.processes if p.kind == kind}


def _machines(state: LabState, record: LabRecord) -> list[Json]:
    processes = _by_name(record, "machine")
    machines = []
    for machine in state.machines:
        for service in state.services_of(machine.app):
            process = processes.get(machine_process_name(machine, service))
            machines.append({
                "id": machine.id, "app": machine.app, "host": machine.host,
                "address": machine.address, "port": service.internal_port,
                "state": machine.state,
                "pid": process.pid if process else None,
                "alive": bool(process and is_alive(process)),
            })
    return machines


def _daemons(topo: Topology, record: LabRecord) -> list[Json]:
    processes = _by_name(record, "daemon")
    daemons = []
    for node in topo.nodes:
        if node.role not in ("edge", "worker"):
            continue
        process = processes.get(node.name)
        daemons.append({
            "node": node.name,
            "pid": process.pid if process else None,
            "alive": bool(process and is_alive(process)),
            "config": str(node_dir(node.name) / "daemon.yaml"),
            "state_source": {"source": "file", "path": record.state_path},
        })
    return daemons


def lab_status() -> Json:
    record = load_record()
    if record is None:
        status = empty_status()
        # Without a readable record, namespaces by the default plan's names are leftovers.
        present = netns.list_namespaces()
        status["leftover_namespaces"] = [ns for ns in lab_namespaces(topology_of(None))
                                         if ns in present]
        return status
    state = load_lab_state(Path(record.state_path))
    topo = build_topology(state)
    present = netns.list_namespaces()
    up = record.phase == "up" and all(ns in present for ns in record.namespaces)
    return {
        "up": up,
        "phase": record.phase,
        "state_path": record.state_path,
        "delay_method": record.delay_method,
        "namespaces_present": [ns for ns in lab_namespaces(topo) if ns in present],
        "nodes": _nodes(topo),
        "apps": _apps(state),
        "machines": _machines(state, record),
        "daemons": _daemons(topo, record),
        "delay_lines": [
            {"link": p.name, "pid": p.pid, "alive": is_alive(p)}
            for p in record.processes if p.kind == "delayline"
        ],
        "notes": record.notes,
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _alive(pid: int | None, alive: bool) -> str:
    return "-" if pid is None else f"{pid} {'alive' if alive else 'DEAD'}"


def render_human(status: Json) -> str:
    if not status["nodes"]:
        leftovers = status.get("leftover_namespaces")
        if leftovers:
            return f"lab is down, but these namespaces are left: {' '.join(leftovers)} " \
                   "(`tools/lab down` removes them)"
        return "lab is down"
    head = (f"lab is {'up' if status['up'] else 'NOT up (phase ' + status['phase'] + ')'}; "
            f"state {status['state_path']}; delays by {status['delay_method']}")
    nodes = _table(["node", "namespace", "role", "region", "addresses", "links"], [
        [n["name"], n["namespace"], n["role"], n["region"],
         " ".join([*n["addresses"], *n["addresses6"]]),
         " ".join(f"{i['name']}({i['delay_ms']}ms)" for i in n["interfaces"])]
        for n in status["nodes"]
    ])
    apps = _table(["app", "addresses", "ports", "handlers"], [
        [a["name"], " ".join(a["addresses"]), " ".join(map(str, a["ports"])),
         " ".join(a["handlers"]) or "(raw tcp)"]
        for a in status["apps"]
    ])
    machines = _table(["machine", "app", "host", "listen", "pid"], [
        [m["id"], m["app"], m["host"], f"{m['address']}:{m['port']}",
         _alive(m["pid"], m["alive"]) if m["state"] == "started" else m["state"]]
        for m in status["machines"]
    ])
    daemons = _table(["daemon", "pid", "state source"], [
        [d["node"], _alive(d["pid"], d["alive"]),
         f"{d['state_source']['source']}:{d['state_source']['path']}"]
        for d in status["daemons"]
    ])
    notes = "".join(f"\nnote: {n}" for n in status["notes"])
    return f"{head}\n\n{nodes}\n\n{apps}\n\n{machines}\n\n{daemons}{notes}"
