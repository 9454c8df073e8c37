"""The bench's own namespaces (not the shared lab, which other sessions use):

    epb<pid>c  c0 ──veth── e0  epb<pid>e  e1 ──veth (MTU 1600)── w0  epb<pid>w
    client                     edge                                  worker

Same-region shape as the lab's client → edge-ord → worker-ord (plain veths, no
delay). Everything is in 198.18.220.0/24. ``BenchNet`` is a context manager; on
exit it stops every process it started (by pid), unloads any data plane it
loaded (removing its pins), kills what is left inside its own namespaces (by
pid, from `ip netns pids`) and deletes the namespaces by exact name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Any

from edgebench.common import BenchError, Processes, run

CLIENT_ADDR = "198.18.220.1"
EDGE_C = "198.18.220.2"  # edge, client side
EDGE_W = "198.18.220.5"  # edge, worker side
WORKER_E = "198.18.220.6"
EDGE_HOST = "198.18.220.11"
WORKER_HOST = "198.18.220.21"
EDGE_MACHINE = "198.18.220.64"  # a machine on the edge host (HTTP same-host case)
WORKER_MACHINE = "198.18.220.65"  # a machine on the worker
VIP = "198.18.220.100"  # raw-TCP VIP (fast path)
HTTP_APP = "198.18.220.80"  # shared HTTP app address on the edge


class BenchNet:
    def __init__(self, tag: str = "") -> None:
        base = f"epb{os.getpid()}{tag}"
        self.client, self.edge, self.worker = f"{base}c", f"{base}e", f"{base}w"
        self.namespaces = (self.client, self.edge, self.worker)
        self.procs = Processes()
        self.dataplanes: list[Any] = []
        self.dir = Path(tempfile.mkdtemp(prefix=f"{base}-"))
        self.dir.chmod(0o755)  # nginx workers (user nobody) read files served from here

    # ------------------------------------------------------------ building

    def __enter__(self) -> BenchNet:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        existing = run(["ip", "netns", "list"])
        for ns in self.namespaces:
            if ns in existing.split():
                raise BenchError(f"namespace {ns} already exists")
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
        c, e, w = self.namespaces
        run(["ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "e0", "netns", e])
        run(["ip", "link", "add", "e1", "netns", e, "mtu", "1600", "type", "veth",
             "peer", "w0", "netns", w, "mtu", "1600"])
        script = {
            c: [f"addr add {CLIENT_ADDR}/30 dev c0", "link set c0 up", "link set lo up",
                f"route add default via {EDGE_C}"],
            e: [f"addr add {EDGE_C}/30 dev e0", f"addr add {EDGE_W}/30 dev e1",
                f"addr add {EDGE_HOST}/32 dev lo", f"addr add {EDGE_MACHINE}/32 dev lo",
                f"addr add {HTTP_APP}/32 dev lo", "link set lo up", "link set e0 up",
                "link set e1 up", f"route add {WORKER_HOST}/32 via {WORKER_E}",
                f"route add {WORKER_MACHINE}/32 via {WORKER_E}"],
            w: [f"addr add {WORKER_E}/30 dev w0", f"addr add {WORKER_HOST}/32 dev lo",
                f"addr add {WORKER_MACHINE}/32 dev lo", "link set lo up", "link set w0 up",
                f"route add default via {EDGE_W}"],
        }
        for ns, lines in script.items():
            batch = self.dir / f"{ns}.ip"
            batch.write_text("\n".join(lines) + "\n")
            run(["ip", "-n", ns, "-batch", str(batch)])
            sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                       "net.ipv4.ip_local_port_range=1024 65000",
                       "net.ipv4.tcp_tw_reuse=1"]
            if ns == e:
                sysctls.append("net.ipv4.ip_forward=1")
            run(["sysctl", "-qw", *sysctls], netns=ns)
        for ns, dev in ((c, "c0"), (e, "e0"), (e, "e1"), (w, "w0")):
            run(["sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=0"], netns=ns)

    # ------------------------------------------------------------ data plane

    def load_fast_path(self, services: list[tuple[str, int, int]],
                       attach: str | None = None) -> Any:
        """Load edge (e0, e1) and worker (w0) programs; ``services`` = [(id, port,
        internal_port)] on VIP → WORKER_MACHINE; ``attach`` "xdp"/"tc" (None: the
        loader's default). Returns the edge Dataplane."""
        from edgeproxy.dataplane import Dataplane, DataplaneConfig
        from edgeproxy.routing import Backend, ServiceTable

        mode = {} if attach is None else {"attach": attach}
        limits = dict(**mode, max_services=64, max_machines=64, max_flows=1 << 18,
                      max_maglev_slots=8192, max_backend_entries=1024)
        pid = os.getpid()
        edge = Dataplane(DataplaneConfig(
            f"bench-{pid}-edge", "edge", IPv4Address(EDGE_HOST), ("e0", "e1"),
            netns=self.edge, **limits))  # type: ignore[arg-type]
        worker = Dataplane(DataplaneConfig(
            f"bench-{pid}-worker", "worker", IPv4Address(WORKER_HOST), ("w0",),
            netns=self.worker, **limits))  # type: ignore[arg-type]
        for dp in (edge, worker):
            self.dataplanes.append(dp)
            dp.load()
        tables = []
        for sid, port, internal in services:
            m = Backend(f"{sid}-m1", "bench", "ord", IPv4Address(WORKER_MACHINE), internal,
                        IPv4Address(WORKER_HOST))
            tables.append(ServiceTable(sid, "bench", (IPv4Address(VIP),), (port,), (),
                                       "connections", 50_000, 100_000, ((m,),)))
        edge.sync(tables)
        return edge

    def unload_fast_path(self) -> None:
        for dp in reversed(self.dataplanes):
            with contextlib.suppress(Exception):
                dp.unload()
        self.dataplanes.clear()

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        self.procs.stop_all()
        self.unload_fast_path()
        present = run(["ip", "netns", "list"], check=False).split()
        for ns in self.namespaces:
            if ns not in present:
                continue
            # anything still inside our own namespaces was started by this run
            pids = run(["ip", "netns", "pids", ns], check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False,
                           timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
