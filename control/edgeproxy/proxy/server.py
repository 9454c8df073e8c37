"""HttpProxy: the daemon-facing object. Owns listeners, pools and counters; the
request logic lives in forward.py and the protocol handling in frontend_*.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from edgeproxy.proxy._shared import SharedBudgets
from edgeproxy.proxy.admission import Admission
from edgeproxy.proxy.backhaul import BackhaulClient, WorkerContext, serve_backhaul_stream
from edgeproxy.proxy.balancing import Chooser, placement_chooser
from edgeproxy.proxy.cpushare import MIN_LIMIT, CpuBudgets, CpuMeter
from edgeproxy.proxy.fastlane import FastLane, LaneSettings
from edgeproxy.proxy.forward import Forwarder, ForwardSettings
from edgeproxy.proxy.frontend_h1 import ClientTimeouts
from edgeproxy.proxy.h2session import H2Session, H2Stream
from edgeproxy.proxy.machines import MachinePool
from edgeproxy.proxy.routes import EMPTY_ROUTES, RouteMap, build_routes
from edgeproxy.proxy.stats import ProxyCounters, ProxySnapshot
from edgeproxy.proxy.workerlane import BackhaulLane
from edgeproxy.routing import Backend, ServiceTable

log = logging.getLogger(__name__)

ROLES = ("edge", "worker", "both")
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
WAITER_POLL_S = 0.01  # queued requests re-try the shared budget this often


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Every bound the proxy enforces; defaults suit production, tests shrink them."""

    header_timeout: float = 10.0  # whole request head, from its first byte
    idle_timeout: float = 60.0  # keep-alive client connection between requests
    body_timeout: float = 30.0  # each read of a request body
    tunnel_idle_timeout: float = 3600.0  # WebSocket with no traffic either way
    connect_timeout: float = 2.0  # to a machine or a worker
    response_timeout: float = 30.0  # request sent → response head (then 504)
    upstream_read_timeout: float = 60.0  # each read of a response body
    queue_timeout: float = 5.0  # wait for a slot when an app is at hard_limit
    queue_limit: int = 100  # waiting requests per app
    max_attempts: int = 3  # machines tried per request (retries)
    backhaul_ping_interval: float = 5.0
    backhaul_ping_timeout: float = 3.0
    backhaul_streams_per_app: int = 256
    # Idle keep-alive connections per machine: at least the expected concurrency,
    # or every burst closes and reopens connections (TIME_WAIT churn).
    machine_pool_idle: int = 256
    machine_pool_idle_timeout: float = 4.0
    listen_backlog: int = 1024
    # Processes serving the same listeners (SO_REUSEPORT, the kernel spreads
    # connections). The daemon starts them (its config defaults to one per CPU);
    # their in-flight counts per machine live in shared memory, so every app's
    # hard_limit holds exactly host-wide. See docs/DESIGN.md "Several processes".
    processes: int = 1
    # Cores one app may use per process while another app also has requests
    # (proxy/cpushare.py); 0 = measure per-app CPU but never throttle.
    app_cpu_limit: float = 0.5

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError("processes must be at least 1")
        if self.app_cpu_limit != 0 and self.app_cpu_limit < MIN_LIMIT:
            raise ValueError(f"app_cpu_limit must be 0 (off) or at least {MIN_LIMIT}")
        if self.queue_limit < 0 or self.max_attempts < 1:
            raise ValueError("queue_limit must be >= 0 and max_attempts >= 1")


def _listen_socket(
    address: str, port: int, backlog: int, reuse_port: bool = False
) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # App addresses are routed to the edge, not necessarily configured on it.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpProxy:
    """The HTTP slow path, edge and/or worker role.

    ``update()`` may be called any time (before or after ``start()``); it swaps the
    routing view in one assignment, so a request sees either the old or the new one.
    """

    def __init__(
        self,
        *,
        role: str,
        region: str,
        host_addresses: Sequence[str],
        backhaul_port: int = 4280,
        settings: ProxySettings | None = None,
        chooser: Chooser | None = None,
        rng: random.Random | None = None,
        shared: SharedBudgets | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.role = role
        self.region = region
        self.host_addresses = frozenset(str(a) for a in host_addresses)
        self.backhaul_port = backhaul_port
        self.settings = settings or ProxySettings()
        s = self.settings
        self._routes: RouteMap = EMPTY_ROUTES
        self._counters = ProxyCounters()
        self._machines = MachinePool(
            connect_timeout=s.connect_timeout,
            read_timeout=s.upstream_read_timeout,
            idle_per_machine=s.machine_pool_idle,
            idle_timeout=s.machine_pool_idle_timeout,
        )
        self._backhaul = BackhaulClient(
            port=backhaul_port,
            connect_timeout=s.connect_timeout,
            read_timeout=s.upstream_read_timeout,
            ping_interval=s.backhaul_ping_interval,
            ping_timeout=s.backhaul_ping_timeout,
            per_app_streams=s.backhaul_streams_per_app,
            source_address=min(self.host_addresses) if self.host_addresses else None,
        )
        self._cpu = CpuMeter(CpuBudgets(s.app_cpu_limit) if s.app_cpu_limit > 0 else None)
        admission: Admission[asyncio.Future[Backend]] = Admission(
            chooser or placement_chooser(), rng or random.Random(), s.queue_limit, shared
        )
        self.shared = shared
        self._forwarder = Forwarder(
            ForwardSettings(
                region=region,
                host_addresses=self.host_addresses,
                connect_timeout=s.connect_timeout,
                response_timeout=s.response_timeout,
                queue_timeout=s.queue_timeout,
                max_attempts=s.max_attempts,
            ),
            lambda: self._routes,
            admission,
            self._machines,
            self._backhaul,
            self._counters,
            self._cpu,
        )
        self._worker = WorkerContext(
            machines=self._machines,
            routes=lambda: self._routes,
            host_addresses=self.host_addresses,
            response_timeout=s.response_timeout,
            tunnel_idle_timeout=s.tunnel_idle_timeout,
            cpu=self._cpu,
        )
        self._client_timeouts = ClientTimeouts(
            header=s.header_timeout,
            idle=s.idle_timeout,
            body=s.body_timeout,
            tunnel_idle=s.tunnel_idle_timeout,
        )
        self._lane = FastLane(
            LaneSettings(
                region=region,
                timeouts=self._client_timeouts,
                connect_timeout=s.connect_timeout,
                response_timeout=s.response_timeout,
                read_timeout=s.upstream_read_timeout,
                pool_idle=s.machine_pool_idle,
                pool_idle_timeout=s.machine_pool_idle_timeout,
            ),
            self._forwarder,
            lambda: self._routes,
            self._cpu,
        )
        self._backhaul_lane = BackhaulLane(self._worker, self._lane)  # plain streams, no task
        self._edge_servers: dict[tuple[str, int], asyncio.Server] = {}
        self._backhaul_servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._sync_lock: asyncio.Lock | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._running = False
        self._backhaul_peers: frozenset[str] | None = None
        self.backhaul_refused = 0
        self.listen_errors: dict[tuple[str, int], str] = {}
        self._reuse_port = s.processes > 1
        self._waiter_poll: asyncio.Task[None] | None = None

    @property
    def is_edge(self) -> bool:
        return self.role in ("edge", "both")

    @property
    def is_worker(self) -> bool:
        return self.role in ("worker", "both")

    # -- routing -------------------------------------------------------------
    def update(self, tables: Sequence[ServiceTable], hostnames: Mapping[str, str]) -> None:
        """Swap routing atomically; listeners follow asynchronously when running."""
        self._routes = build_routes(tables, hostnames)
        if self._running:
            self._forwarder.retry_waiters()
            self._sync_task = asyncio.get_running_loop().create_task(self.sync_listeners())

    def allow_backhaul_from(self, addresses: Iterable[str] | None) -> None:
        """Accept backhaul connections only from these addresses (the edges' host
        addresses); None accepts any. The backhaul is plain h2c and its requests name
        a machine: anyone who can open it can reach every machine on this host."""
        self._backhaul_peers = None if addresses is None else frozenset(addresses)

    @property
    def listening(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._edge_servers)

    async def sync_listeners(self) -> None:
        """Open listeners for new HTTP service addresses, close removed ones."""
        if not self.is_edge:
            return
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            wanted = self._routes.listen
            for key in set(self._edge_servers) - wanted:
                server = self._edge_servers.pop(key)
                server.close()
            for key in sorted(wanted - set(self._edge_servers)):
                try:
                    sock = _listen_socket(
                        key[0], key[1], self.settings.listen_backlog, self._reuse_port
                    )
                    loop = asyncio.get_running_loop()
                    self._edge_servers[key] = await loop.create_server(
                        self._lane.protocol, sock=sock
                    )
                    self.listen_errors.pop(key, None)
                except OSError as exc:
                    self.listen_errors[key] = str(exc)
                    log.warning("cannot listen on %s:%d: %s", key[0], key[1], exc)

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._running = True
        self._cpu.start()
        self._lane.start()
        if self.shared is not None:
            self._waiter_poll = asyncio.get_running_loop().create_task(self._poll_waiters())
        if self.is_worker:
            for address in sorted(self.host_addresses):
                sock = _listen_socket(
                    address, self.backhaul_port, self.settings.listen_backlog, self._reuse_port
                )
                self._backhaul_servers.append(
                    await asyncio.start_server(self._accept_backhaul, sock=sock, limit=64 * 1024)
                )
        await self.sync_listeners()

    async def stop(self) -> None:
        self._running = False
        self._cpu.stop()
        if self._waiter_poll is not None:
            self._waiter_poll.cancel()
            with contextlib.suppress(BaseException):
                await self._waiter_poll
        if self._sync_task is not None:
            with contextlib.suppress(BaseException):
                await self._sync_task
        servers = [*self._edge_servers.values(), *self._backhaul_servers]
        self._edge_servers.clear()
        self._backhaul_servers.clear()
        for server in servers:
            server.close()
        await self._lane.stop()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(BaseException):
                await task
        await self._backhaul.close()
        await self._machines.close()
        for server in servers:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _poll_waiters(self) -> None:
        """Slots another process releases wake no waiter here: while this process
        has queued requests, offer them the shared budget every few milliseconds."""
        admission = self._forwarder.admission
        while True:
            await asyncio.sleep(WAITER_POLL_S)
            if admission.waiting():
                self._forwarder.retry_waiters()

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    # -- connections -------------------------------------------------------------
    async def _accept_backhaul(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._track()
        peers = self._backhaul_peers
        if peers is not None:
            peer = writer.get_extra_info("peername") or ("",)
            if str(peer[0]) not in peers:
                self.backhaul_refused += 1
                n = self.backhaul_refused
                if n & (n - 1) == 0:  # 1st, 2nd, 4th, ...: a scan cannot flood the log
                    log.warning("backhaul connection from %s refused: not an edge (%d so far)",
                                peer[0], n)
                writer.close()
                return
        _set_nodelay(writer)
        ctx = self._worker

        async def on_stream(stream: H2Stream) -> None:
            await serve_backhaul_stream(stream, ctx)

        session = H2Session(
            reader,
            writer,
            client_side=False,
            on_stream=on_stream,
            max_concurrent_streams=4096,
            enable_connect_protocol=True,
            on_request=self._backhaul_lane.serve,
        )
        session.start()
        try:
            await session.run()
        finally:
            session.close()

    # -- metrics -------------------------------------------------------------
    def snapshot(self) -> ProxySnapshot:
        """Current counters and gauges, read at call time (for a scrape)."""
        c = self._counters
        admission = self._forwarder.admission
        return ProxySnapshot(
            responses=dict(c.responses),
            in_flight=admission.in_flight(),
            queue_depth=admission.queue_depth(),
            retries=dict(c.retries),
            replays=dict(c.replays),
            response_seconds={app: hist.cumulative() for app, hist in c.latency.items()},
            response_seconds_sum={app: hist.total for app, hist in c.latency.items()},
            backhaul=self._backhaul.health(),
            cpu_seconds=dict(self._cpu.used),
            cpu_throttled=dict(self._cpu.throttled_requests),
            backhaul_refused=self.backhaul_refused,
            lane_requests=self._lane.lane_requests,
            general_requests=self._lane.general_requests,
            backhaul_lane_requests=self._backhaul_lane.lane_requests,
            backhaul_general_requests=self._backhaul_lane.general_requests,
            http2_abuse=dict(c.http2_abuse),
        )


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
