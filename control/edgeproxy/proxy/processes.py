"""Several HTTP processes on one host: the daemon's supervisor and the child side.

The daemon process is HTTP process 0: it keeps state, health, placement and the
kernel maps, and serves HTTP itself, as with one process. Processes 1..N-1 are
children (``python -m edgeproxy.proxy.processes``) that open the same listeners
with SO_REUSEPORT. Each child has two socketpairs to the daemon:

- *updates* (daemon → child): length-prefixed pickles. First the whole routing
  view (``Init``: settings, role, every ServiceTable, hostnames, backhaul peers),
  then only what changed (``Update``: tables placed again, ids removed, the
  hostname map when it changed, the backhaul allowlist when it changed). The
  child answers once, ``("ready", pid)``, when it serves; EOF either way ends it.
- *stats* (request/response): the daemon's scrape thread asks for a
  ``ProxySnapshot``; ``merge_snapshots`` sums them into one /metrics.

Per-machine in-flight counts live in the shared segment (``_shared.pyx``), one
column per process. When a child dies, the supervisor gives back the slots of
its column (``SharedBudgets.reap``) and starts a replacement at once; the other
processes' connections never notice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeproxy.proxy._shared import SharedBudgets
from edgeproxy.proxy.backhaul import BackhaulHealth
from edgeproxy.proxy.routes import HTTP_HANDLER
from edgeproxy.proxy.server import HttpProxy, ProxySettings
from edgeproxy.proxy.stats import ProxySnapshot
from edgeproxy.routing import ServiceTable

log = logging.getLogger("edgeproxy.processes")

FRAME = struct.Struct("!I")
BUDGET_ROWS = 1 << 19  # machines with HTTP traffic a host can count (rows are never freed)
STATS_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 5.0
RESTART_BACKOFF_S = (0.0, 0.1, 0.5, 1.0)  # after 0, 1, 2, 3+ quick crashes in a row


@dataclass(frozen=True, slots=True)
class Init:
    role: str
    region: str
    host_addresses: tuple[str, ...]
    backhaul_port: int
    settings: ProxySettings
    tables: Sequence[ServiceTable]
    hostnames: Mapping[str, str]
    peers: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class Update:
    tables: Sequence[ServiceTable] = ()  # placed again (new or changed)
    removed: Sequence[str] = ()  # service ids gone
    hostnames: Mapping[str, str] | None = None  # None: unchanged
    peers_changed: bool = False
    peers: frozenset[str] | None = None


def frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at EOF."""
    try:
        head = await reader.readexactly(FRAME.size)
        (size,) = FRAME.unpack(head)
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("stats socket closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------- metrics


def merge_snapshots(snapshots: Sequence[ProxySnapshot]) -> ProxySnapshot:
    """One host's counters from every process's: counts and gauges add up;
    histograms add bucket by bucket; a backhaul is up if any process has it up."""
    if len(snapshots) == 1:
        return snapshots[0]

    def add(maps: Iterable[Mapping[Any, Any]]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for m in maps:
            for key, value in m.items():
                out[key] = out.get(key, 0) + value
        return out

    buckets: dict[str, list[tuple[float, int]]] = {}
    for snap in snapshots:
        for app, cumulative in snap.response_seconds.items():
            have = buckets.get(app)
            if have is None:
                buckets[app] = list(cumulative)
            else:
                buckets[app] = [(b, n + m) for (b, n), (_, m) in zip(have, cumulative, strict=True)]
    backhaul: dict[str, BackhaulHealth] = {}
    for snap in snapshots:
        for address, h in snap.backhaul.items():
            was = backhaul.get(address)
            if was is None:
                backhaul[address] = h
                continue
            states = {was.state, h.state}
            rtts = [r for r in (was.rtt_seconds, h.rtt_seconds) if r is not None]
            backhaul[address] = BackhaulHealth(
                worker=was.worker,
                state="up" if "up" in states else ("down" if "down" in states else "idle"),
                rtt_seconds=min(rtts) if rtts else None,
                open_streams=was.open_streams + h.open_streams,
                connects=was.connects + h.connects,
                failures=was.failures + h.failures,
            )
    # Every other field is a count or a map of counts (fields added later too).
    values: dict[str, Any] = {"response_seconds": {a: tuple(b) for a, b in buckets.items()},
                              "backhaul": backhaul}
    for f in dataclasses.fields(ProxySnapshot):
        if f.name in values:
            continue
        parts = [getattr(snap, f.name) for snap in snapshots]
        values[f.name] = add(parts) if isinstance(parts[0], Mapping) else sum(parts)
    return ProxySnapshot(**values)


class HostSnapshots:
    """The collector's proxy: this process's snapshot (taken on its loop) plus every
    child's (asked over its stats socket), summed. Called from the scrape thread."""

    def __init__(
        self, proxy: HttpProxy, supervisor: ProcessSupervisor, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.proxy = proxy
        self.supervisor = supervisor
        self.loop = loop

    def _own(self) -> ProxySnapshot:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop or self.loop.is_closed():
            return self.proxy.snapshot()
        return asyncio.run_coroutine_threadsafe(self._take(), self.loop).result(STATS_TIMEOUT_S)

    async def _take(self) -> ProxySnapshot:
        return self.proxy.snapshot()

    def snapshot(self) -> ProxySnapshot:
        return merge_snapshots([self._own(), *self.supervisor.snapshots()])


# ------------------------------------------------------------ supervisor


@dataclass(slots=True)
class Child:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None  # updates, once Init is queued
    stats: socket.socket | None = None
    stats_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: asyncio.Future[float] | None = None
    reader_task: asyncio.Task[None] | None = None
    pending: list[bytes] | None = None  # Updates published while its Init is pickled
    pid: int = 0
    started: float = 0.0
    restarts: int = 0


class ProcessSupervisor:
    """Starts HTTP processes 1..count-1, feeds them the routing view, restarts any
    that dies (after giving back its slots)."""

    def __init__(
        self,
        count: int,
        *,
        budgets: SharedBudgets,
        role: str,
        region: str,
        host_addresses: Sequence[str],
        backhaul_port: int,
        settings: ProxySettings,
    ) -> None:
        self.count = count
        self.budgets = budgets
        self._spec = (role, region, tuple(host_addresses), backhaul_port, settings)
        self._tables: dict[str, ServiceTable] = {}  # HTTP services only: all a child routes
        self._hostnames: Mapping[str, str] = {}
        self._peers: frozenset[str] | None = None
        self._children = [Child(i) for i in range(1, count)]
        self._tasks: list[asyncio.Task[None]] = []
        self._init: tuple[int, bytes] | None = None  # (view version, pickled Init)
        self._version = 0
        self._stopping = False
        self.restarts = 0
        self.reaped = 0

    # -- the routing view ------------------------------------------------------
    def publish(
        self,
        tables: Iterable[ServiceTable] = (),
        removed: Iterable[str] = (),
        hostnames: Mapping[str, str] | None = None,
        peers: Iterable[str] | bool | None = False,
    ) -> None:
        """Record a change and send it to every running child. ``peers=False``
        leaves the backhaul allowlist as it is."""
        changed, gone = [], [sid for sid in removed if sid in self._tables]
        for t in tables:
            if HTTP_HANDLER in t.handlers:
                changed.append(t)
            elif t.service_id in self._tables:
                gone.append(t.service_id)  # no longer HTTP: a child forgets it
        for sid in gone:
            self._tables.pop(sid, None)
        for t in changed:
            self._tables[t.service_id] = t
        if hostnames is not None:
            self._hostnames = dict(hostnames)
        peers_changed = peers is not False
        if peers_changed:
            self._peers = None if isinstance(peers, bool) or peers is None else frozenset(peers)
        if not (changed or gone or hostnames is not None or peers_changed):
            return
        self._version += 1
        data = frame(Update(changed, gone, hostnames, peers_changed, self._peers))
        for child in self._children:
            if child.pending is not None:
                child.pending.append(data)
            elif child.writer is not None and not child.writer.is_closing():
                child.writer.write(data)

    def publish_tables(self, tables: Iterable[ServiceTable], hostnames: Mapping[str, str]) -> None:
        """A whole set of tables (a full apply): only the difference travels."""
        new = {t.service_id: t for t in tables if HTTP_HANDLER in t.handlers}
        changed = [t for sid, t in new.items() if self._tables.get(sid) != t]
        removed = [sid for sid in self._tables if sid not in new]
        self.publish(changed, removed, hostnames if hostnames != self._hostnames else None)

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, timeout_s: float = 30.0) -> None:
        """Start every child and wait until each serves."""
        for child in self._children:
            await self._spawn(child)
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch(child)))
        for child in self._children:
            assert child.ready is not None
            await asyncio.wait_for(asyncio.shield(child.ready), timeout_s)

    async def _spawn(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        updates, updates_child = socket.socketpair()
        stats, stats_child = socket.socketpair()
        budgets_fd = self.budgets.fd
        try:
            child.started = time.monotonic()
            child.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgeproxy.proxy.processes",
                "--updates", str(updates_child.fileno()), "--stats", str(stats_child.fileno()),
                "--budgets", str(budgets_fd), "--process", str(child.index),
                pass_fds=(updates_child.fileno(), stats_child.fileno(), budgets_fd),
            )
        except BaseException:
            for s in (updates, updates_child, stats, stats_child):
                s.close()
            raise
        updates_child.close()
        stats_child.close()
        child.pid = child.process.pid
        stats.settimeout(STATS_TIMEOUT_S)
        child.stats = stats
        reader, writer = await asyncio.open_unix_connection(sock=updates)
        child.ready = loop.create_future()
        # The Init is the view as of now; Updates published while it is pickled (in
        # a thread: seconds at 100,000s of services) wait in `pending` and follow it,
        # through this one writer, in order.
        child.pending = []
        try:
            writer.write(await self._init_frame())
            for update in child.pending:
                writer.write(update)
        finally:
            child.pending = None
        child.writer = writer
        child.reader_task = loop.create_task(self._await_ready(child, reader))
        log.info("http process %d started: pid %d", child.index, child.pid)

    async def _init_frame(self) -> bytes:
        """The pickled Init of the current view (one pickle for every child that
        starts before the view changes)."""
        cached = self._init
        if cached is not None and cached[0] == self._version:
            return cached[1]
        version = self._version
        role, region, addresses, port, settings = self._spec
        init = Init(role, region, addresses, port, settings, list(self._tables.values()),
                    self._hostnames, self._peers)
        data = await asyncio.to_thread(frame, init)
        self._init = (version, data)
        return data

    async def _await_ready(self, child: Child, reader: asyncio.StreamReader) -> None:
        message = await read_frame(reader)
        ready = child.ready
        if ready is None or ready.done():
            return
        if isinstance(message, tuple) and message[:1] == ("ready",):
            took = time.monotonic() - child.started
            log.info("http process %d ready: pid %d in %.2fs", child.index, child.pid, took)
            ready.set_result(took)
        else:
            ready.set_exception(RuntimeError(f"http process {child.index} ended before ready"))
        # Keep reading until EOF so the pipe never fills (children send nothing else).
        while await read_frame(reader) is not None:
            pass

    async def _watch(self, child: Child) -> None:
        quick = 0
        while True:
            assert child.process is not None
            code = await child.process.wait()
            self._close_child(child)
            if self._stopping:
                return
            freed = self.budgets.reap(child.index)
            self.reaped += freed
            lived = time.monotonic() - child.started
            log.warning("http process %d (pid %d) exited with %s after %.1fs; "
                        "gave back %d slots; restarting", child.index, child.pid, code,
                        lived, freed)
            quick = quick + 1 if lived < 5.0 else 0
            await asyncio.sleep(RESTART_BACKOFF_S[min(quick, len(RESTART_BACKOFF_S) - 1)])
            if self._stopping:
                return
            child.restarts += 1
            self.restarts += 1
            await self._spawn(child)

    def _close_child(self, child: Child) -> None:
        if child.writer is not None:
            child.writer.close()
            child.writer = None
        if child.stats is not None:
            with child.stats_lock:
                child.stats.close()
                child.stats = None
        if child.ready is not None and not child.ready.done():
            child.ready.set_exception(RuntimeError(f"http process {child.index} exited"))
            child.ready.exception()  # retrieved: nobody may be waiting

    def pids(self) -> dict[int, int]:
        """Process index -> pid of every running child."""
        return {c.index: c.pid for c in self._children
                if c.process is not None and c.process.returncode is None}

    def snapshots(self) -> list[ProxySnapshot]:
        """Every ready child's snapshot (blocking: from the scrape thread). A child
        that does not answer is left out of this scrape."""
        out = []
        for child in self._children:
            ready = child.ready
            if ready is None or not ready.done() or ready.exception() is not None:
                continue
            with child.stats_lock:
                sock = child.stats
                if sock is None:
                    continue
                try:
                    sock.sendall(b"S")
                    (size,) = FRAME.unpack(_recv_exactly(sock, FRAME.size))
                    snap = pickle.loads(_recv_exactly(sock, size))
                except (OSError, ConnectionError) as exc:
                    log.warning("http process %d: no snapshot: %s", child.index, exc)
                    continue
            if isinstance(snap, ProxySnapshot):
                out.append(snap)
        return out

    async def stop(self) -> None:
        self._stopping = True
        procs = [c.process for c in self._children
                 if c.process is not None and c.process.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for child in self._children:
            self._close_child(child)


# ------------------------------------------------------------------ child


class ChildView:
    """A child's copy of the routing view, kept by applying Updates."""

    def __init__(self, init: Init) -> None:
        self.tables = {t.service_id: t for t in init.tables}
        self.hostnames: Mapping[str, str] = init.hostnames

    def apply(self, update: Update) -> bool:
        """Apply an update; True when the HTTP routes must be rebuilt."""
        rebuild = update.hostnames is not None
        for sid in update.removed:
            old = self.tables.pop(sid, None)
            rebuild = rebuild or (old is not None and bool(old.handlers))
        for t in update.tables:
            old = self.tables.get(t.service_id)
            rebuild = rebuild or bool(t.handlers) or (old is not None and bool(old.handlers))
            self.tables[t.service_id] = t
        if update.hostnames is not None:
            self.hostnames = update.hostnames
        return rebuild

    def sorted_tables(self) -> list[ServiceTable]:
        return [self.tables[sid] for sid in sorted(self.tables)]


async def _serve_stats(proxy: HttpProxy, sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    while True:
        request = await reader.read(1)
        if not request:
            return
        writer.write(frame(proxy.snapshot()))
        await writer.drain()


async def child_main(updates_fd: int, stats_fd: int, budgets_fd: int, process: int) -> None:
    updates = socket.socket(fileno=updates_fd)
    stats = socket.socket(fileno=stats_fd)
    reader, writer = await asyncio.open_unix_connection(sock=updates)
    init = await read_frame(reader)
    if not isinstance(init, Init):
        raise SystemExit("http process: no Init from the daemon")
    budgets = SharedBudgets(budgets_fd, process)
    proxy = HttpProxy(role=init.role, region=init.region, host_addresses=init.host_addresses,
                      backhaul_port=init.backhaul_port, settings=init.settings, shared=budgets)
    view = ChildView(init)
    proxy.allow_backhaul_from(init.peers)
    proxy.update(view.sorted_tables(), view.hostnames)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await proxy.start()
    await proxy.sync_listeners()
    stats_task = loop.create_task(_serve_stats(proxy, stats))
    writer.write(frame(("ready", os.getpid())))

    async def follow() -> None:
        while True:
            message = await read_frame(reader)
            if message is None:
                return  # the daemon is gone
            if isinstance(message, Update):
                if message.peers_changed:
                    proxy.allow_backhaul_from(message.peers)
                if view.apply(message):
                    proxy.update(view.sorted_tables(), view.hostnames)

    follower = loop.create_task(follow())
    stopper = loop.create_task(stopping.wait())
    try:
        await asyncio.wait([follower, stopper], return_when=asyncio.FIRST_COMPLETED)
        if follower.done():
            follower.result()
    finally:
        for task in (follower, stopper, stats_task):
            task.cancel()
        await asyncio.gather(follower, stopper, stats_task, return_exceptions=True)
        await proxy.stop()
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy.proxy.processes")
    parser.add_argument("--updates", type=int, required=True)
    parser.add_argument("--stats", type=int, required=True)
    parser.add_argument("--budgets", type=int, required=True)
    parser.add_argument("--process", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(name)s[{os.getpid()}] %(levelname)s %(message)s")
    _die_with_parent()
    from edgeproxy.proxy import new_event_loop

    loop = new_event_loop()
    try:
        loop.run_until_complete(child_main(args.updates, args.stats, args.budgets, args.process))
    finally:
        loop.close()
    return 0


def _die_with_parent() -> None:
    """SIGTERM when the daemon dies, even by SIGKILL (PR_SET_PDEATHSIG); EOF on the
    updates socket does the same more slowly."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            raise SystemExit(0)


if __name__ == "__main__":
    # Run as the package's module, not as __main__, so the Init and Update the
    # daemon pickles unpickle as the classes child_main checks for.
    from edgeproxy.proxy.processes import main as _main

    sys.exit(_main())
