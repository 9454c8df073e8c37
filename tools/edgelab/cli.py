"""tools/lab: up, down, status, sync, machine, daemon, exec."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgelab import netns
from edgelab.lab import (
    DEFAULT_STATE,
    LabError,
    daemon_start,
    daemon_stop,
    down,
    lab_lock,
    machine_start,
    machine_stop,
    sync,
    topology_of,
    up,
)
from edgelab.rundir import load_record
from edgelab.statefile import StateFileError
from edgelab.status import lab_status, render_human
from edgelab.topology import TopologyError, namespace_of

# Like env(1) and container runtimes: 125 means exec itself failed, so a
# command's own exit status (1, 2, ...) is never mistaken for a lab problem.
EXEC_FAILED = 125


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/lab", description="The edgeproxy namespace lab.")
    commands = parser.add_subparsers(dest="command", required=True)
    up_cmd = commands.add_parser("up", help="build the lab (a no-op when it is already up)")
    up_cmd.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help=f"cluster state file (default {DEFAULT_STATE})")
    up_cmd.add_argument("--no-daemons", action="store_true",
                        help="do not start the edgeproxy daemons on edges and workers")
    commands.add_parser("down", help="remove everything the lab made")
    status_cmd = commands.add_parser("status", help="what is up")
    status_cmd.add_argument("-o", "--output", choices=("table", "json"), default="table")
    commands.add_parser("sync", help="start/stop machines to match the state file again")
    machine_cmd = commands.add_parser("machine", help="stop or start one machine's servers")
    machine_cmd.add_argument("action", choices=("stop", "start"))
    machine_cmd.add_argument("machine_id")
    daemon_cmd = commands.add_parser("daemon", help="stop or start one node's daemon")
    daemon_cmd.add_argument("action", choices=("stop", "start"))
    daemon_cmd.add_argument("node")
    exec_cmd = commands.add_parser("exec", help="run a command in a node's namespace")
    exec_cmd.add_argument("node")
    exec_cmd.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    return parser


def _need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces); run it with sudo")


def cmd_exec(node: str, cmd: list[str]) -> int:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("tools/lab exec: no command (usage: tools/lab exec NODE -- CMD...)", file=sys.stderr)
        return EXEC_FAILED
    record = load_record()
    topo = topology_of(record)
    nodes = record.nodes if record else ([n.name for n in topo.nodes] if topo else [])
    if node not in nodes:
        print(f"tools/lab exec: unknown node {node!r} (nodes: {', '.join(nodes)})",
              file=sys.stderr)
        return EXEC_FAILED
    namespace = namespace_of(node)
    if namespace not in netns.list_namespaces():
        print(f"tools/lab exec: {namespace} does not exist; is the lab up?", file=sys.stderr)
        return EXEC_FAILED
    env = {**os.environ, "EDGEPROXY_INSTANCE": node}
    argv = netns.enter_argv(namespace, cmd)
    os.execvpe(argv[0], argv, env)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command != "status":  # status only reads; everything else changes namespaces
            _need_root()
        if args.command == "up":
            with lab_lock():
                up(args.state, start_daemons=not args.no_daemons)
            return 0
        if args.command == "down":
            with lab_lock():
                return 0 if down() else 1
        if args.command == "sync":
            with lab_lock():
                sync()
            return 0
        if args.command == "machine":
            with lab_lock():
                (machine_stop if args.action == "stop" else machine_start)(args.machine_id)
            return 0
        if args.command == "daemon":
            with lab_lock():
                (daemon_stop if args.action == "stop" else daemon_start)(args.node)
            return 0
        if args.command == "status":
            status = lab_status()
            print(json.dumps(status, indent=2) if args.output == "json" else render_human(status))
            return 0
        return cmd_exec(args.node, args.cmd)
    except (LabError, StateFileError, TopologyError, netns.NetnsError) as exc:
        print(f"[lab] {args.command} failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"[lab] {args.command} interrupted", file=sys.stderr)
    record = load_record()
    if args.command == "up" and record is not None and record.phase != "up":
        print("[lab] the partial lab is recorded; `tools/lab down` removes it", file=sys.stderr)
    return EXEC_FAILED if args.command == "exec" else 1
