"""scale: the control plane at 200,000 apps / 600,000 machines / 30 regions.

Three child processes, so each RSS is its own:

- ``build``: the synthetic state (``synth``) validated, written into SQLite and
  bulk-loaded into a single-member etcd on loopback (started by the parent).
- ``cp``: the control plane as the daemon runs it, following the SQLite database:
  ``SqliteSource`` (validate) -> ``place`` for one edge -> ``Dataplane.load_in_child``
  (a real edge program with large limits, attached to no interface; compiled in a
  short-lived child as the daemon does) -> ``sync`` in
  growing steps -> ``gc.freeze()`` -> one-machine changes through SQLite; then the
  same with an ``EtcdSource`` on the etcd member. RSS after each stage (the memory
  per component) and the peak (VmHWM). Kernel map memory from `bpftool map show`.
- ``file``: the file source at 100, 1,000 and 200,000 apps: one-machine changes
  written to the YAML file (atomic rename of the whole file) -> inotify or the 20 ms
  stat poll -> changed items re-parsed and validated -> place the changed apps ->
  partial ``sync``.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from edgebench.common import REPO, VENV_PYTHON, BenchError, Result, Row, rss_kib

PIN_ROOT = Path("/sys/fs/bpf/edgeproxy")
STEPS = (1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 200_000)
CHANGES = 200  # one-machine changes timed per source
FILE_APPS = (100, 1000)  # the file source at lab scale; and at the full scale
FILE_CHANGES = 100
POLL_S = 0.02  # the polling sources' interval (sources.DEFAULT_POLL_INTERVAL)
ETCD_TXN_OPS = 128  # etcd's default --max-txn-ops: the bulk loader stays within it


def _mib() -> float:
    return rss_kib(os.getpid())[0] / 1024


def _map_memory(pin_dir: Path) -> int:
    total = 0
    for pin in sorted(pin_dir.iterdir()):
        if pin.name.startswith("prog_"):
            continue
        out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(pin)],
                             capture_output=True, text=True, timeout=30, check=False)
        if out.returncode == 0:
            total += int(json.loads(out.stdout).get("bytes_memlock", 0))
    return total


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


# ------------------------------------------------------------------ build


def bulk_load_etcd(endpoint: str, layout: dict[bytes, bytes]) -> tuple[int, float]:
    """Put every key, ``ETCD_TXN_OPS`` per transaction (etcd caps a transaction's
    operations); returns (transactions, seconds). For loading a big state into an
    empty prefix: not atomic as a whole, unlike ``sources.write_state``."""
    from edgeproxy.etcd import EtcdClient

    client = EtcdClient([endpoint], timeout=30.0)
    items = list(layout.items())
    t0 = time.perf_counter()
    txns = 0
    for start in range(0, len(items), ETCD_TXN_OPS):
        client.txn(dict(items[start:start + ETCD_TXN_OPS]))
        txns += 1
    return txns, time.perf_counter() - t0


def build(db: Path, apps: int, endpoint: str | None) -> dict[str, Any]:
    import sqlite3

    from edgebench import synth
    from edgeproxy.sources import etcd_layout, write_sqlite_state
    from edgeproxy.state import parse_state

    out: dict[str, Any] = {}
    data = synth.build(apps)
    out["machines"] = len(data["machines"])
    out["rss_plain_data_mib"] = _mib()
    t0 = time.perf_counter()
    state = parse_state(data, "synthetic")
    out["validate_plain_s"] = time.perf_counter() - t0
    del data
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    write_sqlite_state(conn, state)
    conn.close()
    if endpoint:
        layout = etcd_layout(state)
        out["etcd_keys"] = len(layout)
        out["etcd_txns"], out["etcd_load_s"] = bulk_load_etcd(endpoint, layout)
        del layout
    return out


# ----------------------------------------------------------- control plane


def _place_and_sync(dp: Any, before: Any, new: Any, edge: str) -> None:
    """What ``Daemon.apply`` does for a change: the changed apps' services, a partial sync."""
    from edgeproxy.placement import place_service

    apps = new.changed_apps
    if apps is None:
        from edgeproxy.placement import place

        dp.sync(place(new, edge))
        return
    sids = sorted(s.id for a in apps for s in new.services_by_app.get(a, ()))
    gone = {s.id for a in apps for s in before.services_by_app.get(a, ())} - set(sids)
    dp.sync([place_service(new, sid, edge) for sid in sids], partial=True, removed=gone)


def _changes(dp: Any, source: Any, write: Callable[[str, str], None], poll: bool,
             apps: int, count: int) -> dict[str, Any]:
    """One-machine changes: ``write(machine, state)`` -> the source sees it -> kernel maps.

    Polling sources are polled on a 20 ms grid, as the daemon's source loop does, and
    each write lands at a random point between polls, so the figures include the wait
    for the next poll. The etcd source reads its watch (``step``) as the daemon does.
    """
    from edgebench import synth

    rng = random.Random(4)
    lat: list[float] = []
    work: list[float] = []
    full = source.full_reads
    last = ""
    start = time.perf_counter()
    gc_before = gc.get_stats()
    for i in range(count):
        machine = f"app{rng.randrange(apps):06d}-m0"
        state = "stopped" if i % 2 == 0 else "started"
        if i % 2:
            machine = last
        last = machine
        if poll:
            time.sleep(rng.random() * POLL_S)
        before = source.current()
        t0 = time.perf_counter()
        write(machine, state)
        while True:
            if poll:
                tick = start + (int((time.perf_counter() - start) / POLL_S) + 1) * POLL_S
                time.sleep(max(0.0, tick - time.perf_counter()))
            t1 = time.perf_counter()
            new = source.poll() if poll else source.step()
            if new is None:
                continue
            _place_and_sync(dp, before, new, synth.EDGE_ID)
            t2 = time.perf_counter()
            lat.append((t2 - t0) * 1000)
            work.append((t2 - t1) * 1000)
            break
    collections = sum(s["collections"] for s in gc.get_stats()) - sum(
        s["collections"] for s in gc_before)
    return {"ms": lat, "work_ms": work, "full_reads": source.full_reads - full,
            "gc_collections": collections}


def _dataplane(name: str, big: bool) -> Any:
    from edgeproxy.dataplane import Dataplane, DataplaneConfig

    limits = dict(max_services=262_144, max_machines=1 << 20, max_flows=1 << 16,
                  max_maglev_slots=1 << 22, max_backend_entries=1 << 21) if big else dict(
        max_services=4096, max_machines=16_384, max_flows=1 << 12,
        max_maglev_slots=1 << 18, max_backend_entries=1 << 15)
    return Dataplane(DataplaneConfig(
        instance=f"bench-{os.getpid()}-{name}", role="edge",
        host_address=IPv4Address("10.255.0.0"), **limits))  # type: ignore[arg-type]


def etcd_plane(endpoint: str) -> dict[str, Any]:
    """The control plane following etcd, in its own process as a daemon would be:
    ``EtcdSource`` (read the prefix, validate) -> place -> edge program -> sync ->
    one-machine changes put into etcd. RSS after each stage."""
    from edgebench import synth
    from edgeproxy.etcd import EtcdClient
    from edgeproxy.placement import place
    from edgeproxy.sources import DEFAULT_ETCD_PREFIX, EtcdSource

    out: dict[str, Any] = {"rss_etcd_start_mib": _mib()}
    t0 = time.perf_counter()
    source = EtcdSource([endpoint], timeout=30.0)
    out["etcd_load_s"] = time.perf_counter() - t0
    gc.collect()
    out["rss_etcd_mib"] = _mib()
    apps = len(source.current().apps)
    dp = _dataplane("scale", big=True)
    try:
        dp.load_in_child()
        tables = place(source.current(), synth.EDGE_ID)
        dp.sync(tables)
        out["etcd_synced_s"] = time.perf_counter() - t0  # read, validated, placed, synced
        del tables
        gc.collect()
        gc.freeze()  # as the daemon does after a full apply
        out["rss_etcd_steady_mib"] = _mib()
        client = EtcdClient([endpoint])
        source.step()  # opens the watch (nothing to read yet)
        current = source.current()

        def write_etcd(machine: str, state: str) -> None:
            m = current.machines[machine]
            doc = {"id": m.id, "app": m.app, "host": m.host, "address": str(m.address),
                   "state": state}
            client.put(f"{DEFAULT_ETCD_PREFIX}machines/{machine}".encode(),
                       json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

        out["etcd"] = _changes(dp, source, write_etcd, False, apps, CHANGES)
        out["rss_after_etcd_changes_mib"] = _mib()
        source.close()
    finally:
        dp.unload()
    out["rss_etcd_peak_mib"] = rss_kib(os.getpid())[1] / 1024
    return out


def control_plane(db: Path, endpoint: str | None, budget_s: float) -> dict[str, Any]:
    import sqlite3

    from edgebench import synth
    from edgeproxy.placement import place
    from edgeproxy.sources import SqliteSource

    out: dict[str, Any] = {"rss_start_mib": _mib()}
    t0 = time.perf_counter()
    source = SqliteSource(db)
    out["sqlite_load_s"] = time.perf_counter() - t0
    out["rss_state_mib"] = _mib()
    out["apps"] = apps = len(source.current().apps)
    out["machines"] = len(source.current().machines)
    t1 = time.perf_counter()
    tables = place(source.current(), synth.EDGE_ID)
    out["place_s"] = time.perf_counter() - t1
    out["rss_placed_mib"] = _mib()
    dp = _dataplane("scale", big=True)
    steps: list[tuple[int, float]] = []
    try:
        t2 = time.perf_counter()
        dp.load_in_child()  # as the daemon does: bcc/LLVM stay out of this process
        out["program_load_s"] = time.perf_counter() - t2
        out["rss_compiled_mib"] = _mib()
        t3 = time.perf_counter()
        prev_n, prev_t = 0, 0.0
        for n in (s for s in STEPS if s <= len(tables)):
            # the next step's cost, guessed linear from the last, must fit the budget
            if prev_n and prev_t * (n / prev_n) > budget_s:
                break
            dp.sync(tables[:n])
            prev_n, prev_t = n, time.perf_counter() - t3
            steps.append((n, prev_t))
        out["sync_steps"] = steps
        out["rss_synced_mib"] = _mib()
        if not steps or steps[-1][0] != len(tables):
            return out
        t4 = time.perf_counter()
        out["resync_unchanged"] = dp.sync(tables).services_written
        out["resync_unchanged_s"] = time.perf_counter() - t4
        del tables
        gc.collect()
        gc.freeze()  # as the daemon does after a full apply
        out["rss_steady_mib"] = _mib()
        out["map_memory_bytes"] = _map_memory(dp.config.pin_dir)

        writer = sqlite3.connect(db, isolation_level=None)

        def write_sqlite(machine: str, state: str) -> None:
            writer.execute("UPDATE machines SET state = ? WHERE id = ?", (state, machine))

        out["sqlite"] = _changes(dp, source, write_sqlite, True, apps, CHANGES)
        writer.close()
        out["rss_after_sqlite_changes_mib"] = _mib()
        out["rss_peak_sqlite_mib"] = rss_kib(os.getpid())[1] / 1024
    finally:
        dp.unload()
    out["rss_end_mib"], out["rss_peak_mib"] = (v / 1024 for v in rss_kib(os.getpid()))
    return out


def file_source(apps: int) -> dict[str, Any]:
    """The file source: each change rewrites the whole YAML file (atomic rename).

    The writer patches its copy of the bytes (the machine's ``state`` and the
    ``version`` line) and writes the file; the clock starts after the rename, as the
    writer's own cost is not the edge's. The edge waits as the daemon's watch does:
    inotify, or the next tick of the 20 ms stat poll.
    """
    from edgebench import synth
    from edgeproxy.placement import place
    from edgeproxy.sources import FileSource

    tmp = Path(tempfile.mkdtemp(prefix="edgebench-file-"))
    path = tmp / "state.yaml"
    out: dict[str, Any] = {"apps": apps, "rss_start_mib": _mib()}
    # written by a child: building 200,000 apps of plain data here would leave this
    # process's peak (and its heap) at the writer's size, not the source's
    try:
        subprocess.run([str(VENV_PYTHON), "-m", "edgebench.scale", "yaml", str(apps), str(path)],
                       check=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO / "tools")})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out["yaml_mib"] = path.stat().st_size / 2**20
    version = [1]

    def write(machine: str, state: str) -> None:
        # The writer reads and drops its copy each time, so the measured RSS is the
        # edge's alone (100 MB buffers come from mmap and go straight back).
        text = path.read_bytes()
        at = text.index(f"- id: {machine}\n".encode())
        at = text.index(b"  state: ", at) + len(b"  state: ")
        end = text.index(b"\n", at)
        head = f"version: {version[0]}\n".encode()
        version[0] += 1
        assert text.startswith(head)
        part = path.with_suffix(".part")
        with part.open("wb") as out_file:
            out_file.write(f"version: {version[0]}\n".encode())
            out_file.write(memoryview(text)[len(head):at])
            out_file.write(state.encode())
            out_file.write(memoryview(text)[end:])
        del text
        part.rename(path)

    t0 = time.perf_counter()
    source = FileSource(path)
    out["load_s"] = time.perf_counter() - t0
    out["indexed"] = source._index is not None
    gc.collect()
    out["rss_source_mib"] = _mib()
    out["rss_peak_load_mib"] = rss_kib(os.getpid())[1] / 1024
    big = apps > 5000
    dp = _dataplane("file", big=big)
    try:
        if big:
            dp.load_in_child()
        else:
            dp.load()
        dp.sync(place(source.current(), synth.EDGE_ID))
        gc.collect()
        gc.freeze()
        out["rss_steady_mib"] = _mib()
        out["rss_peak_before_changes_mib"] = rss_kib(os.getpid())[1] / 1024
        out.update(_changes_after_write(dp, source, write, apps))
        out["rss_after_changes_mib"] = _mib()
    finally:
        dp.unload()
        source.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out["rss_peak_mib"] = rss_kib(os.getpid())[1] / 1024
    return out


def _changes_after_write(dp: Any, source: Any, write: Callable[[str, str], None],
                         apps: int) -> dict[str, Any]:
    from edgebench import synth

    rng = random.Random(5)
    lat: list[float] = []
    work: list[float] = []
    woken = 0
    full = source.full_reads
    start = time.perf_counter()
    last = ""
    for i in range(FILE_CHANGES):
        machine = f"app{rng.randrange(apps):06d}-m0"
        if i % 2:
            machine = last
        last = machine
        time.sleep(rng.random() * POLL_S)
        write(machine, "stopped" if i % 2 == 0 else "started")
        t0 = time.perf_counter()
        before = source.current()
        while True:
            # as FileSource.watch: inotify wakes it, else the next 20 ms tick
            tick = start + (int((time.perf_counter() - start) / POLL_S) + 1) * POLL_S
            woke = source.wait(max(0.0, tick - time.perf_counter()))
            t1 = time.perf_counter()
            new = source.poll()
            if new is None:
                continue
            woken += woke
            _place_and_sync(dp, before, new, synth.EDGE_ID)
            t2 = time.perf_counter()
            lat.append((t2 - t0) * 1000)
            work.append((t2 - t1) * 1000)
            break
    return {"ms": lat, "work_ms": work, "full_reads": source.full_reads - full,
            "woken_by_inotify": woken}


# ------------------------------------------------------------------ parent


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tools'}"}
    p = subprocess.run([str(VENV_PYTHON), "-m", "edgebench.scale", *args], capture_output=True,
                       text=True, env=env, timeout=timeout, check=False)
    # safety net: the child unloads in `finally`, but a killed child leaves pins
    for d in PIN_ROOT.glob("bench-*-*") if PIN_ROOT.exists() else ():
        pid = d.name.split("-")[1]
        if d.name.endswith(("-scale", "-file")) and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
    if p.returncode != 0:
        raise BenchError(f"scale child {args[0]} exited {p.returncode}: {p.stderr[-800:]}")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def _etcd(workdir: Path) -> tuple[Any, str] | None:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from etcd_cluster import EtcdCluster, etcd_missing_reason
    finally:
        sys.path.pop(0)
    if etcd_missing_reason() is not None:
        return None
    cluster = EtcdCluster(workdir, members=1)
    cluster.start()
    return cluster, cluster.endpoints[0]


def measure(result: Result, runs: int, quick: bool) -> None:
    if os.geteuid() != 0:
        raise BenchError("scale needs root (loads a BPF program)")
    budget = 30.0 if quick else 120.0
    apps = int(os.environ.get("EDGEBENCH_SCALE_APPS", "200000"))  # smaller: debugging
    tmp = Path(tempfile.mkdtemp(prefix="edgebench-scale-"))
    etcd = _etcd(tmp)
    try:
        endpoint = etcd[1] if etcd else None
        db = tmp / "state.db"
        b = _child(["build", str(db), str(apps), endpoint or ""], 3600)
        cp = _child(["cp", str(db), endpoint or "", str(budget)], 3600)
        if endpoint and cp["sync_steps"] and cp["sync_steps"][-1][0] == cp["apps"]:
            cp.update(_child(["etcd", endpoint], 3600))
    finally:
        if etcd:
            etcd[0].stop()
        shutil.rmtree(tmp, ignore_errors=True)
    files = [_child(["file", str(n)], 1800) for n in (*FILE_APPS, apps)]
    _report(result, b, cp, files, budget)


def _report(result: Result, b: dict[str, Any], cp: dict[str, Any],
            files: list[dict[str, Any]], budget: float) -> None:
    from edgeproxy.sources import ETCD_PAGE as etcd_page
    build_s = cp["sqlite_load_s"] + cp["place_s"]
    result.rows += [
        Row("validate (SQLite read)", "cold build", "s", [cp["sqlite_load_s"]],
            better="lower").finish(),
        Row("place", "cold build", "s", [cp["place_s"]], better="lower").finish(),
        Row("validate+place", "cold build", "s", [build_s], better="lower", target="<= 30 s",
            met=build_s <= 30).finish(),
        Row("program load", "kernel load", "s", [cp["program_load_s"]],
            better="lower").finish(),
    ]
    n, t = cp["sync_steps"][-1]
    full = n >= cp["apps"]
    result.rows += [
        Row(f"sync {n:,} services", "kernel load", "s", [t], better="lower",
            target="<= 30 s (200,000 services)", met=full and t <= 30,
            notes="" if full else "stopped by the time budget").finish(),
        Row("sync rate", "kernel load", "services/s", [n / t],
            notes="services loaded / cumulative seconds").finish(),
        Row("control-plane RSS (SQLite), peak", "memory", "MiB", [cp["rss_peak_sqlite_mib"]],
            better="lower", target="<= 1024 MiB", met=cp["rss_peak_sqlite_mib"] <= 1024).finish(),
        Row("control-plane RSS (SQLite), steady", "memory", "MiB", [cp["rss_steady_mib"]],
            better="lower").finish(),
    ]
    if "rss_after_etcd_changes_mib" in cp:
        result.rows.append(Row("control-plane RSS (etcd), steady", "memory", "MiB",
                               [cp["rss_after_etcd_changes_mib"]], better="lower",
                               target="<= 1024 MiB",
                               met=cp["rss_after_etcd_changes_mib"] <= 1024).finish())
    if "etcd_load_s" in cp:
        result.rows += [
            Row("etcd source load", "cold build", "s", [cp["etcd_load_s"]], better="lower",
                target="<= 30 s", met=cp["etcd_load_s"] <= 30,
                notes="read at one revision + validation").finish(),
            Row("etcd cold start to synced", "cold build", "s", [cp["etcd_synced_s"]],
                better="lower", notes="+ place + program load + sync").finish(),
            Row("control-plane RSS (etcd), peak", "memory", "MiB", [cp["rss_etcd_peak_mib"]],
                better="lower", target="<= 1024 MiB",
                met=cp["rss_etcd_peak_mib"] <= 1024).finish(),
        ]
    if "map_memory_bytes" in cp:
        gib = cp["map_memory_bytes"] / 2**30
        result.rows.append(Row(f"kernel maps ({n:,} services)", "memory", "GiB", [gib],
                               better="lower", target="<= 2 GiB", met=gib <= 2).finish())
    for name, target in (("sqlite", 50.0), ("etcd", 100.0)):
        if name not in cp:
            continue
        lat = cp[name]["ms"]
        result.rows += [
            Row(f"one change p50 ({name})", "change", "ms", [_pct(lat, 0.5)],
                better="lower").finish(),
            Row(f"one change p99 ({name})", "change", "ms", [_pct(lat, 0.99)], better="lower",
                target=f"<= {target:.0f} ms", met=_pct(lat, 0.99) <= target).finish(),
            Row(f"one change p99, after the {'poll' if name == 'sqlite' else 'watch'} "
                f"({name})", "change", "ms", [_pct(cp[name]["work_ms"], 0.99)],
                better="lower").finish(),
        ]
    for fs in files:
        result.rows += [
            Row(f"one change p50 (file, {fs['apps']:,} apps)", "change", "ms",
                [_pct(fs["ms"], 0.5)], better="lower").finish(),
            Row(f"one change p99 (file, {fs['apps']:,} apps)", "change", "ms",
                [_pct(fs["ms"], 0.99)], better="lower", target="<= 50 ms",
                met=_pct(fs["ms"], 0.99) <= 50).finish(),
            Row(f"one change p99, after the wake (file, {fs['apps']:,} apps)", "change", "ms",
                [_pct(fs["work_ms"], 0.99)], better="lower").finish(),
        ]
    big = files[-1]
    result.rows += [
        Row(f"file source load ({big['apps']:,} apps)", "cold build", "s", [big["load_s"]],
            better="lower", target="<= 30 s", met=big["load_s"] <= 30,
            notes="line scan + items parsed in batches + validation + item index").finish(),
        Row(f"control-plane RSS (file, {big['apps']:,} apps), peak", "memory", "MiB",
            [big["rss_peak_before_changes_mib"]], better="lower", target="<= 1024 MiB",
            met=big["rss_peak_before_changes_mib"] <= 1024,
            notes="cold load to steady; the bench's writer adds its copy of the file "
                  "during the changes").finish(),
        Row(f"control-plane RSS (file, {big['apps']:,} apps), steady", "memory", "MiB",
            [big["rss_after_changes_mib"]], better="lower", target="<= 1024 MiB",
            met=big["rss_after_changes_mib"] <= 1024).finish(),
    ]
    sizes = ", ".join(f"{f['apps']:,}" for f in files)
    mem = (f"RSS by stage (MiB, VmRSS): start {cp['rss_start_mib']:.0f}; SQLite source "
           f"(state + incremental index) {cp['rss_state_mib']:.0f}; + placed tables "
           f"{cp['rss_placed_mib']:.0f}; + edge program loaded (compiled in a child, as the "
           f"daemon does; maps adopted) "
           f"{cp['rss_compiled_mib']:.0f}; + synced (loader caches) "
           f"{cp.get('rss_synced_mib', 0):.0f}; steady after gc.freeze "
           f"{cp.get('rss_steady_mib', 0):.0f}; peak {cp['rss_peak_sqlite_mib']:.0f}.")
    if "rss_etcd_mib" in cp:
        mem += (f" etcd, in its own process: start {cp['rss_etcd_start_mib']:.0f}, etcd source "
                f"(state + incremental index; no raw values kept) {cp['rss_etcd_mib']:.0f}, "
                f"placed, loaded and synced {cp['rss_etcd_steady_mib']:.0f}, after its changes "
                f"{cp['rss_after_etcd_changes_mib']:.0f}, peak {cp['rss_etcd_peak_mib']:.0f} "
                "(reading the prefix: the raw values are held until validated).")
    result.notes += [
        f"Synthetic state: {cp['apps']:,} apps, {cp['machines']:,} machines, 30 regions, "
        "one raw-TCP service per app, machines of an app in 3 regions (tools/edgebench/synth.py).",
        "The state is built, written to SQLite and bulk-loaded into etcd by a separate "
        f"process (plain data {b['rss_plain_data_mib']:.0f} MiB there); the measured process "
        "is the control plane alone: source -> state -> placement -> loader caches.",
        mem,
        "sync steps (services, cumulative seconds): " + ", ".join(
            f"{n_:,}: {t_:.1f}s" for n_, t_ in cp["sync_steps"]),
        f"Unchanged full re-sync of every service: {cp.get('resync_unchanged_s', 0):.2f} s, "
        f"{cp.get('resync_unchanged', 0)} services written.",
        "Kernel map memory is bytes_memlock summed over the instance's pinned maps; the "
        "maps are sized for 262,144 services and 1M machines, so most of it is fixed "
        "preallocation (arrays, per-CPU counters, the conntrack LRU), not per service.",
        f"One-machine change ({CHANGES} per source, alternately stopping and starting an "
        "app's machine): SQLite: commit by another connection -> source polled on a 20 ms "
        "grid (the write lands at a random point between polls, so the wait is included) "
        "-> changed rows validated (state.Incremental) -> place_service for the app's "
        "services -> partial Dataplane.sync. etcd: a put on a single-member etcd on "
        "loopback (fsync included) -> watch event -> the same path. Full re-reads during "
        "the changes: " + ", ".join(f"{k} {cp[k]['full_reads']}" for k in ("sqlite", "etcd")
                                    if k in cp) + "; cyclic GC passes: " + ", ".join(
            f"{k} {cp[k]['gc_collections']}" for k in ("sqlite", "etcd") if k in cp) + ".",
        f"etcd bulk load: {b.get('etcd_keys', 0):,} keys in {b.get('etcd_txns', 0):,} "
        f"transactions of <= {ETCD_TXN_OPS} puts, {b.get('etcd_load_s', 0):.0f} s; the etcd "
        "source reads them at one revision, the kinds side by side on their own "
        f"connections in pages of {etcd_page:,} keys, validating as the pages arrive "
        f"({cp.get('etcd_load_s', 0):.1f} s from nothing to a validated state).",
        f"File source ({sizes} apps; {FILE_CHANGES} changes each): the writer rewrites the "
        "whole file (atomic rename) with one machine's state and the version changed; the "
        "edge wakes on inotify (or the 20 ms stat poll), compares the new bytes with the "
        "applied ones in large chunks, re-parses the changed list items only, validates "
        "them (state.Incremental), places the changed app and syncs it. Woken by inotify: "
        + ", ".join(f"{f['woken_by_inotify']}/{FILE_CHANGES}" for f in files)
        + "; whole-file parses during the changes: "
        + ", ".join(str(f["full_reads"]) for f in files) + f". At {big['apps']:,} apps the "
        f"file is {big['yaml_mib']:.0f} MiB; the source keeps one copy of its bytes "
        f"(the writer keeps none between writes); RSS after load "
        f"{big['rss_source_mib']:.0f} MiB, steady "
        f"{big['rss_steady_mib']:.0f} MiB, after the changes "
        f"{big['rss_after_changes_mib']:.0f} MiB, peak {big['rss_peak_before_changes_mib']:.0f} "
        f"MiB from the cold load to steady (during the load alone "
        f"{big['rss_peak_load_mib']:.0f} MiB; {big['rss_peak_mib']:.0f} MiB with the bench's "
        "writer reading its copy of the file during the changes); cold "
        f"load {big['load_s']:.0f} s (a line scan into list items, parsed in batches as "
        "validation reads them; no node tree for the whole file).",
    ]
    if not full:
        result.notes.append(
            f"The kernel load did not reach 200,000 services within the {budget:.0f} s budget.")


def main() -> int:
    mode = sys.argv[1]
    if mode == "build":
        out = build(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None)
    elif mode == "cp":
        out = control_plane(Path(sys.argv[2]), sys.argv[3] or None, float(sys.argv[4]))
    elif mode == "etcd":
        out = etcd_plane(sys.argv[2])
    elif mode == "file":
        out = file_source(int(sys.argv[2]))
    elif mode == "yaml":
        from edgebench import synth
        from edgeproxy.state import parse_state, to_dict

        state = parse_state(synth.build(int(sys.argv[2])), "synthetic")
        Path(sys.argv[3]).write_text(synth.yaml_text(to_dict(state)))
        return 0
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
