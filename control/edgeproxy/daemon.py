"""The edgeproxy daemon: follow cluster state, keep the data paths in step.

One loop per concern, all feeding one ``apply()``:

    state source ─┐
    health checks ┴─> placement ─> kernel maps (edge) + HTTP proxy tables
    (periodic)        idle sweep of the kernel's flow table

Edges run the health checks: they are the ones that choose machines.

The kernel data plane outlives the daemon: stopping it leaves programs attached
and maps pinned, and the next start adopts them (``Dataplane.load``).

Run as ``python -m edgeproxy.daemon --config FILE`` (or ``edgectl run``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from .config import ConfigError, DaemonConfig, load_config
from .dataplane import DEFAULT_ATTACH, Dataplane, DataplaneConfig
from .health import HealthChecker
from .metrics import EdgeproxyCollector, MetricsEndpoint
from .placement import place, place_service
from .proxy import HttpProxy, new_event_loop
from .proxy._shared import SharedBudgets
from .proxy.processes import BUDGET_ROWS, HostSnapshots, ProcessSupervisor
from .routing import ServiceTable
from .sources import StateSource, make_source
from .state import ClusterState, Host

log = logging.getLogger("edgeproxy.daemon")


def hostnames_of(state: ClusterState) -> dict[str, str]:
    """Host header -> app name, for the HTTP proxy's routing."""
    return {name: app.name for app in state.apps.values() for name in app.hostnames}


def _log_warm(task: asyncio.Task[int]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("building metrics label text failed: %r", exc)
    else:
        log.info("metrics label text built for %d machines", task.result())


def edge_addresses(state: ClusterState) -> list[str]:
    """Host addresses of the edges: the only peers a worker's backhaul accepts."""
    return [str(h.address) for h in state.hosts.values() if h.role in ("edge", "both")]


class Daemon:
    """Owns the state source, the kernel data plane and the HTTP proxy of one host."""

    def __init__(self, config: DaemonConfig, source: StateSource) -> None:
        self.config = config
        self.source = source
        self.state = source.current()
        self.host = self._own_host(self.state)
        self.dataplane = self._dataplane_for(self.host)
        processes = config.http.processes
        # Several HTTP processes: this one is process 0 (it also keeps state, health,
        # placement and the kernel maps); the supervisor runs 1..N-1. Their per-machine
        # in-flight counts live in one shared segment (docs/DESIGN.md, "Several processes").
        self.budgets = SharedBudgets.create(BUDGET_ROWS, processes) if processes > 1 else None
        self.proxy = HttpProxy(
            role=config.role,
            region=self.host.region,
            host_addresses=[str(self.host.address)],
            settings=config.http,
            shared=self.budgets,
        )
        self.supervisor = None if self.budgets is None else ProcessSupervisor(
            processes, budgets=self.budgets, role=config.role, region=self.host.region,
            host_addresses=[str(self.host.address)], backhaul_port=self.proxy.backhaul_port,
            settings=config.http)
        self.health = HealthChecker(self.state) if config.is_edge else None
        self._tables_by_id: dict[str, ServiceTable] = {}  # the same objects the loader keeps
        self._hostnames: dict[str, str] = {}
        self._unhealthy: frozenset[str] = frozenset()
        self.applied = 0
        self.applied_at: float | None = None  # Unix time of the last apply (metrics)
        self.metrics: MetricsEndpoint | None = None
        self.collector: EdgeproxyCollector | None = None
        self._warming: asyncio.Task[int] | None = None
        self._lock = asyncio.Lock()  # one map writer at a time: sync and sweep
        # What start() is doing, for GET /ready until it is done (then None); "stopping"
        # from stop() on. Written on the loop, read by the metrics thread: one str.
        self._not_ready: str | None = "starting"

    def _own_host(self, state: ClusterState) -> Host:
        host = state.hosts.get(self.config.host_id)
        if host is None:
            raise ConfigError(f"host_id: {self.config.host_id!r} is not a host in the state")
        if host.role != self.config.role:
            raise ConfigError(
                f"role: config says {self.config.role}, the state says {host.id} is {host.role}"
            )
        return host

    def _dataplane_for(self, host: Host) -> Dataplane | None:
        if host.role == "both":
            # One XDP program per interface: a combined edge+worker program does not exist yet.
            log.warning("role both: kernel fast path not loaded; HTTP only")
            return None
        return Dataplane(
            DataplaneConfig(
                instance=self.config.instance,
                role="edge" if host.role == "edge" else "worker",
                host_address=host.address,
                interfaces=self.config.interfaces,
                refuse_with_rst=self.config.refuse == "rst",
                idle_timeout=self.config.idle_timeout_s,
                attach=self.config.attach or DEFAULT_ATTACH,
            )
        )

    async def start(self) -> None:
        # First, so /healthz and /ready answer while the programs compile.
        self.metrics = MetricsEndpoint.start(self.config.metrics_listen, ready=self.not_ready)
        if self.dataplane is not None:
            where = ", ".join(self.config.interfaces) or "no interface"
            self._not_ready = f"loading the kernel programs ({where})"
            await asyncio.to_thread(self.dataplane.load_in_child)
        self._not_ready = "state not applied yet"
        if self.health is not None:
            await self.health.start()
        await self.apply(self.state)
        self._not_ready = "HTTP listeners not up yet"
        await self.proxy.start()
        await self.proxy.sync_listeners()
        if self.supervisor is not None:
            assert self.budgets is not None
            log.info("shared budgets: %d rows, fd %d (/proc/%d/fd/%d)", self.budgets.rows,
                     self.budgets.fd, os.getpid(), self.budgets.fd)
            self._not_ready = "HTTP processes not started yet"
            await self.supervisor.start()
        self.start_metrics()
        self._not_ready = None
        if self.config.ready_file is not None:
            self.config.ready_file.write_text(f"{self.applied}\n")
        log.info("ready: %d services, role %s", len(self._tables_by_id), self.config.role)

    def not_ready(self) -> str | None:
        """Why the daemon is not ready, or None (``GET /ready``): ready once the state
        is applied, the programs are attached (to the config's interfaces) and every
        HTTP listener is up; not ready again while stopping or while a listener the
        state asks for cannot be opened."""
        if self._not_ready is not None:
            return self._not_ready
        # copied in one C call: the loop thread may change the dict meanwhile
        errors = sorted(list(self.proxy.listen_errors.items()))
        if errors:
            (host, port), error = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            return f"cannot listen on {host}:{port}: {error}{more}"
        return None

    async def apply(
        self, state: ClusterState, changed_apps: AbstractSet[str] | None = None
    ) -> None:
        """Place services from this host's view and hand the tables to both paths.

        ``changed_apps``: only these apps' services can differ from the last apply
        (a source's ``state.changed_apps``, or health); None places every service.
        """
        old, self.state = self.state, state
        if old.hosts is not state.hosts or not self.applied:
            peers = edge_addresses(state)
            self.proxy.allow_backhaul_from(peers)
            if self.supervisor is not None:
                self.supervisor.publish(peers=peers)
        healthy = self.health.healthy if self.health else None
        if changed_apps is None or not self._tables_by_id:
            tables = place(state, self.host.id, healthy=healthy)
            async with self._lock:
                if self.dataplane is not None and self.config.is_edge:
                    result = await asyncio.to_thread(self.dataplane.sync, tables)
                    log.info("kernel maps synced: %s", result)
            self._tables_by_id = {t.service_id: t for t in tables}
            self._hostnames = hostnames_of(state)
            self.proxy.update(tables, self._hostnames)
            if self.supervisor is not None:
                self.supervisor.publish_tables(tables, self._hostnames)
            # Hundreds of thousands of long-lived objects: keep the cyclic collector
            # from rescanning them on every later change (seconds per pass at 200k apps).
            gc.freeze()
            self.warm_metrics()
        else:
            await self._apply_apps(old, state, changed_apps, healthy)
        self.applied += 1
        self.applied_at = time.time()

    async def _apply_apps(
        self, old: ClusterState, state: ClusterState, apps: AbstractSet[str], healthy: Any
    ) -> None:
        """Place and sync only the services of ``apps``; the rest stay as they are."""
        before = {s.id for app in apps for s in old.services_by_app.get(app, ())}
        now = sorted(s.id for app in apps for s in state.services_by_app.get(app, ()))
        tables = [place_service(state, sid, self.host.id, healthy=healthy) for sid in now]
        gone = before - set(now)
        async with self._lock:
            if self.dataplane is not None and self.config.is_edge:
                result = await asyncio.to_thread(
                    self.dataplane.sync, tables, partial=True, removed=gone)
                log.info("kernel maps synced (%d apps): %s", len(apps), result)
        http_before = any(self._tables_by_id[sid].handlers for sid in before
                          if sid in self._tables_by_id)
        for sid in gone:
            self._tables_by_id.pop(sid, None)
        for t in tables:
            self._tables_by_id[t.service_id] = t
        apps_changed = any(old.apps.get(a) is not state.apps.get(a) for a in apps)
        if apps_changed:
            self._hostnames = hostnames_of(state)
        if self.supervisor is not None:  # the children get only what changed
            self.supervisor.publish(tables, gone, self._hostnames if apps_changed else None)
        if apps_changed or http_before or any(t.handlers for t in tables):
            # only then the whole sorted list: sorting 200,000 ids on every machine
            # change was tens of milliseconds of a one-change budget of 50
            self.proxy.update(self.tables, self._hostnames)

    @property
    def tables(self) -> list[ServiceTable]:
        """Every service's current table, sorted by service id."""
        return [self._tables_by_id[sid] for sid in sorted(self._tables_by_id)]

    def start_metrics(self) -> None:
        """Serve /metrics on ``metrics.listen``; the collector reads at each scrape."""
        if self.metrics is None:
            self.metrics = MetricsEndpoint.start(self.config.metrics_listen,
                                                 ready=self.not_ready)
        loop = asyncio.get_running_loop()
        if self.supervisor is None:
            collector = self.collector = EdgeproxyCollector(
                dataplane=self.dataplane,
                proxy=self.proxy, source=self.source, last_applied=lambda: self.applied_at,
                loop=loop)
        else:  # every HTTP process's counters, summed (taken from the scrape thread)
            collector = self.collector = EdgeproxyCollector(
                dataplane=self.dataplane,
                proxy=HostSnapshots(self.proxy, self.supervisor, loop), source=self.source,
                last_applied=lambda: self.applied_at, loop=None)
        self.metrics.collect(collector)
        self.warm_metrics()

    def warm_metrics(self) -> None:
        """After a whole state: build every machine's label text now, in a thread,
        rather than in the first scrape after the machines get busy."""
        if self.collector is None or self.dataplane is None or not self.config.is_edge:
            return
        if self._warming is not None and not self._warming.done():
            return  # one at a time; the next whole state warms again
        self._warming = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.collector.warm))
        self._warming.add_done_callback(_log_warm)

    async def follow_state(self) -> None:
        async for state in self.source.watch():
            log.info("state version %s", state.version)
            if self.health is not None:
                self.health.update(state)
            await self.apply(state, state.changed_apps)

    async def follow_health(self, health: HealthChecker) -> None:
        while True:
            await health.changed.wait()
            health.changed.clear()
            unhealthy = health.unhealthy()
            log.info("health changed; failing: %s", ", ".join(sorted(unhealthy)) or "none")
            flipped = unhealthy ^ self._unhealthy
            self._unhealthy = unhealthy
            machines = self.state.machines
            if all(mid in machines for mid in flipped):
                await self.apply(self.state, {machines[mid].app for mid in flipped})
            else:
                await self.apply(self.state)

    async def sweep_idle_flows(self, dataplane: Dataplane) -> None:
        while True:
            await asyncio.sleep(self.config.resync_interval_s)
            async with self._lock:
                await asyncio.to_thread(dataplane.sweep, self.config.idle_timeout_s)

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The daemon's endless loops; one ending (by error) stops the daemon."""
        loops = [self.follow_state()]
        if self.health is not None:
            loops.append(self.follow_health(self.health))
        if self.dataplane is not None and self.config.is_edge:
            loops.append(self.sweep_idle_flows(self.dataplane))
        return loops

    async def stop(self) -> None:
        self._not_ready = "stopping"
        if self.health is not None:
            await self.health.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.proxy.stop()
        if self.budgets is not None:
            self.budgets.close()
            os.close(self.budgets.fd)
        self.source.close()
        if self.dataplane is not None:
            self.dataplane.close()  # fds only: programs stay attached, maps pinned


async def serve(config: DaemonConfig, stopping: asyncio.Event) -> None:
    daemon = Daemon(config, make_source(config.state))
    await daemon.start()
    tasks = [asyncio.create_task(loop) for loop in daemon.loops()]
    waiter = asyncio.create_task(stopping.wait())
    try:
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter:
                task.result()  # re-raises the loop's error
                raise RuntimeError("a daemon loop ended")
    finally:
        for task in [*tasks, waiter]:
            task.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)
        await daemon.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy.daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="daemon config YAML")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config)
    except OSError as exc:
        print(f"edgeproxy: cannot read config {args.config}: {exc.strerror}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # the lines `edgectl config check` prints, one per problem
        print(exc, file=sys.stderr)
        print(f"edgeproxy: not started: {args.config} fails the config check", file=sys.stderr)
        return 2
    loop = new_event_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        loop.run_until_complete(serve(config, stopping))
    except (ConfigError, ValueError) as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. metrics.listen already taken
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
