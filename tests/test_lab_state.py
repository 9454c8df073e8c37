"""Issue 4's lab proofs: the edge daemons follow the state file, and refuse a bad one.

Traffic: the client's 198.18.0.2 (through edge-ord) to app `echo` at 198.19.1.1:7;
each machine greets with `<machine-id> <region>`.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import LabHandle
from lab_client import (
    VIA_ORD,
    ClientDriver,
    add_machine_after,
    default_state,
    log_since,
    log_size,
    machine_of,
    region_of,
    set_machine_state,
    wait_until,
)

CONVERGE_S = 5.0  # the file source applies within ~100 ms; this bounds the wait


def _regions_of_new_connections(client: ClientDriver, n: int) -> Counter[str]:
    opened = client.call("open", n=n, source=VIA_ORD)
    assert opened["errors"] == [], opened["errors"]
    client.call("close")
    return Counter(region_of(c["greeting"]) for c in opened["conns"])


def _wait_region(client: ClientDriver, region: str) -> float:
    """Seconds until a new connection lands in `region` (failed tries count as not yet:
    a machine just stopped answers with a reset until the edge stops choosing it)."""
    started = time.monotonic()

    def landed() -> bool:
        tried = client.call("try", source=VIA_ORD)
        return tried["outcome"] == "ok" and region_of(tried["greeting"]) == region
    wait_until(f"new connections go to {region}", landed, CONVERGE_S)
    return time.monotonic() - started


@pytest.mark.root
@pytest.mark.lab
def test_stopping_ord_machines_moves_new_connections_to_ams_and_back(
        lab: LabHandle, tmp_path: Path) -> None:
    try:
        with ClientDriver(lab, tmp_path / "client.err") as client:
            assert _regions_of_new_connections(client, 10) == {"ord": 10}

            stopped = default_state()
            for m in ("echo-ord-1", "echo-ord-2"):
                stopped = set_machine_state(stopped, m, "stopped")
            lab.write_state(stopped)
            to_ams = _wait_region(client, "ams")
            assert _regions_of_new_connections(client, 20) == {"ams": 20}

            lab.reset_state()
            to_ord = _wait_region(client, "ord")
            assert _regions_of_new_connections(client, 20) == {"ord": 20}
        print(f"converged: to ams in {to_ams:.2f}s, back to ord in {to_ord:.2f}s")
    finally:
        lab.reset_state()


def _write_raw(lab: LabHandle, text: str) -> None:
    """Replace the lab's state file atomically, without `tools/lab sync` (which, like
    every reader of the file, would refuse a bad state)."""
    tmp = lab.state_path.with_suffix(".raw")
    tmp.write_text(text)
    os.replace(tmp, lab.state_path)


@pytest.mark.root
@pytest.mark.lab
def test_state_with_dangling_reference_is_refused_and_traffic_keeps_flowing(
        lab: LabHandle, tmp_path: Path) -> None:
    good = default_state()
    # Were it applied, the ord machines would be out and new flows would go to ams.
    bad = good
    for m in ("echo-ord-1", "echo-ord-2"):
        bad = set_machine_state(bad, m, "stopped")
    bad = add_machine_after(bad, "echo-ord-2",
                            "  - {id: echo-ord-9, app: echo, host: worker-nowhere, "
                            "address: 198.18.64.9, state: started}")
    bad_line = bad.splitlines().index(
        next(ln for ln in bad.splitlines() if "echo-ord-9" in ln)) + 1
    try:
        with ClientDriver(lab, tmp_path / "client.err") as client:
            held = client.call("open", n=10, source=VIA_ORD)
            assert held["errors"] == []
            machines_before = {machine_of(c["greeting"]) for c in held["conns"]}
            assert {m.split("-")[1] for m in machines_before} == {"ord"}

            offset = log_size()
            _write_raw(lab, bad)
            located = (f"{lab.state_path.name}:{bad_line}: machines[2].host: "
                       "unknown host worker-nowhere")
            log: str = wait_until("edge-ord logs the refusal",
                                  lambda: located in log_since(offset) and log_since(offset),
                                  CONVERGE_S)
            assert "update refused" in log, log
            assert "kernel maps synced" not in log, log

            # The last good state keeps serving: open flows echo, new ones stay in ord.
            echoed = client.call("echo", size=4096, limit=30, batch=100)
            assert echoed["bad"] == [] and echoed["echoed"] == 10
            after_bad = _new_machines(client, 20)
            assert {m.split("-")[1] for m in after_bad} == {"ord"}, after_bad

            offset = log_size()
            _write_raw(lab, good)
            # the good bytes are the serving state's: nothing to apply, said once
            wait_until("edge-ord is back on the good state",
                       lambda: "back to the serving state" in log_since(offset)
                       or "applied state version" in log_since(offset), CONVERGE_S)
            assert "update refused" not in log_since(offset)
            assert {m.split("-")[1] for m in _new_machines(client, 20)} == {"ord"}
            client.call("close")
    finally:
        if lab.state_path.read_text() != good:
            _write_raw(lab, good)
        lab.reset_state()


def _new_machines(client: ClientDriver, n: int) -> set[str]:
    """Machines that n new connections reach (closed again at once)."""
    got: list[dict[str, Any]] = [client.call("try", source=VIA_ORD) for _ in range(n)]
    assert all(t["outcome"] == "ok" for t in got), got
    return {machine_of(t["greeting"]) for t in got}
