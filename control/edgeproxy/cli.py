"""edgectl: load, inspect and explain the data plane; validate state; run the daemon.

Every listing prints a table, or JSON with ``-o json``. Inspection reads the maps
pinned under /sys/fs/bpf/edgeproxy/<instance>/ and needs no daemon; the instance
comes from --instance, else $EDGEPROXY_INSTANCE, else "default".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TextIO

from . import bpfmaps as bm
from . import introspect as ins
from . import render
from .dataplane import DEFAULT_ATTACH, PIN_ROOT, Dataplane, DataplaneConfig
from .metrics import DEFAULT_LISTEN, http_responses_from_exposition

EXIT_OK = 0
EXIT_NOTHING_FOUND = 1
EXIT_USAGE = 2  # also: missing permissions, a tool missing, a bad file name

EPILOG = """\
exit codes:
  0  ok
  1  nothing found: no pinned maps for the instance, an empty listing, an unknown
     app or machine, an invalid state file (state check) or daemon config
     (config check)
  2  usage error, including missing permissions (reading pinned BPF objects needs
     root: CAP_BPF and CAP_SYS_ADMIN) and missing files
"""
DEFAULT_METRICS_URL = f"http://{DEFAULT_LISTEN}/metrics"
METRICS_TIMEOUT_S = 2.0
DEFAULT_WATCH_COUNT = 3600  # refreshes; --watch stops after these (an hour at 1 s)
MAP_NAMES = sorted(set(bm.EDGE_MAPS) | set(bm.WORKER_MAPS))


class Out:
    """Where a command writes, and in which format."""

    def __init__(self, fmt: str, stream: TextIO) -> None:
        self.json = fmt == "json"
        self.stream = stream

    def emit(self, data: Any, table: Callable[[Any], str]) -> None:
        self.stream.write(render.to_json(data) if self.json else table(data))
        self.stream.flush()


def _fail(message: str, code: int) -> int:
    print(f"edgectl: {message}", file=sys.stderr)
    return code


def _instance(args: argparse.Namespace) -> str:
    return str(args.instance or os.environ.get("EDGEPROXY_INSTANCE") or "default")


def _pin_root(args: argparse.Namespace) -> Path:
    return Path(args.pin_root) if args.pin_root else PIN_ROOT


def _open(args: argparse.Namespace) -> Dataplane:
    return ins.open_dataplane(_instance(args), _pin_root(args))


# ------------------------------------------------------------- lifecycle


def cmd_load(args: argparse.Namespace, out: Out) -> int:
    instance, root = _instance(args), _pin_root(args)
    directory = ins.pin_dir(instance, root)
    pinned = directory.exists() and any(directory.iterdir())
    role = args.role or (ins.detect_role(directory) if pinned else "edge")
    host = args.host_address
    if host is None and pinned:
        host = ins.open_dataplane(instance, root).config.host_address
    if host is None:
        return _fail("load: --host-address is required for a new instance", EXIT_USAGE)
    dp = Dataplane(DataplaneConfig(instance=instance, role=role, host_address=host,
                                   interfaces=tuple(args.iface), attach=args.attach,
                                   pin_root=root))
    try:
        dp.load()
    except PermissionError as exc:
        raise ins.permission_error(directory, f"loading ({exc})") from None
    finally:
        dp.close()
    where = ", ".join(args.iface) or "no interface"
    print(f"loaded {role} instance {instance} (host address {host}) on {where}",
          file=out.stream)
    return EXIT_OK


def cmd_unload(args: argparse.Namespace, out: Out) -> int:
    dp = _open(args)
    directory = dp.config.pin_dir
    attached = [a for p in ins.programs(directory) for a in p.attachments]
    interfaces = tuple(sorted({a.device for a in attached}))
    dp.close()
    config = DataplaneConfig(instance=dp.config.instance, role=dp.config.role,
                             host_address=dp.config.host_address, interfaces=interfaces,
                             xdp_flags=ins.xdp_flags_for(attached), pin_root=dp.config.pin_root)
    Dataplane(config).unload()
    where = ", ".join(interfaces) or "no interface in this network namespace"
    print(f"unloaded instance {config.instance}: detached from {where}; removed {directory}",
          file=out.stream)
    return EXIT_OK


# ------------------------------------------------------------- inspection


def cmd_status(args: argparse.Namespace, out: Out) -> int:
    dp = _open(args)
    c = dp.config
    status = render.status_json(c.instance, c.role, str(c.pin_dir), str(c.host_address),
                                ins.programs(c.pin_dir), ins.describe_maps(dp.maps))
    out.emit(status, render.status_table)
    return EXIT_OK


def cmd_maps_list(args: argparse.Namespace, out: Out) -> int:
    dp = _open(args)
    out.emit(render.maps_json(ins.describe_maps(dp.maps)), render.maps_table)
    return EXIT_OK


def cmd_maps_dump(args: argparse.Namespace, out: Out) -> int:
    dp = _open(args)
    if args.name not in dp.maps:
        return _fail(f"maps dump: no map {args.name!r} in a {dp.config.role} instance "
                     f"(maps: {', '.join(sorted(dp.maps))})", EXIT_USAGE)
    rows = ins.dump_map(dp.maps, args.name, app=args.app, raw=args.raw)
    out.emit(rows, render.rows_table)
    return EXIT_OK if rows else EXIT_NOTHING_FOUND


def cmd_conns(args: argparse.Namespace, out: Out) -> int:
    dp = _open(args)
    if dp.config.role != "edge":
        return _fail("conns: connections are tracked by edge instances", EXIT_USAGE)
    flows = [f for f in dp.flows()
             if (args.app is None or f.app == args.app)
             and (args.machine is None or f.machine == args.machine)]
    out.emit(render.flows_json(flows), render.flows_table)
    return EXIT_OK if flows else EXIT_NOTHING_FOUND


def fetch_http_responses(url: str) -> dict[str, dict[str, int]] | None:
    """HTTP counters from the daemon's metrics endpoint; None when it is not reachable."""
    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return http_responses_from_exposition(text)


def _stats_sample(dp: Dataplane, args: argparse.Namespace) -> Any:
    tcp = ins.app_tcp_totals(dp.read_counters()) if dp.config.role == "edge" else {}
    http = fetch_http_responses(args.metrics_url)
    stats = render.stats_json(dp.config.instance, tcp, http)
    if args.app is not None:
        stats["apps"] = [a for a in stats["apps"] if a["app"] == args.app]
    return stats


def cmd_stats(args: argparse.Namespace, out: Out) -> int:
    dp = _open(args)
    stats = _stats_sample(dp, args)
    if not args.watch:
        out.emit(stats, render.stats_table)
        return EXIT_OK if stats["apps"] else EXIT_NOTHING_FOUND
    for before, after, seconds in _samples(dp, args, stats):
        rates = render.rates_json(before, after, seconds)
        if out.json:
            out.stream.write(json.dumps(rates) + "\n")  # one line per refresh
            out.stream.flush()
        else:
            clear = "\033[H\033[J" if out.stream.isatty() else ""
            out.stream.write(clear + render.rates_table(rates) + "\n")
            out.stream.flush()
    return EXIT_OK


def _samples(dp: Dataplane, args: argparse.Namespace,
             first: Any) -> Iterator[tuple[Any, Any, float]]:
    """(previous, current, seconds between) every --interval, --count times."""
    before, taken = first, time.monotonic()
    for _ in range(args.count):
        time.sleep(args.interval)
        after, now = _stats_sample(dp, args), time.monotonic()
        yield before, after, now - taken
        before, taken = after, now


# ------------------------------------------------------------------ state


def cmd_state_check(args: argparse.Namespace, out: Out) -> int:
    from .state import StateError, load_state

    try:
        state = load_state(args.file)
    except FileNotFoundError:
        return _fail(f"state check: {args.file}: no such file", EXIT_USAGE)
    except StateError as err:
        problems = [{"line": p.line, "path": p.path, "reason": p.reason} for p in err.problems]
        data = {"file": str(args.file), "valid": False, "problems": problems}
        message = str(err) + "\n"
        out.emit(data, lambda _: message)
        return EXIT_NOTHING_FOUND
    summary = {"file": str(args.file), "valid": True, "version": state.version,
               "counts": {"regions": len(state.regions), "hosts": len(state.hosts),
                          "apps": len(state.apps), "services": len(state.services),
                          "machines": len(state.machines)}}
    out.emit(summary, lambda s: f"{s['file']}: valid, version {s['version']}: " + ", ".join(
        f"{n} {k}" for k, n in s["counts"].items()) + "\n")
    return EXIT_OK


def cmd_state_show(args: argparse.Namespace, out: Out) -> int:
    from .config import ConfigError
    from .state import StateError, load_state

    if args.file is None and args.config is None:
        return _fail("state show: give a state FILE or --config DAEMON_CONFIG", EXIT_USAGE)
    try:
        if args.file is not None:
            state, source = load_state(args.file), str(args.file)
        else:
            state, source = _state_of_daemon_config(args.config)
    except FileNotFoundError as exc:
        return _fail(f"state show: {exc.filename}: no such file", EXIT_USAGE)
    except (StateError, ConfigError) as err:
        print(str(err), file=sys.stderr)
        return EXIT_NOTHING_FOUND
    out.emit(render.state_summary_json(state, source), render.state_summary_table)
    return EXIT_OK


def _state_of_daemon_config(path: Path) -> tuple[Any, str]:
    from .config import load_config
    from .sources import make_source

    config = load_config(path)
    source = make_source(config.state)
    try:
        return source.current(), f"{config.state.get('source', 'state')} (from {path})"
    finally:
        source.close()


# ----------------------------------------------------------------- config


def cmd_config_check(args: argparse.Namespace, out: Out) -> int:
    from .config import ConfigError, load_config

    try:
        config = load_config(args.file)
    except FileNotFoundError:
        return _fail(f"config check: {args.file}: no such file", EXIT_USAGE)
    except OSError as exc:
        return _fail(f"config check: {args.file}: {exc.strerror}", EXIT_USAGE)
    except ConfigError as err:  # the daemon refuses to start with these same lines
        problems = [{"line": p.line, "path": p.path, "reason": p.reason} for p in err.problems]
        data = {"file": str(args.file), "valid": False, "problems": problems}
        message = str(err) + "\n"
        out.emit(data, lambda _: message)
        return EXIT_NOTHING_FOUND
    summary = {"file": str(args.file), "valid": True, "instance": config.instance,
               "role": config.role, "host_id": config.host_id,
               "state_source": str(config.state.get("source", "file")),
               "metrics_listen": config.metrics_listen}
    out.emit(summary, lambda s: f"{s['file']}: OK: {s['role']} {s['host_id']} (instance "
             f"{s['instance']}), state from {s['state_source']}, metrics on "
             f"{s['metrics_listen']}\n")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, out: Out) -> int:
    from .daemon import main as daemon_main

    return daemon_main(["--config", str(args.config)])


# ------------------------------------------------------------- completion


def bash_completion(parser: argparse.ArgumentParser, prog: str = "edgectl") -> str:
    """A bash completion script for every command path of ``parser``."""
    words: dict[str, list[str]] = {}
    _collect_words(parser, prog, words)
    entries = "\n".join(f'  ["{path}"]="{" ".join(w)}"' for path, w in sorted(words.items()))
    func = f"_{prog.replace('-', '_')}"
    return f"""# bash completion for {prog}; load with: source <({prog} completion bash)
declare -A {func}_words=(
{entries}
)
{func}() {{
  local path="{prog}" w i
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    if [[ -n "${{{func}_words["$path $w"]+set}}" ]]; then path="$path $w"; fi
  done
  COMPREPLY=($(compgen -W "${{{func}_words["$path"]}}" -- "${{COMP_WORDS[COMP_CWORD]}}"))
}}
complete -F {func} {prog}
"""


def _collect_words(parser: argparse.ArgumentParser, path: str,
                   words: dict[str, list[str]]) -> None:
    found: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(name)
                _collect_words(sub, f"{path} {name}", words)
        elif action.option_strings:
            found.extend(o for o in action.option_strings if o.startswith("--") or
                         len(action.option_strings) == 1)
        elif action.choices:
            found.extend(str(c) for c in action.choices)
    words[path] = found


def cmd_completion(args: argparse.Namespace, out: Out) -> int:
    out.stream.write(bash_completion(build_parser()))
    return EXIT_OK


# ----------------------------------------------------------------- parser


def _common(sub: bool) -> argparse.ArgumentParser:
    """--instance, -o, --pin-root: accepted before and after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if sub else None
    common.add_argument("--instance", default=default,
                        help="pin directory name (default: $EDGEPROXY_INSTANCE or 'default')")
    common.add_argument("-o", "--output", choices=("table", "json"),
                        default=argparse.SUPPRESS if sub else "table", help="output format")
    common.add_argument("--pin-root", default=default,
                        help=f"where instances are pinned (default: {PIN_ROOT})")
    return common


Handler = Callable[[argparse.Namespace, Out], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgectl", description=(__doc__ or "").splitlines()[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_common(False)])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = _common(True)

    def add(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, parents=[sub],
                                                       description=help)
        p.set_defaults(handler=handler)
        return p

    p = add(commands, "load", cmd_load, "compile, load, attach and pin the fast path")
    p.add_argument("--iface", action="append", default=[], metavar="IF",
                   help="interface to attach to (repeat for several)")
    p.add_argument("--role", choices=("edge", "worker"),
                   help="default: the pinned instance's role, else edge")
    p.add_argument("--host-address", type=IPv4Address, metavar="A",
                   help="this host's address (outer IPIP source/destination)")
    p.add_argument("--attach", choices=("tc", "xdp"), default=DEFAULT_ATTACH,
                   help=f"ingress hook (default {DEFAULT_ATTACH}: keeps GSO, see DESIGN.md)")
    add(commands, "unload", cmd_unload, "detach the programs and remove the pins")
    add(commands, "status", cmd_status, "programs (ids, tags, attach points) and maps")

    maps = commands.add_parser("maps", help="list or dump the pinned maps")
    map_commands = maps.add_subparsers(dest="maps_command", required=True, metavar="COMMAND")
    add(map_commands, "list", cmd_maps_list, "every map: type, entries used/max, memory")
    p = add(map_commands, "dump", cmd_maps_dump, "one map's entries, decoded into names")
    p.add_argument("name", choices=MAP_NAMES, metavar="NAME", help=", ".join(MAP_NAMES))
    p.add_argument("--app", help="only entries of this app")
    p.add_argument("--raw", action="store_true", help="add each entry's key and value in hex")

    p = add(commands, "conns", cmd_conns, "live flows: client, app, machine, state, idle")
    p.add_argument("--app", help="only flows of this app")
    p.add_argument("--machine", help="only flows to this machine")

    p = add(commands, "stats", cmd_stats, "per-app counters (HTTP ones from the daemon)")
    p.add_argument("--app", help="only this app")
    p.add_argument("--watch", action="store_true", help="show rates, refreshing")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=int, default=DEFAULT_WATCH_COUNT, metavar="N",
                   help=f"refreshes before --watch stops (default {DEFAULT_WATCH_COUNT})")
    p.add_argument("--metrics-url",
                   default=os.environ.get("EDGEPROXY_METRICS_URL", DEFAULT_METRICS_URL),
                   help=f"the daemon's metrics endpoint (default {DEFAULT_METRICS_URL})")

    state = commands.add_parser("state", help="validate or show cluster state")
    state_commands = state.add_subparsers(dest="state_command", required=True,
                                          metavar="COMMAND")
    p = add(state_commands, "check", cmd_state_check,
            "validate a state file; every problem with its line")
    p.add_argument("file", type=Path, metavar="FILE")
    p = add(state_commands, "show", cmd_state_show,
            "summarise a state file, or the state a daemon config points at")
    p.add_argument("file", type=Path, nargs="?", metavar="FILE")
    p.add_argument("--config", type=Path, help="a daemon config: show the state it follows")

    config = commands.add_parser("config", help="check a daemon config")
    config_commands = config.add_subparsers(dest="config_command", required=True,
                                            metavar="COMMAND")
    p = add(config_commands, "check", cmd_config_check,
            "check a daemon config; every problem with its line and key path")
    p.add_argument("file", type=Path, metavar="FILE")

    p = add(commands, "run", cmd_run, "run the daemon (same as python -m edgeproxy.daemon)")
    p.add_argument("--config", type=Path, required=True, metavar="FILE")
    p = add(commands, "completion", cmd_completion, "print a shell completion script")
    p.add_argument("shell", choices=("bash",))
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Out(args.output, stream or sys.stdout)
    handler: Handler = args.handler
    try:
        return handler(args, out)
    except ins.InspectError as err:
        return _fail(str(err), err.exit_code)
    except PermissionError as err:
        return _fail(f"permission denied: {err}: run as root", EXIT_USAGE)
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
