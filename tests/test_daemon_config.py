"""Config checks and the daemon's own health: every bad key of a broken config named
with its path and line (``edgectl config check`` and the daemon's refusal print the
same lines), durations and sizes with units, ``/healthz`` and ``/ready``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import DEFAULT_STATE, REPO
from edgeproxy import __version__, cli
from edgeproxy.config import (
    TOP_KEYS,
    ConfigError,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from edgeproxy.metrics import EdgeproxyCollector, MetricsEndpoint
from edgeproxy.proxy import ProxySettings

PYTHON = Path(sys.executable)
PIN_ROOT = Path("/sys/fs/bpf/edgeproxy")
HTTP_KEYS = [f.name for f in dataclasses.fields(ProxySettings)]

# Every line that ends in "# BAD" is wrong; the test expects exactly those lines named.
BROKEN = """\
instance: edge-ord
role: edge
host_id: edge-ord
colour: blue                   # BAD: no such key
state:
  source: file
  pth: /etc/edgeproxy/state.yaml   # BAD: path misspelt (and so path is missing)
  poll_interval: 5parsecs      # BAD: unknown unit
metrics:
  listne: 127.0.0.1:9109       # BAD: misspelt
idle_timeout_s: 5 minutes      # BAD: not a unit
resync_interval_s: 0ms         # BAD: must be > 0
refuse: reject                 # BAD: rst or drop
http:
  header_timeout: 10s
  queue_limt: 5                # BAD: misspelt
  response_timeout: 3y         # BAD: unknown unit
  queue_limit: -1              # BAD: negative
"""
BROKEN_EXPECTED = [
    (4, "colour", f"unknown key (known: {', '.join(sorted(TOP_KEYS))})"),
    (5, "state.path", "missing required key"),
    (7, "state.pth", "unknown key (known: path, poll_interval, source)"),
    (8, "state.poll_interval", "'5parsecs': unknown unit 'parsecs' (known: ms, s, m, h)"),
    (10, "metrics.listne", "unknown key (known: listen)"),
    (11, "idle_timeout_s", "'5 minutes': unknown unit 'minutes' (known: ms, s, m, h)"),
    (12, "resync_interval_s", "'0ms': must be more than 0"),
    (13, "refuse", "'reject' is not rst or drop"),
    (16, "http.queue_limt", f"unknown key (known: {', '.join(sorted(HTTP_KEYS))})"),
    (17, "http.response_timeout", "'3y': unknown unit 'y' (known: ms, s, m, h)"),
    (18, "http.queue_limit", "-1: must be a finite number >= 0"),
]

GOOD = """\
instance: edge-ord
role: edge
host_id: edge-ord
state: {source: file, path: /etc/edgeproxy/state.yaml, poll_interval: 250ms}
interfaces: [eth0]
attach: tc
refuse: drop
idle_timeout_s: 5m
resync_interval_s: 1
ready_file: /run/edgeproxy/ready
metrics: {listen: "[::1]:9109"}
http:
  header_timeout: 2.5s
  queue_timeout: 500ms
  tunnel_idle_timeout: 1h
  queue_limit: 10
  app_cpu_limit: 0.25
"""


def write(tmp_path: Path, text: str, name: str = "daemon.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), stream=out)
    return code, out.getvalue()


# ------------------------------------------------------------------ check


def test_every_bad_key_of_a_broken_config_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, BROKEN)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    found = [(p.line, p.path, p.reason) for p in err.value.problems]
    assert found == BROKEN_EXPECTED
    assert str(err.value).splitlines() == [
        f"{path}:{line}: {where}: {reason}" for line, where, reason in BROKEN_EXPECTED]
    # every line marked BAD, and no other (line 5, state:, misses its path)
    marked = {i + 1 for i, text in enumerate(BROKEN.splitlines()) if "# BAD" in text}
    assert {line for line, _, _ in BROKEN_EXPECTED} - {5} == marked


def test_config_check_prints_every_problem_and_exits_like_state_check(tmp_path: Path) -> None:
    path = write(tmp_path, BROKEN)
    code, text = run_cli("config", "check", str(path))
    assert code == cli.EXIT_NOTHING_FOUND == 1  # what `state check` gives an invalid file
    assert text.splitlines() == [f"{path}:{line}: {where}: {reason}"
                                 for line, where, reason in BROKEN_EXPECTED]
    code, text = run_cli("config", "check", str(path), "-o", "json")
    assert code == 1
    data = json.loads(text)
    assert data["valid"] is False and data["file"] == str(path)
    assert [(p["line"], p["path"], p["reason"]) for p in data["problems"]] == BROKEN_EXPECTED


def test_config_check_says_ok_for_a_good_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    code, text = run_cli("config", "check", str(path))
    assert code == 0
    assert text.startswith(f"{path}: OK: edge edge-ord (instance edge-ord)")
    code, text = run_cli("config", "check", str(path), "-o", "json")
    assert code == 0 and json.loads(text)["valid"] is True
    assert run_cli("config", "check", str(tmp_path / "missing.yaml"))[0] == cli.EXIT_USAGE


def test_good_config_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.state == {"source": "file", "path": "/etc/edgeproxy/state.yaml",
                            "poll_interval": 0.25}
    assert config.idle_timeout_s == 300.0 and config.resync_interval_s == 1.0
    assert config.http.header_timeout == 2.5 and config.http.queue_timeout == 0.5
    assert config.http.tunnel_idle_timeout == 3600.0 and config.http.queue_limit == 10
    assert config.metrics_listen == "[::1]:9109" and config.refuse == "drop"
    assert config.ready_file == Path("/run/edgeproxy/ready")


def test_the_readme_example_passes_the_check() -> None:
    readme = (REPO / "README.md").read_text()
    example = readme.split("- **Daemon config**")[1].split("```yaml\n")[1].split("```")[0]
    config = parse_config(yaml.safe_load(example))
    assert config.idle_timeout_s == 300.0 and config.http.queue_timeout == 5.0


def test_every_config_the_lab_writes_passes_the_check() -> None:
    from edgelab.lab import daemon_config  # tools/ is on sys.path (conftest)
    from edgelab.statefile import load_lab_state
    from edgelab.topology import build_topology

    topo = build_topology(load_lab_state(DEFAULT_STATE))
    daemons = [n for n in topo.nodes if n.role in ("edge", "worker", "both")]
    assert len(daemons) == 5
    for node in daemons:
        config = parse_config(daemon_config(node, topo, DEFAULT_STATE))
        assert config.host_id == node.name and config.ready_file is not None


@pytest.mark.parametrize(("text", "problem"), [
    ("", ": expected a mapping at the top level, got nothing"),
    ("[1, 2]\n", ":1: expected a mapping at the top level, got a list"),
    ("role: edge\nrole: worker\n", ":2: not valid YAML: duplicate key 'role'"),
    ("role: [edge\n", ":2: not valid YAML: did not find expected ',' or ']'"),
])
def test_unusable_documents_are_one_named_problem(tmp_path: Path, text: str,
                                                   problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}{problem}")


def test_etcd_state_keys_are_checked_by_source() -> None:
    base: dict[str, Any] = {"instance": "i", "role": "edge", "host_id": "h"}
    config = parse_config({**base, "state": {"source": "etcd", "endpoints": ["e:2379"],
                                             "prefix": "/ep/"}})
    assert config.state["endpoints"] == ["e:2379"]
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "state": {"source": "etcd", "path": "/x", "endpoints": []}})
    assert str(err.value).splitlines() == [
        "state.path: unknown key (known: endpoints, prefix, source)",
        "state.endpoints: expected at least one entry",
    ]
    with pytest.raises(ConfigError, match=r"^state.source: 'zookeeper' is not one of file"):
        parse_config({**base, "state": {"source": "zookeeper"}})


# -------------------------------------------------------- durations, sizes


@pytest.mark.parametrize(("value", "seconds"), [
    ("5s", 5.0), ("250ms", 0.25), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5),
    (" 10 s ", 10.0), (5, 5.0), (0.5, 0.5), (0, 0.0), ("0s", 0.0),
])
def test_durations_parse(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "size"), [
    ("64KiB", 65536), ("1MiB", 1 << 20), ("2GiB", 2 << 30), ("512B", 512),
    ("500kB", 500_000), ("1.5MiB", 1572864), (4096, 4096), (0, 0),
])
def test_sizes_parse(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(("parse", "value", "message"), [
    (parse_duration, "5x", "'5x': unknown unit 'x' (known: ms, s, m, h)"),
    (parse_duration, "5", "'5': a duration string needs a unit"),
    (parse_duration, "soon", "'soon' is not a duration"),
    (parse_duration, -1, "-1: a duration must be a finite number >= 0"),
    (parse_duration, True, "expected a duration"),
    (parse_duration, [5], "expected a duration (seconds, or a string like 5s, 250ms, 1m), "
                          "got a list"),
    (parse_size, "64KB/s", "'64KB/s' is not a size"),
    (parse_size, "64Kb", "'64Kb': unknown unit 'Kb' (known: B, KiB, MiB, GiB, kB, KB, MB, GB)"),
    (parse_size, "1.5B", "'1.5B': not a whole number of bytes"),
    (parse_size, -1, "-1: a size must be >= 0"),
    (parse_size, 1.5, "expected a size (bytes, or a string like 64KiB, 1MiB), got a number"),
])
def test_bad_units_are_named_errors(parse: Any, value: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(value)
    assert str(err.value).startswith(message)


def test_a_bad_unit_names_the_field_never_a_traceback() -> None:
    base: dict[str, Any] = {"instance": "i", "role": "edge", "host_id": "h",
                            "state": {"path": "s.yaml"}}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "http": {"connect_timeout": "2 fortnights"}})
    assert str(err.value) == \
        "http.connect_timeout: '2 fortnights': unknown unit 'fortnights' (known: ms, s, m, h)"


# ------------------------------------------------------ the daemon refuses


def test_daemon_refuses_a_bad_config_with_the_check_lines(tmp_path: Path) -> None:
    path = write(tmp_path, BROKEN)
    done = subprocess.run([str(PYTHON), "-m", "edgeproxy.daemon", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    _, check = run_cli("config", "check", str(path))
    lines = done.stderr.splitlines()
    assert lines[:len(BROKEN_EXPECTED)] == check.splitlines()
    assert lines[len(BROKEN_EXPECTED):] == [
        f"edgeproxy: not started: {path} fails the config check"]


# ------------------------------------------------------- /healthz, /ready


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_endpoint_answers_healthz_and_ready_with_the_reason() -> None:
    reason: list[str | None] = ["state not applied yet"]
    endpoint = MetricsEndpoint.start("127.0.0.1:0", ready=lambda: reason[0])
    base = f"http://127.0.0.1:{endpoint.port}"
    try:
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/ready") == (503, "not ready: state not applied yet\n")
        assert get(f"{base}/metrics") == (503, "starting\n")  # no collector yet
        endpoint.collect(EdgeproxyCollector())
        reason[0] = None
        assert get(f"{base}/ready") == (200, "ready\n")
        status, text = get(f"{base}/metrics")
        assert status == 200
        assert f'edgeproxy_build_info{{python="{sys.version.split()[0]}",' \
               f'version="{__version__}"}} 1.0' in text
        assert get(f"{base}/nope")[0] == 404
    finally:
        endpoint.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKER_STATE = """\
version: 1
regions:
  - {code: ord, position: [41.97, -87.90]}
hosts:
  - {id: worker-t, role: worker, region: ord, address: 127.0.0.61}
apps: []
services: []
machines: []
"""


@pytest.fixture
def worker_daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A worker daemon with no interfaces on loopback; its pins removed afterwards."""
    instance = f"test-ready-{os.getpid()}"
    port = free_port()
    state = write(tmp_path, WORKER_STATE, "state.yaml")
    config = write(tmp_path, yaml.safe_dump({
        "instance": instance, "role": "worker", "host_id": "worker-t",
        "state": {"source": "file", "path": str(state), "poll_interval": "100ms"},
        "interfaces": [], "metrics": {"listen": f"127.0.0.1:{port}"},
        "ready_file": str(tmp_path / "ready"), "http": {"processes": 1},
    }))
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen([str(PYTHON), "-m", "edgeproxy.daemon", "--config",
                                   str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield daemon, f"http://127.0.0.1:{port}", log
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)
        shutil.rmtree(PIN_ROOT / instance, ignore_errors=True)


@pytest.mark.root
def test_worker_daemon_answers_healthz_and_ready_over_http(
        worker_daemon: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    daemon, base, log = worker_daemon
    deadline = time.monotonic() + 90
    seen: list[tuple[int, str]] = []
    while time.monotonic() < deadline:
        assert daemon.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            answer = get(f"{base}/ready")
        except OSError:  # not listening yet
            time.sleep(0.05)
            continue
        seen.append(answer)
        if answer[0] == 200:
            break
        time.sleep(0.05)
    assert seen and seen[-1] == (200, "ready\n"), (seen[-3:], log.read_text()[-2000:])
    for status, text in seen[:-1]:  # before that, 503 and why
        assert status == 503 and text.startswith("not ready: "), (status, text)
    # /ready answers while the programs compile (seconds): the endpoint comes up first
    assert (503, "not ready: loading the kernel programs (no interface)\n") in seen
    assert get(f"{base}/healthz") == (200, "ok\n")
    status, text = get(f"{base}/metrics")
    assert status == 200 and "edgeproxy_build_info{" in text
    assert "Traceback" not in log.read_text(errors="replace")
