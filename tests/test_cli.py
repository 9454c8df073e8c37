"""edgectl: golden table/JSON output over fixed data, exit codes, permissions,
completion; and (root, kernel) load/status/maps/unload on a throwaway instance."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from conftest import DEFAULT_STATE, REPO, LabHandle
from edgeproxy import bpfmaps as bm
from edgeproxy import cli, render
from edgeproxy import introspect as ins
from edgeproxy.dataplane import Counters, DataplaneConfig, Flow, MachineCounters, ServiceCounters
from edgeproxy.introspect import AppTcpTotals, Attachment, MapInfo, Names, ProgramInfo
from edgeproxy.state import parse_yaml

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("EDGEPROXY_UPDATE_GOLDEN") == "1"
EDGECTL = REPO / ".venv" / "bin" / "edgectl"

STATE_YAML = """\
version: 3
regions:
  - {code: ord, position: [41.97, -87.90]}
  - {code: ams, position: [52.31, 4.76]}
hosts:
  - {id: edge-ord, role: edge, region: ord, address: 198.18.0.11}
  - {id: worker-ams, role: worker, region: ams, address: 198.18.0.22}
apps:
  - {name: echo, addresses: [198.19.1.1]}
  - {name: web, addresses: [198.19.0.80], hostnames: [web.lab]}
services:
  - {id: echo-tcp, app: echo, protocol: tcp, ports: [7], internal_port: 7000, handlers: [],
     concurrency: {type: connections, soft_limit: 10, hard_limit: 20}}
  - {id: web-http, app: web, protocol: tcp, ports: [80], internal_port: 8080,
     handlers: [http], concurrency: {type: requests, soft_limit: 10, hard_limit: 20}}
machines:
  - {id: echo-ams-1, app: echo, host: worker-ams, address: 198.18.65.1, state: started}
  - {id: web-ams-1, app: web, host: worker-ams, address: 198.18.65.11, state: started}
"""
BAD_STATE_YAML = """\
version: 1
regions:
  - {code: ord}
hosts:
  - {id: edge-ord, role: edge, region: nowhere, address: 198.18.0.11}
apps: []
services: []
machines:
  - {id: m1, app: ghost, host: edge-ord, address: 10.0.0.1, state: started}
"""


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with EDGEPROXY_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from {path}"


def check_both(name: str, data: Any, table: str) -> None:
    check_golden(f"{name}.json", render.to_json(data))
    check_golden(f"{name}.txt", table)
    json.loads(render.to_json(data))


# ------------------------------------------------------------- fixed data

PROGRAMS = [
    ProgramInfo("edge_sweep", 191, "cd6ab588fc57f0e6", "xdp", 1795456970, ()),
    ProgramInfo("edge_xdp", 190, "9149e3a6ec6a2695", "xdp", 1795456970,
                (Attachment("to-client", "xdp", "driver"),
                 Attachment("to-worker-ams", "xdp", "generic"))),
]
MAPS = [
    MapInfo("conntrack", "lru_hash", 12, 1048576, 109052800, 16, 24),
    MapInfo("machine_stats", "percpu_array", 2, 65536, 8913208, 4, 64),
    MapInfo("services", "hash", 2, 524288, 8389680, 8, 24),
    MapInfo("config", "array", 1, 1, 328, 4, 16),
]
FLOWS = [
    Flow(IPv4Address("198.18.0.2"), 40002, IPv4Address("198.19.1.1"), 7, "echo", "echo-tcp",
         "echo-ams-1", "closed", 12.25, 13.5, 6, 1000, 5, 1_500_000),
    Flow(IPv4Address("198.18.0.2"), 40001, IPv4Address("198.19.1.1"), 7, "echo", "echo-tcp",
         "echo-ams-1", "open", 0.5, 3725.0, 2, 0, 1, 27),
    Flow(IPv4Address("198.18.0.3"), 51000, IPv4Address("198.19.1.1"), 7, "echo", "echo-tcp",
         "echo-ord-1", "fin-in", 125.0, 130.0, 800, 2_000_000, 900, 3_000_000_000),
]
TCP = {"echo": AppTcpTotals("echo", connects=6, disconnects=5, active=1, refused=2,
                            bytes_in=6000, bytes_out=6150, packets_in=40, packets_out=42)}
HTTP = {"web": {"200": 5, "503": 1}, "": {"404": 3}}
NAMES = Names(machines={0: ("echo", "echo-ams-1"), 1: ("echo", "echo-ord-1")},
              services={0: ("echo", "echo-tcp")})


def decoded(name: str, key: Any, value: Any) -> dict[str, Any]:
    return ins.DECODERS[name](key, value, NAMES)


def dump_rows() -> dict[str, list[dict[str, Any]]]:
    vip, client = bm.be32(IPv4Address("198.19.1.1")), bm.be32(IPv4Address("198.18.0.2"))
    return {
        "services": [
            decoded("services", bm.ServiceKey(vip, 0, 6),
                    bm.ServiceValue(id=0xFFFFFFFF, flags=bm.SVC_F_VIP_MARKER)),
            decoded("services", bm.ServiceKey(vip, bm.be16(7), 6),
                    bm.ServiceValue(id=0, gen=1, maglev_size=211, backend_count=2,
                                    hard_limit=20)),
        ],
        "conntrack": [
            decoded("conntrack", bm.CtKey(client, vip, bm.be16(40001), bm.be16(7), 6),
                    bm.CtValue(flags=0, last_seen_ns=5_000_000_000, machine=0, service=0,
                               created_ns=1_000_000_000, packets_in=3, bytes_in=40,
                               packets_out=2, bytes_out=67)),
            decoded("conntrack", bm.CtKey(client, vip, bm.be16(40002), bm.be16(7), 6),
                    bm.CtValue(flags=bm.CT_FIN_IN | bm.CT_FIN_OUT | bm.CT_CLOSED,
                               last_seen_ns=4_000_000_000, machine=1, service=0)),
        ],
        "machines": [
            decoded("machines", bm.U32(0), bm.MachineValue(
                addr=bm.be32(IPv4Address("198.18.65.1")),
                worker=bm.be32(IPv4Address("198.18.0.22")), port=bm.be16(7000),
                flags=bm.MACHINE_F_IN_USE)),
        ],
        "anomalies": [decoded("anomalies", bm.U32(i), bm.U64(v))
                      for i, v in enumerate((0, 3, 0))],
    }


# ------------------------------------------------------------------ golden


def test_status_golden() -> None:
    status = render.status_json("edge-ord", "edge", "/sys/fs/bpf/edgeproxy/edge-ord",
                                "198.18.0.11", PROGRAMS, MAPS)
    check_both("status", status, render.status_table(status))


def test_maps_list_golden() -> None:
    maps = render.maps_json(MAPS)
    check_both("maps_list", maps, render.maps_table(maps))


@pytest.mark.parametrize("name", ["services", "conntrack", "machines", "anomalies"])
def test_maps_dump_golden(name: str) -> None:
    rows = dump_rows()[name]
    check_both(f"maps_dump_{name}", rows, render.rows_table(rows))


def test_conns_golden() -> None:
    flows = render.flows_json(FLOWS)
    assert [f["client"] for f in flows][:2] == ["198.18.0.2:40001", "198.18.0.2:40002"]
    check_both("conns", flows, render.flows_table(flows))


def test_stats_golden() -> None:
    stats = render.stats_json("edge-ord", TCP, HTTP)
    check_both("stats", stats, render.stats_table(stats))
    offline = render.stats_json("edge-ord", TCP, None)
    check_both("stats_no_daemon", offline, render.stats_table(offline))


def test_rates_golden() -> None:
    before = render.stats_json("edge-ord", TCP, HTTP)
    later = {"echo": AppTcpTotals("echo", connects=16, disconnects=15, active=1, refused=2,
                                  bytes_in=26480, bytes_out=6150)}
    after = render.stats_json("edge-ord", later, {"web": {"200": 9, "503": 1},
                                                  "": {"404": 3}})
    rates = render.rates_json(before, after, 2.0)
    assert rates["apps"][1]["connects_per_s"] == 5.0
    check_both("stats_rates", rates, render.rates_table(rates))


def test_state_show_golden() -> None:
    summary = render.state_summary_json(parse_yaml(STATE_YAML, "state.yaml"), "state.yaml")
    check_both("state_show", summary, render.state_summary_table(summary))


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), stream=out)
    return code, out.getvalue()


def test_state_check_reports_lines_and_exits_1(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(BAD_STATE_YAML)
    code, text = run("state", "check", "bad.yaml")
    assert code == 1
    assert "bad.yaml:5: hosts[0].region" in text
    check_golden("state_check_bad.txt", text)
    code, text = run("state", "check", "bad.yaml", "-o", "json")
    assert code == 1
    check_golden("state_check_bad.json", text)


def test_state_check_and_show_of_the_lab_state() -> None:
    code, text = run("state", "check", str(DEFAULT_STATE))
    assert code == 0 and "valid" in text
    code, text = run("state", "show", str(DEFAULT_STATE), "-o", "json")
    assert code == 0
    assert {a["app"] for a in json.loads(text)["apps"]} >= {"echo", "web"}
    assert run("state", "check", "/nonexistent/state.yaml")[0] == 2
    assert run("state", "show")[0] == 2


# ----------------------------------------------------- exit codes, errors


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["maps", "dump"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["maps", "dump", "no_such_map"])
    assert exc.value.code == 2


def test_no_pinned_maps_is_one_line_and_exit_1(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run("--pin-root", str(tmp_path), "--instance", "nope", "status")
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "no pinned maps" in err and "nope" in err


def test_instance_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EDGEPROXY_INSTANCE", "from-env")
    assert run("--pin-root", str(tmp_path), "conns")[0] == 1
    assert "from-env" in capsys.readouterr().err


def _fake_pins(root: Path) -> None:
    (root / "inst").mkdir()
    for name in ("config", "conntrack"):
        (root / "inst" / name).write_text("")


def test_missing_permission_is_one_clear_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _fake_pins(tmp_path)

    def denied(path: object) -> int:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(bm, "obj_get", denied)
    code, _ = run("--pin-root", str(tmp_path), "--instance", "inst", "stats")
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "permission denied" in err and "needs root" in err and "CAP_BPF" in err


@pytest.mark.root
def test_missing_permission_as_an_unprivileged_user(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    os.chmod(tmp_path, 0o755)
    _fake_pins(tmp_path)
    done = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(EDGECTL),
         "--pin-root", str(tmp_path), "--instance", "inst", "status"],
        capture_output=True, text=True, timeout=30, check=False)
    if "Permission denied" in done.stderr and "edgectl:" not in done.stderr:
        pytest.skip(f"the venv is not readable by nobody: {done.stderr.strip()[:200]}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("edgectl: permission denied") and "root" in done.stderr


@dataclass
class FakeDataplane:
    config: DataplaneConfig
    samples: list[Counters] = field(default_factory=list)

    def read_counters(self) -> Counters:
        return self.samples.pop(0) if len(self.samples) > 1 else self.samples[0]


def _counters(opened: int) -> Counters:
    m = MachineCounters("echo", "echo-ams-1", 7000, opened, 1, opened - 1, 0, 0, 10, 100 * opened,
                        10, 50, )
    return Counters(machines=(m,), services=(ServiceCounters("echo", "echo-tcp", 0, 0, 0, 0,
                                                             0),))


def test_stats_and_watch_over_a_fake_dataplane(monkeypatch: pytest.MonkeyPatch) -> None:
    dp = FakeDataplane(DataplaneConfig("t", "edge", IPv4Address("10.0.0.1")),
                       [_counters(1), _counters(3), _counters(7)])
    monkeypatch.setattr(ins, "open_dataplane", lambda instance, root: dp)
    monkeypatch.setattr(cli, "fetch_http_responses", lambda url: {"web": {"200": 1}})
    code, text = run("stats", "--app", "echo", "-o", "json")
    assert code == 0
    assert json.loads(text)["apps"][0]["tcp"]["connects"] == 1
    code, text = run("stats", "--watch", "--interval", "0", "--count", "2", "-o", "json")
    lines = [json.loads(line) for line in text.splitlines()]
    assert code == 0 and len(lines) == 2
    assert [a["app"] for a in lines[0]["apps"]] == ["echo", "web"]
    assert run("stats", "--app", "nope")[0] == 1


def test_http_counters_are_optional() -> None:
    assert cli.fetch_http_responses("http://127.0.0.1:1/metrics") is None


def test_bash_completion_walks_the_command_tree(tmp_path: Path) -> None:
    code, script = run("completion", "bash")
    assert code == 0 and "complete -F _edgectl edgectl" in script
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    (tmp_path / "c.sh").write_text(script)

    def complete(*words: str) -> set[str]:
        probe = (f'source {tmp_path / "c.sh"}; COMP_WORDS=(edgectl {" ".join(words)}); '
                 f'COMP_CWORD={len(words)}; _edgectl; echo "${{COMPREPLY[@]}}"')
        done = subprocess.run([bash, "-c", probe], capture_output=True, text=True,
                              timeout=10, check=True)
        return set(done.stdout.split())

    assert {"load", "unload", "status", "maps", "conns", "stats", "state", "run",
            "completion"} <= complete("")
    assert complete("maps", "d") == {"dump"}
    assert complete("maps", "dump", "conn") == {"conntrack"}
    assert "--watch" in complete("stats", "--")


# ------------------------------------------------------- kernel (root)


def _nsenter(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # nsenter, not `ip netns exec`: that remounts /sys and hides /sys/fs/bpf
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *cmd], capture_output=True,
                          text=True, timeout=120, check=check)


@pytest.mark.root
@pytest.mark.kernel
def test_load_status_dump_unload_on_a_throwaway_instance() -> None:
    pytest.importorskip("bcc")
    ns, instance = f"epctl{os.getpid()}", f"test-ctl-{os.getpid()}"
    pins = Path("/sys/fs/bpf/edgeproxy") / instance
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "ctla", "type", "veth", "peer", "name",
                        "ctlb"], check=True, timeout=10)
        for dev in ("ctla", "ctlb"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True, timeout=10)
        ctl = [str(EDGECTL), "--instance", instance]
        done = _nsenter(ns, *ctl, "load", "--iface", "ctla", "--role", "edge",
                        "--host-address", "10.99.0.1", check=False)
        assert done.returncode == 0, done.stderr
        status = json.loads(_nsenter(ns, *ctl, "status", "-o", "json").stdout)
        assert status["role"] == "edge" and status["host_address"] == "10.99.0.1"
        programs = {p["name"]: p for p in status["programs"]}
        assert programs["edge_tc"]["attached"] == [
            {"device": "ctla", "hook": "tc", "mode": "clsact/ingress"}]  # the default hook
        assert programs["edge_xdp"]["attached"] == []
        done = _nsenter(ns, *ctl, "load", "--iface", "ctla", "--attach", "xdp", check=False)
        assert done.returncode == 0, done.stderr  # switching hooks on a loaded instance
        status = json.loads(_nsenter(ns, *ctl, "status", "-o", "json").stdout)
        programs = {p["name"]: p for p in status["programs"]}
        xdp = programs["edge_xdp"]
        assert xdp["attached"] == [{"device": "ctla", "hook": "xdp", "mode": "driver"}]
        assert programs["edge_tc"]["attached"] == []
        assert len(xdp["tag"]) == 16
        maps = {m["name"]: m for m in status["maps"]}
        assert maps["conntrack"]["type"] == "lru_hash" and maps["conntrack"]["entries"] == 0
        assert maps["config"]["entries"] == 1 and maps["conntrack"]["memory_bytes"] > 0
        config = json.loads(_nsenter(ns, *ctl, "maps", "dump", "config", "-o", "json").stdout)
        assert config == [{"host_address": "10.99.0.1", "flags": "refuse-rst,resteer",
                           "flood_cap": 0}]
        assert _nsenter(ns, *ctl, "conns", check=False).returncode == 1
        assert _nsenter(ns, *ctl, "maps", "dump", "services", check=False).returncode == 1
        done = _nsenter(ns, *ctl, "unload", check=False)
        assert done.returncode == 0 and "ctla" in done.stdout, done.stderr
        assert not pins.exists()
        net = json.loads(_nsenter(ns, "bpftool", "-j", "net", "show").stdout)
        assert not net[0]["xdp"]
        assert _nsenter(ns, *ctl, "status", check=False).returncode == 1
    finally:
        if pins.exists():
            _nsenter(ns, str(EDGECTL), "--instance", instance, "unload", check=False)
            shutil.rmtree(pins, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


@pytest.mark.root
@pytest.mark.lab
def test_scan_matches_key_by_key_reads_on_a_real_map(lab: LabHandle) -> None:
    """BPF_MAP_LOOKUP_BATCH (scan_raw) and GET_NEXT_KEY see the same entries."""
    dp = ins.open_dataplane("edge-ord")
    try:
        for name in ("services", "machines", "machine_labels"):  # not changing meanwhile
            m = dp.maps[name]
            batch = dict(ins.scan_raw(m))
            by_key = {bytes(k): m.lookup_raw(k) for k in m.keys()}  # noqa: SIM118 (BpfMap)
            assert batch == by_key, name
    finally:
        dp.close()
