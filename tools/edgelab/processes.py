"""Lab processes: spawned inside a namespace, remembered by pid and start time,
stopped by pid (never by name), with bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgelab import netns

TERM_GRACE_S = 5.0
KILL_GRACE_S = 2.0
POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class LabProcess:
    """One process the lab started. `start_time` (clock ticks since boot, from
    /proc/PID/stat) tells it apart from an unrelated process that reused the pid."""

    pid: int
    start_time: int
    kind: str  # machine | daemon | delayline
    name: str
    node: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabProcess:
        return cls(
            int(data["pid"]), int(data["start_time"]), str(data["kind"]),
            str(data["name"]), str(data["node"]),
        )


def start_time_of(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None when there is no such (live) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it follow ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has finished; only its parent's wait is missing
        return None
    return int(fields[19])


def is_alive(process: LabProcess) -> bool:
    return start_time_of(process.pid) == process.start_time


def spawn_in_namespace(
    namespace: str, argv: list[str], log: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start argv inside `namespace` (see netns.enter_argv), detached from our
    session so it outlives `tools/lab up`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            netns.enter_argv(namespace, argv),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True,
        )


def record_of(popen: subprocess.Popen[bytes], kind: str, name: str, node: str) -> LabProcess:
    started = start_time_of(popen.pid)
    # A process that already died still gets recorded (start time 0 never matches).
    return LabProcess(popen.pid, started or 0, kind, name, node)


def _signal_all(processes: Iterable[LabProcess], signum: int) -> None:
    for process in processes:
        if is_alive(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


def _reap_children() -> None:
    """Our own dead children stay zombies until waited for; collect them."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _wait_gone(processes: list[LabProcess], timeout_s: float) -> list[LabProcess]:
    deadline = time.monotonic() + timeout_s
    alive = processes
    while alive and time.monotonic() < deadline:
        time.sleep(POLL_S)
        _reap_children()
        alive = [p for p in alive if is_alive(p)]
    return alive


def stop(processes: Iterable[LabProcess]) -> list[LabProcess]:
    """SIGTERM, wait a bounded time, SIGKILL the rest. Returns any that survived."""
    alive = [p for p in processes if is_alive(p)]
    _signal_all(alive, signal.SIGTERM)
    alive = _wait_gone(alive, TERM_GRACE_S)
    _signal_all(alive, signal.SIGKILL)
    return _wait_gone(alive, KILL_GRACE_S)
