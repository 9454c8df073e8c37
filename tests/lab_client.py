"""Lab traffic for the fast-path and state tests: a client driver, kernel counters,
waits on the edge daemon, and state edits.

`ClientDriver` runs one asyncio process in the client namespace that keeps
connections to app `echo` (198.19.1.1:7) open between commands, so a test can
change the lab while they live. Commands are JSON lines; every operation inside it
is bounded by a timeout, and every reply is awaited with one.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import DEFAULT_STATE, LabHandle

ECHO_VIP = "198.19.1.1"
VIA_ORD = "198.18.0.2"  # the client address routed through edge-ord
MIB = 1 << 20
RUN_DIR = Path("/run/edgeproxy-lab")
REPLY_TIMEOUT_S = 30.0
DRIVER_TIMEOUT_S = 10.0  # each connect / read inside the driver

DRIVER = r"""
import asyncio, json, os, socket, struct, sys, time

VIP, PORT = "198.19.1.1", 7
T = float(sys.argv[1])
CHUNK = 65536
conns = []


def outcome(exc):
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


async def connect(source):
    r, w = await asyncio.wait_for(
        asyncio.open_connection(VIP, PORT, local_addr=(source, 0)), T)
    try:
        line = await asyncio.wait_for(r.readline(), T)
    except BaseException:
        w.close()
        raise
    if not line.endswith(b"\n"):
        w.close()
        raise ConnectionResetError("closed before the greeting")
    return {"r": r, "w": w, "greeting": line.decode(),
            "port": w.get_extra_info("sockname")[1]}


def public(c):
    return {"greeting": c["greeting"], "port": c["port"]}


async def op_open(n, source):
    got = await asyncio.gather(*(connect(source) for _ in range(n)), return_exceptions=True)
    new = [g for g in got if not isinstance(g, BaseException)]
    conns.extend(new)
    return {"conns": [public(c) for c in new],
            "errors": [outcome(g) for g in got if isinstance(g, BaseException)]}


async def op_try(source):
    started = time.monotonic()
    try:
        c = await connect(source)
    except Exception as exc:
        return {"outcome": outcome(exc), "seconds": time.monotonic() - started}
    c["w"].close()
    return {"outcome": "ok", "seconds": time.monotonic() - started, **public(c)}


async def echo_one(c, size):
    payload = os.urandom(size)

    async def send():
        for at in range(0, size, CHUNK):
            c["w"].write(payload[at:at + CHUNK])
            await c["w"].drain()

    sender = asyncio.create_task(send())  # send and read at once: no deadlock on big sizes
    try:
        back = await asyncio.wait_for(c["r"].readexactly(size), T)
        await asyncio.wait_for(sender, T)
    finally:
        sender.cancel()
    if back != payload:
        raise ValueError("echoed bytes differ")


def tcp_info(c):
    # struct tcp_info: tcpi_bytes_sent at 200, tcpi_bytes_retrans at 208 (Linux >= 4.19)
    sock = c["w"].get_extra_info("socket")
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return struct.unpack_from("=QQ", raw, 200)


async def op_echo(size, limit, batch):
    live = list(conns)
    gate = asyncio.Semaphore(batch)

    async def one(c):
        async with gate:
            await echo_one(c, size)

    got = await asyncio.wait_for(
        asyncio.gather(*(one(c) for c in live), return_exceptions=True), limit)
    info = [tcp_info(c) for c in live]
    return {"echoed": len(live), "bytes_sent": sum(i[0] for i in info),
            "bytes_retrans": sum(i[1] for i in info),
            "bad": [{"port": c["port"], "error": outcome(g)}
                    for c, g in zip(live, got) if isinstance(g, BaseException)]}


async def close_one(c):
    c["w"].write_eof()
    rest = await asyncio.wait_for(c["r"].read(), T)  # the machine closes after our FIN
    c["w"].close()
    return rest


async def op_close():
    got = await asyncio.gather(*(close_one(c) for c in conns), return_exceptions=True)
    conns.clear()
    return {"errors": [outcome(g) for g in got if isinstance(g, BaseException)],
            "unexpected_bytes": sum(len(g) for g in got if isinstance(g, bytes))}


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ops = {"open": op_open, "try": op_try, "echo": op_echo, "close": op_close}
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            reply = await ops[op](**cmd)
        except Exception as exc:
            reply = {"failed": f"{op}: {outcome(exc)}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    for c in conns:
        c["w"].close()


asyncio.run(main())
"""


class ClientDriver:
    """The driver process in the client namespace; a context manager that always
    stops it. `call(op, **args)` sends one command and returns its reply."""

    def __init__(self, lab: LabHandle, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("w")
        self.proc = lab.popen("client", sys.executable, "-c", DRIVER, str(DRIVER_TIMEOUT_S),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=self._stderr)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def call(self, op: str, timeout: float = REPLY_TIMEOUT_S, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"client driver: no reply to {op} in {timeout}s; "
                                 f"stderr: {self.stderr_path.read_text()[-2000:]}") from None
        reply: dict[str, Any] = json.loads(line)
        assert "failed" not in reply, reply["failed"]
        return reply

    def __enter__(self) -> ClientDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=5)
        finally:
            self._stderr.close()


def machine_of(greeting: str) -> str:
    """`echo-ord-1 ord\\n` -> `echo-ord-1`."""
    return greeting.split()[0]


def region_of(greeting: str) -> str:
    return greeting.split()[1]


# ---------------------------------------------------------------- the edge's kernel state

COUNTERS = r"""
import dataclasses, json
from ipaddress import IPv4Address
from edgeproxy.dataplane import Dataplane, DataplaneConfig
dp = Dataplane(DataplaneConfig(instance="edge-ord", role="edge",
                               host_address=IPv4Address("198.18.0.11")))
dp.adopt()
try:
    c = dp.read_counters()
    names = {m.machine for m in c.machines}
    print(json.dumps({
        "machines": {n: dataclasses.asdict(c.machine(n)) for n in names},
        "services": {s.service: dataclasses.asdict(s) for s in c.services},
        "flows": [{"client": str(f.client), "port": f.client_port, "machine": f.machine,
                   "state": f.state, "age_seconds": f.age, "idle_seconds": f.idle,
                   "bytes_in": f.bytes_in, "bytes_out": f.bytes_out,
                   "packets_in": f.packets_in, "packets_out": f.packets_out}
                  for f in dp.flows()],
    }))
finally:
    dp.close()
"""


def edge_ord_kernel(lab: LabHandle) -> dict[str, Any]:
    """edge-ord's counters (per machine, per service) and flows, read from the pinned
    maps (the same reader `edgectl` uses), so it works with the daemon dead too."""
    done = lab.python("edge-ord", COUNTERS)
    assert done.returncode == 0, done.stderr
    kernel: dict[str, Any] = json.loads(done.stdout)
    return kernel


def delta(before: dict[str, Any], after: dict[str, Any], machine: str, field: str) -> int:
    old = before["machines"].get(machine, {}).get(field, 0)
    new: int = after["machines"].get(machine, {}).get(field, 0)
    return new - old


def wait_until(what: str, check: Callable[[], Any], timeout_s: float,
               every_s: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what} (last: {got!r})")
        time.sleep(every_s)


# ---------------------------------------------------------------- the edge daemon

def daemon_log(node: str = "edge-ord") -> Path:
    return RUN_DIR / node / "daemon.log"


def log_size(node: str = "edge-ord") -> int:
    return daemon_log(node).stat().st_size


def log_since(offset: int, node: str = "edge-ord") -> str:
    with daemon_log(node).open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def wait_synced(offset: int, node: str = "edge-ord", timeout_s: float = 5.0) -> None:
    """Wait until the daemon wrote its kernel maps after `offset` in its log."""
    wait_until(f"{node} daemon syncs its maps",
               lambda: "kernel maps synced" in log_since(offset, node), timeout_s)


def write_state_and_wait(lab: LabHandle, text: str) -> None:
    """`lab.write_state` (machines follow), then wait for edge-ord to apply it."""
    offset = log_size()
    lab.write_state(text)
    wait_synced(offset)


# ---------------------------------------------------------------- state edits

def default_state() -> str:
    return DEFAULT_STATE.read_text()


def set_machine_state(text: str, machine: str, state: str) -> str:
    pattern = re.compile(r"(\{id: %s, .*state: )\w+" % re.escape(machine))
    new, count = pattern.subn(lambda m: m.group(1) + state, text)
    assert count == 1, f"machine {machine} not found once in the state"
    return new


def remove_machine(text: str, machine: str) -> str:
    lines = [ln for ln in text.splitlines(keepends=True) if f"{{id: {machine}," not in ln]
    assert len(lines) == len(text.splitlines()) - 1, f"machine {machine} not found once"
    return "".join(lines)


def add_machine_after(text: str, after: str, line: str) -> str:
    """Insert a machine line (`  - {id: ...}`) after the line of machine `after`."""
    out, found = [], False
    for ln in text.splitlines(keepends=True):
        out.append(ln)
        if f"{{id: {after}," in ln:
            out.append(line + "\n")
            found = True
    assert found, f"machine {after} not in the state"
    return "".join(out)
