"""Namespaces, veths, addresses, routes and delays, through iproute2.

The lab shells out to `ip`/`tc` (STYLE.md allows it here): one `ip -batch` per
namespace keeps a bring-up to a few dozen processes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Sequence

from edgelab.topology import Route, Rule

COMMAND_TIMEOUT_S = 30


class NetnsError(RuntimeError):
    """An iproute2 command failed; the message has the command and its stderr."""


def run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: timed out after {COMMAND_TIMEOUT_S}s") from exc
    if done.returncode != 0:
        where = f"\n{stdin}" if stdin else ""
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip()}{where}")
    return done.stdout


def list_namespaces() -> set[str]:
    # Lines look like "ep-client (id: 3)" or just "ep-client".
    return {line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line}


def create_namespace(namespace: str) -> None:
    run(["ip", "netns", "add", namespace])
    run(["ip", "-n", namespace, "link", "set", "lo", "up"])


def delete_namespace(namespace: str) -> None:
    run(["ip", "netns", "del", namespace])


def set_sysctls(namespace: str, settings: dict[str, str]) -> None:
    assignments = [f"{key}={value}" for key, value in settings.items()]
    run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *assignments])


def routing_sysctls(forwards: bool, interfaces: Iterable[str]) -> dict[str, str]:
    """rp_filter off everywhere: the fast path's replies come back on another path
    than the requests went, and strict reverse-path checks would drop them."""
    settings = {
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        "net.ipv4.conf.lo.rp_filter": "0",
    }
    settings.update({f"net.ipv4.conf.{name}.rp_filter": "0" for name in interfaces})
    settings["net.ipv4.ip_forward"] = "1" if forwards else "0"
    # No DAD on the links, also for the kernel's own link-local addresses: neighbour
    # discovery needs a usable link-local source, and a point-to-point veth has no
    # duplicate to find (the lab's own IPv6 addresses are added `nodad`).
    settings.update({f"net.ipv6.conf.{name}.accept_dad": "0" for name in interfaces})
    return settings


def create_veth(ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int) -> None:
    """A veth pair made directly inside its two namespaces (never in the host's)."""
    run([
        "ip", "link", "add", if_a, "netns", ns_a, "mtu", str(mtu), "type", "veth",
        "peer", "name", if_b, "netns", ns_b, "mtu", str(mtu),
    ])


def batch(namespace: str, commands: Iterable[str], ipv6: bool = False) -> None:
    lines = "\n".join(commands)
    if lines:
        family = ["-6"] if ipv6 else []
        run(["ip", "-n", namespace, *family, "-batch", "-"], stdin=lines + "\n")


def host_prefix(address: str) -> str:
    """`198.18.0.2` -> `198.18.0.2/32`, `fd00::2` -> `fd00::2/128`."""
    return f"{address}/128" if ":" in address else f"{address}/32"


def address_commands(dev: str, addresses: Iterable[str]) -> list[str]:
    # replace, not add: idempotent, so a machine restarted by `sync` can reuse its address.
    # IPv6 ones skip duplicate address detection: usable at once, no tentative phase.
    return [f"address replace {a} dev {dev}" + (" nodad" if ":" in a else "")
            for a in addresses]


def route_commands(routes: Iterable[Route]) -> list[str]:
    commands = []
    for r in routes:
        table = f" table {r.table}" if r.table is not None else ""
        commands.append(f"route add {r.destination} via {r.via} dev {r.dev} src {r.src}{table}")
    return commands


def rule_commands(rules: Iterable[Rule]) -> list[str]:
    # Priority below main's (32766) so the source rule wins.
    return [f"rule add from {r.source} lookup {r.table} priority {r.table}" for r in rules]


def netem_available(namespace: str) -> bool:
    """Whether the running kernel has netem (some built without it, e.g. microVMs)."""
    probe = ["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"]
    try:
        run(probe)
    except NetnsError:
        return False
    run(["tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root"])
    return True


def add_netem(namespace: str, dev: str, delay_ms: int) -> None:
    # limit: netem's default 1000 packets is too small for a 140 ms bulk transfer.
    run([
        "tc", "-n", namespace, "qdisc", "add", "dev", dev, "root",
        "netem", "delay", f"{delay_ms}ms", "limit", "100000",
    ])


def enable_gro(namespace: str, dev: str) -> None:
    """GRO turns on NAPI on a veth, which is what lets its peer XDP_TX/XDP_REDIRECT
    frames into it; the wire's veths must accept what a direct peer would."""
    run(["ip", "netns", "exec", namespace, "ethtool", "-K", dev, "gro", "on"])


def enter_argv(namespace: str, argv: list[str]) -> list[str]:
    """argv run inside `namespace`'s network only (nsenter execs it: same pid).

    Not `ip netns exec`: that also gives the command a fresh /sys, where bpffs is
    not mounted, so pinned maps under /sys/fs/bpf would be out of its reach.
    """
    return ["nsenter", f"--net=/run/netns/{namespace}", "--", *argv]
