"""A real etcd cluster on loopback for tests: Debian's ``/usr/bin/etcd``, unprivileged.

``EtcdCluster(tmp_path, members=3).start()`` picks free ports on 127.0.0.1, starts one
process per member (data dir and log under ``tmp_path``), and waits, bounded, until
every member reports healthy. ``stop()`` kills every process it started by pid; use
it as a context manager so that happens even when a test fails.

Timings are shortened (heartbeat 50 ms, election 500 ms) so a killed leader is
replaced within about a second.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

ETCD = Path("/usr/bin/etcd")
HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds for every member to report healthy
STOP_TIMEOUT = 5.0  # seconds for a member to exit after SIGTERM before SIGKILL
HEALTH_TIMEOUT = 1.0  # seconds per /health request


def etcd_missing_reason() -> str | None:
    """Why the etcd tests cannot run here, or None when they can."""
    if not ETCD.exists() and shutil.which("etcd") is None:
        return f"{ETCD} is not installed (Debian package etcd-server)"
    return None


def free_ports(count: int) -> list[int]:
    """Ports free on loopback right now; bound together so they differ."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        url = f"http://{self.endpoint}/health"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT) as reply:
                body = json.loads(reply.read())
        except (OSError, ValueError):
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL by pid: a member dying without warning, as in a crash."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)

    def freeze(self) -> None:
        """SIGSTOP by pid: the member keeps its sockets but answers nothing, like a
        member cut off from the network."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a frozen member cannot act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


class EtcdCluster:
    def __init__(self, workdir: Path, members: int = 3) -> None:
        ports = free_ports(2 * members)
        self.token = f"edgeproxy-test-{ports[0]}"  # a cluster id nobody else shares
        self.members = [
            Member(
                name=f"m{i}",
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                data_dir=workdir / f"m{i}.etcd",
                log_path=workdir / f"m{i}.log",
            )
            for i in range(members)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def member_at(self, endpoint: str) -> Member:
        return next(m for m in self.members if m.endpoint == endpoint)

    def start(self) -> EtcdCluster:
        """Launch every member and wait until all are healthy; on any failure, stop all."""
        try:
            initial = ",".join(f"{m.name}=http://{HOST}:{m.peer_port}" for m in self.members)
            for member in self.members:
                self._launch(member, initial)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(self.members)
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "etcd members not healthy after "
                    f"{START_TIMEOUT:.0f} s: {[m.name for m in waiting]}\n"
                    + "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in waiting)
                )
            for member in list(waiting):
                if not member.alive:
                    raise RuntimeError(f"etcd {member.name} exited:\n{member.log_tail()}")
                if member.healthy():
                    waiting.remove(member)
            time.sleep(0.1)

    def _launch(self, member: Member, initial_cluster: str) -> None:
        client_url = f"http://{HOST}:{member.client_port}"
        peer_url = f"http://{HOST}:{member.peer_port}"
        args = [
            str(ETCD if ETCD.exists() else shutil.which("etcd")),
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.token}",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--log-level=warn",
        ]
        with member.log_path.open("wb") as log:
            # The child keeps its own copy of the log descriptor.
            member.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
