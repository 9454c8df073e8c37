"""Shared fixtures: the namespace lab, brought up once per session and always taken down.

Fixtures
- `lab_tool`: Path of `tools/lab`.
- `lab`: a `LabHandle` for a lab that is up (session-scoped; `down` runs at the end
  of the session even when tests fail). Skips when not root or iproute2 is missing.
  The lab follows a session copy of the default state: `lab.write_state(text)`
  changes it (daemons follow, `tools/lab sync` starts/stops machines to match) and
  `lab.reset_state()` puts the default back.
  Daemons are started when `control/edgeproxy/daemon.py` exists, unless the
  environment sets EDGELAB_NO_DAEMONS=1.

Tests marked `root` are skipped with a reason when pytest does not run as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
LAB_TOOL = TOOLS / "lab"
DAEMON_SOURCE = REPO / "control" / "edgeproxy" / "daemon.py"
DEFAULT_STATE = TOOLS / "edgelab" / "state.yaml"
LAB_UP_TIMEOUT_S = 180  # daemons may take up to 90 s to report ready
LAB_DOWN_TIMEOUT_S = 60
EXEC_TIMEOUT_S = 60
SESSION_LOCK = Path("/run/edgeproxy-lab-session.lock")
LAB_SESSION_WAIT_S = 1800

# Tests import the lab's package (edgelab) directly for its pure parts.
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, BPF); run as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def run_lab(*args: str, timeout: float = EXEC_TIMEOUT_S,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`tools/lab ARGS...`, output captured as text; never raises on a non-zero exit."""
    return subprocess.run(
        [str(LAB_TOOL), *args], capture_output=True, text=True, timeout=timeout,
        input=input, check=False,
    )


@dataclass
class LabHandle:
    """A lab that is up. `exec` runs a command in a node's namespace."""

    tool: Path
    state_path: Path
    daemons: bool  # whether the edgeproxy daemons were started

    @property
    def up_args(self) -> list[str]:
        args = ["up", "--state", str(self.state_path)]
        return args if self.daemons else [*args, "--no-daemons"]

    def status(self) -> dict[str, Any]:
        done = run_lab("status", "-o", "json")
        assert done.returncode == 0, done.stderr
        status: dict[str, Any] = json.loads(done.stdout)
        return status

    def exec(self, node: str, *cmd: str, timeout: float = EXEC_TIMEOUT_S,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run CMD in NODE's namespace (EDGEPROXY_INSTANCE=NODE); returns the result."""
        return run_lab("exec", node, "--", *cmd, timeout=timeout, input=input)

    def python(self, node: str, code: str,
               timeout: float = EXEC_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run Python code (the project's venv) in NODE's namespace."""
        return self.exec(node, sys.executable, "-c", code, timeout=timeout)

    def popen(self, node: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a long-running CMD in NODE's namespace; the caller stops it.
        (`down` also stops anything left inside lab namespaces.)"""
        return subprocess.Popen([str(self.tool), "exec", node, "--", *cmd], text=True, **kwargs)

    def write_state(self, text: str) -> None:
        """Replace the lab's state file atomically, then bring machines in line."""
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.state_path)
        done = run_lab("sync")
        assert done.returncode == 0, f"tools/lab sync failed:\n{done.stdout}\n{done.stderr}"

    def reset_state(self) -> None:
        """The default state again (a no-op for the machines when nothing changed)."""
        if self.state_path.read_text() != DEFAULT_STATE.read_text():
            self.write_state(DEFAULT_STATE.read_text())

    def machine(self, action: str, machine_id: str) -> None:
        """`tools/lab machine stop|start ID`: kill or restart one machine's servers."""
        done = run_lab("machine", action, machine_id)
        assert done.returncode == 0, f"tools/lab machine {action} failed:\n{done.stderr}"

    def machines(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.status()["machines"]}

    def ensure_up(self) -> None:
        """Bring the lab back (a no-op when it is up), for tests that take it down."""
        done = run_lab(*self.up_args, timeout=LAB_UP_TIMEOUT_S)
        assert done.returncode == 0, f"tools/lab up failed:\n{done.stdout}\n{done.stderr}"


def _lab_skip_reason() -> str | None:
    if not is_root():
        return "the lab needs root (network namespaces); run pytest as root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed; run tools/setup"
    return None


@pytest.fixture(scope="session")
def lab_tool() -> Path:
    return LAB_TOOL


@contextlib.contextmanager
def lab_session_lock() -> Iterator[None]:
    """One pytest session (or benchmark) owns the lab at a time: a second one that
    starts meanwhile waits here instead of taking the first one's lab down."""
    from edgelab.lab import held_lock

    try:
        with held_lock(SESSION_LOCK, LAB_SESSION_WAIT_S, poll_s=1.0):
            yield
    except TimeoutError as exc:
        pytest.fail(f"another session owns the lab: {exc}")


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    reason = _lab_skip_reason()
    if reason:
        pytest.skip(reason)
    with lab_session_lock():
        yield from _lab_session(tmp_path_factory)


def _lab_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    daemons = DAEMON_SOURCE.exists() and os.environ.get("EDGELAB_NO_DAEMONS") != "1"
    state_path = tmp_path_factory.mktemp("lab") / "state.yaml"
    shutil.copy(DEFAULT_STATE, state_path)
    handle = LabHandle(LAB_TOOL, state_path, daemons)
    run_lab("down", timeout=LAB_DOWN_TIMEOUT_S)  # leftovers of an earlier, killed session
    try:
        done = run_lab(*handle.up_args, timeout=LAB_UP_TIMEOUT_S)
        if done.returncode != 0:
            pytest.fail(f"tools/lab up failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
        yield handle
    finally:
        run_lab("down", timeout=LAB_DOWN_TIMEOUT_S)
