"""Install: the built wheel, in a fresh virtualenv outside the checkout, carries the
BPF sources as package data, and its `edgectl load` compiles and attaches the fast
path (edge and worker) in a network namespace of the test's own, holding only the
capabilities packaging/edgeproxy.service grants.

The wheel is built from a copy of the checkout's files (tracked and new ones), so
the build writes nothing into the checkout. The fresh virtualenv takes the wheel
with --no-deps; its dependencies (pyroute2, prometheus-client, ...) come from the
project's own virtualenv through a .pth line after the venv's own site-packages,
and bcc from Debian (--system-site-packages). Building takes about 35 s, each load
about 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

UNIT = REPO / "packaging" / "edgeproxy.service"
BUILD_TIMEOUT_S = 600  # cythonizing and compiling every extension
LOAD_TIMEOUT_S = 120
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    cwd: Path  # outside the checkout: nothing there to import by accident

    @property
    def edgectl(self) -> Path:
        return self.venv / "bin" / "edgectl"

    @property
    def env(self) -> dict[str, str]:
        """No PYTHONPATH, no VIRTUAL_ENV, no project venv on PATH."""
        return {"PATH": CLEAN_PATH, "HOME": str(self.cwd), "LANG": "C.UTF-8"}


def _run(*cmd: str | Path, timeout: float = 60, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=cwd, env=env)


def _copy_sources(dest: Path) -> None:
    """The checkout's tracked and new (not ignored) files: what a clone plus the
    work in progress holds, without build/, .venv/ or egg-info."""
    listed = _run("git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                  "--exclude-standard")
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the wheel is built from `git ls-files`")
    root = tmp_path_factory.mktemp("install")
    assert not root.is_relative_to(REPO)
    src, dist, venv, cwd = root / "src", root / "dist", root / "venv", root / "cwd"
    cwd.mkdir()
    _copy_sources(src)
    done = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "-w", dist, src, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = dist.glob("edgeproxy-*.whl")
    # Debian's interpreter, the one bcc is installed for (not necessarily `python3`)
    base = Path(sys.base_prefix) / "bin" / "python3"
    done = _run(base, "-m", "venv", "--system-site-packages", venv)
    assert done.returncode == 0, done.stderr
    done = _run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
                "--quiet", wheel, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    site = Path(_run(venv / "bin" / "python", "-c",
                     "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (site / "zz_edgeproxy_test_dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n")
    return Installed(wheel, venv, cwd)


def test_wheel_carries_every_bpf_source(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {f"edgeproxy/bpf/{p.name}" for p in (REPO / "bpf").glob("*.[ch]")}
    assert "edgeproxy/bpf/edge.bpf.c" in expected
    assert expected <= names, sorted(expected - names)


def test_installed_package_finds_its_sources_with_no_checkout(installed: Installed) -> None:
    done = _run(installed.venv / "bin" / "python", "-c",
                "import edgeproxy.dataplane as d; print(d.__file__); print(d.BPF_DIR)",
                cwd=installed.cwd, env=installed.env)
    assert done.returncode == 0, done.stderr
    module, sources = (Path(line) for line in done.stdout.splitlines())
    assert module.is_relative_to(installed.venv), module  # the wheel's copy, not the checkout's
    assert sources == module.parent / "bpf"
    assert (sources / "edge.bpf.c").read_text() == (REPO / "bpf" / "edge.bpf.c").read_text()


def unit_capabilities() -> list[str]:
    """CapabilityBoundingSet= of the unit, as setpriv spells them (bpf, net_admin)."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()]
    raise AssertionError(f"{UNIT} has no CapabilityBoundingSet=")


def _in_ns(ns: str, *cmd: str | Path, caps: list[str] | None = None,
           installed: Installed) -> subprocess.CompletedProcess[str]:
    # nsenter, not `ip netns exec`: that remounts /sys and hides /sys/fs/bpf
    drop = ["setpriv", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in caps)])
            ] if caps is not None else []
    return _run("nsenter", f"--net=/run/netns/{ns}", *drop, *cmd, timeout=LOAD_TIMEOUT_S,
                cwd=installed.cwd, env=installed.env)


@pytest.mark.root
@pytest.mark.kernel
def test_installed_edgectl_loads_and_attaches_with_the_units_capabilities(
        installed: Installed) -> None:
    pytest.importorskip("bcc")
    for tool in ("nsenter", "setpriv", "bpftool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pid = os.getpid()
    ns, edge, worker = f"epwhl{pid}", f"test-wheel-edge-{pid}", f"test-wheel-worker-{pid}"
    pins = [Path("/sys/fs/bpf/edgeproxy") / name for name in (edge, worker)]
    caps = unit_capabilities()

    def ctl(instance: str, *args: str, caps: list[str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return _in_ns(ns, installed.edgectl, "--instance", instance, *args, caps=caps,
                      installed=installed)

    def attached(instance: str) -> dict[str, list[dict[str, str]]]:
        done = ctl(instance, "status", "-o", "json")  # bpftool: full root
        assert done.returncode == 0, done.stderr
        return {p["name"]: p["attached"] for p in json.loads(done.stdout)["programs"]}

    assert _run("ip", "netns", "add", ns).returncode == 0
    try:
        for cmd in (["link", "add", "whla", "type", "veth", "peer", "name", "whlb"],
                    ["link", "set", "whla", "up"], ["link", "set", "whlb", "up"]):
            done = _run("ip", "-n", ns, *cmd)
            assert done.returncode == 0, done.stderr

        done = ctl(edge, "load", "--iface", "whla", "--role", "edge", "--host-address",
                   "198.18.0.1", "--attach", "xdp", caps=caps)
        assert done.returncode == 0, done.stderr[-3000:]
        link = _run("ip", "-n", ns, "link", "show", "dev", "whla").stdout
        assert "prog/xdp" in link and "edge_xdp" in link, link
        assert attached(edge)["edge_xdp"] == [
            {"device": "whla", "hook": "xdp", "mode": "driver"}]

        done = ctl(worker, "load", "--iface", "whlb", "--role", "worker", "--host-address",
                   "198.18.0.2", caps=caps)
        assert done.returncode == 0, done.stderr[-3000:]
        programs = attached(worker)
        assert programs["worker_ingress_tc"] == [
            {"device": "whlb", "hook": "tc", "mode": "clsact/ingress"}]
        assert programs["worker_egress"] == [
            {"device": "whlb", "hook": "tc", "mode": "clsact/egress"}]

        for instance, pin in zip((edge, worker), pins, strict=True):
            done = ctl(instance, "unload")
            assert done.returncode == 0, done.stderr
            assert not pin.exists()
        assert "prog/xdp" not in _run("ip", "-n", ns, "link", "show", "dev", "whla").stdout
    finally:
        for instance, pin in zip((edge, worker), pins, strict=True):
            if pin.exists():
                ctl(instance, "unload")
                shutil.rmtree(pin, ignore_errors=True)
        _run("ip", "netns", "del", ns)
