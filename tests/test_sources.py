"""State sources with real files and a real SQLite database written by another process."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from edgeproxy.placement import place
from edgeproxy.sources import FileSource, SqliteSource, StateSource, make_source, write_state
from edgeproxy.state import ClusterState, StateError, load_state, to_dict

LAB_STATE = Path(__file__).resolve().parents[1] / "tools" / "edgelab" / "state.yaml"
LAB_TEXT = LAB_STATE.read_text()
STATE = load_state(LAB_STATE)
WAIT = 5.0  # seconds: generous, so a loaded CI box does not flake; speed is for benchmarks


def lab_text(version: int) -> str:
    return LAB_TEXT.replace("version: 1\n", f"version: {version}\n")


def replace_atomically(path: Path, text: str) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(text)
    os.replace(staging, path)


async def next_state(source: StateSource, write: Callable[[], None]) -> tuple[ClusterState, float]:
    """Start watching, make the change, and return the first new state and its delay."""
    updates = source.watch()
    waiting = asyncio.ensure_future(anext(updates))
    await asyncio.sleep(0)  # the watcher is running before the write
    started = time.monotonic()
    await asyncio.to_thread(write)
    state = await asyncio.wait_for(waiting, WAIT)
    elapsed = time.monotonic() - started
    await updates.aclose()  # type: ignore[attr-defined]
    return state, elapsed


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    file = tmp_path / "state.yaml"
    file.write_text(LAB_TEXT)
    return file


def test_file_source_starts_with_the_file(state_file: Path) -> None:
    source = FileSource(state_file)
    assert source.current() == STATE
    assert (source.rejected, source.last_error) == (0, None)


def test_file_source_refuses_a_bad_first_state(tmp_path: Path) -> None:
    file = tmp_path / "state.yaml"
    file.write_text("version: one\n")
    with pytest.raises(StateError):
        FileSource(file)


@pytest.mark.parametrize("atomic", [True, False], ids=["rename", "in-place"])
def test_file_source_applies_a_write(state_file: Path, atomic: bool) -> None:
    source = FileSource(state_file)
    text = lab_text(2)

    def write() -> None:
        if atomic:
            replace_atomically(state_file, text)
        else:
            state_file.write_text(text)

    state, elapsed = asyncio.run(next_state(source, write))
    assert state.version == 2
    assert source.current() is state
    print(f"file change applied after {elapsed * 1000:.1f} ms")


def test_file_source_keeps_the_last_good_state_on_a_bad_write(state_file: Path) -> None:
    source = FileSource(state_file)
    bad = LAB_TEXT.replace("soft_limit: 50, hard_limit: 100", "soft_limit: 300, hard_limit: 200")
    replace_atomically(state_file, bad)
    assert source.poll() is None
    assert source.rejected == 1
    assert source.last_error is not None
    assert "services[1].concurrency: soft_limit 300 > hard_limit 200" in source.last_error
    assert str(state_file) in source.last_error
    assert source.current() == STATE

    replace_atomically(state_file, lab_text(3))
    applied = source.poll()
    assert applied is not None and applied.version == 3
    assert source.current().version == 3
    assert source.rejected == 1


def test_file_source_says_when_the_good_state_is_back(
        state_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = FileSource(state_file)
    bad = LAB_TEXT.replace("soft_limit: 50, hard_limit: 100", "soft_limit: 300, hard_limit: 200")
    replace_atomically(state_file, bad)
    assert source.poll() is None and source.rejected == 1
    caplog.set_level("INFO", logger="edgeproxy.sources")
    replace_atomically(state_file, LAB_TEXT)  # the serving state's own bytes
    assert source.poll() is None  # nothing to apply
    assert "back to the serving state version" in caplog.text
    caplog.clear()
    replace_atomically(state_file, LAB_TEXT)
    source.poll()
    assert "back to the serving state" not in caplog.text  # said once
    assert source.current() == STATE and source.rejected == 1


def test_file_source_survives_a_partial_write(state_file: Path) -> None:
    source = FileSource(state_file)
    text = lab_text(4)
    cut = text.rindex("state: started}")  # mid flow-mapping: not even YAML yet
    with state_file.open("w") as out:
        out.write(text[:cut])
        out.flush()
        assert source.poll() is None
        assert source.rejected == 1 and "not valid YAML" in (source.last_error or "")
        out.write(text[cut:])
    applied = source.poll()
    assert applied is not None and applied.version == 4


def test_file_source_waits_out_a_missing_file(state_file: Path) -> None:
    source = FileSource(state_file)
    state_file.unlink()
    assert source.poll() is None
    assert source.rejected == 0
    state_file.write_text(lab_text(5))
    applied = source.poll()
    assert applied is not None and applied.version == 5


def test_file_source_ignores_a_touch(state_file: Path) -> None:
    source = FileSource(state_file)
    os.utime(state_file, ns=(1, 1))
    assert source.poll() is None
    assert source.rejected == 0


def test_file_source_watch_skips_a_bad_write(state_file: Path) -> None:
    source = FileSource(state_file)
    bad = LAB_TEXT.replace("    app: web\n", "    app: www\n")

    def write_bad_then_good() -> None:
        replace_atomically(state_file, bad)
        time.sleep(0.2)  # several polls see the bad file
        replace_atomically(state_file, lab_text(6))

    state, _ = asyncio.run(next_state(source, write_bad_then_good))
    assert state.version == 6
    assert source.rejected == 1
    assert "services[1].app: unknown app www" in (source.last_error or "")


# -------------------------------------------------------------------------- SQLite

WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=5)
with conn:
    conn.execute(sys.argv[2], sys.argv[3:])
conn.close()
"""


def write_from_another_process(db: Path, sql: str, *params: str) -> None:
    subprocess.run([sys.executable, "-c", WRITER, str(db), sql, *params], check=True, timeout=30)


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Path]:
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")  # readers and the writer do not block each other
    write_state(conn, STATE)
    conn.close()
    yield db


def test_sqlite_round_trip(database: Path) -> None:
    source = SqliteSource(database)
    try:
        assert source.current() == STATE
    finally:
        source.close()


def test_sqlite_source_applies_a_change_from_another_process(database: Path) -> None:
    source = SqliteSource(database)
    try:
        stop = "UPDATE machines SET state = 'stopped' WHERE id = ?"
        state, elapsed = asyncio.run(
            next_state(source, lambda: write_from_another_process(database, stop, "echo-ord-1"))
        )
        assert state.machines["echo-ord-1"].state == "stopped"
        assert source.current() is state
        echo = place(state, "edge-ord")[0]
        assert [b.machine_id for b in echo.tiers[0]] == ["echo-ord-2"]
        print(f"SQLite change applied {elapsed * 1000:.1f} ms after starting the writer process")
    finally:
        source.close()


def test_sqlite_source_refuses_a_dangling_reference(database: Path) -> None:
    source = SqliteSource(database)
    try:
        write_from_another_process(
            database,
            "INSERT INTO machines VALUES (?, 'echo', 'worker-fra', '198.18.64.99', 'started')",
            "echo-fra-1",
        )
        assert source.poll() is None
        assert source.rejected == 1
        assert source.last_error == (
            f"{database}: machines[id=echo-fra-1].host: unknown host worker-fra"
        )
        assert source.current() == STATE
    finally:
        source.close()


def test_sqlite_source_refuses_bad_json(database: Path) -> None:
    source = SqliteSource(database)
    try:
        write_from_another_process(
            database, "UPDATE services SET ports = '[7' WHERE id = ?", "echo-tcp"
        )
        assert source.poll() is None
        assert source.rejected == 1
        assert "services[id=echo-tcp].ports: not valid JSON" in (source.last_error or "")
    finally:
        source.close()


def test_sqlite_source_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no such database file"):
        SqliteSource(tmp_path / "missing.db")
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(StateError, match="no such table"):
        SqliteSource(tmp_path / "empty.db")


def test_sqlite_keeps_the_latency_table(tmp_path: Path) -> None:
    data = to_dict(STATE)
    data["latency_ms"] = {"ams": {"ord": 45.0}}
    state_file = tmp_path / "state.yaml"
    state_file.write_text(yaml.safe_dump(data))
    with_latency = load_state(state_file)
    conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    write_state(conn, with_latency)
    conn.close()
    source = SqliteSource(tmp_path / "state.db")
    try:
        assert source.current() == with_latency
    finally:
        source.close()


# -------------------------------------------------------------------------- config


def test_make_source_picks_by_config(state_file: Path, database: Path) -> None:
    file_source = make_source({"source": "file", "path": str(state_file)})
    assert isinstance(file_source, FileSource) and file_source.poll_interval == 0.02
    assert isinstance(make_source({"path": state_file}), FileSource)
    db_source = make_source({"source": "sqlite", "path": str(database), "poll_interval": 0.05})
    assert isinstance(db_source, SqliteSource) and db_source.poll_interval == 0.05
    db_source.close()
    with pytest.raises(ValueError, match="unknown state source"):
        make_source({"source": "zookeeper", "path": "x"})
    with pytest.raises(ValueError, match="endpoints"):
        make_source({"source": "etcd", "path": "x"})
    with pytest.raises(ValueError, match="needs a path"):
        make_source({"source": "file"})
    with pytest.raises(ValueError, match="poll_interval"):
        make_source({"path": str(state_file), "poll_interval": 0})


# ------------------------------------------------------- SQLite: changed rows only


def test_sqlite_one_machine_change_reads_only_that_row(database: Path) -> None:
    source = SqliteSource(database)
    try:
        before = source.current()
        reads = source.full_reads
        write_from_another_process(
            database, "UPDATE machines SET state = 'stopped' WHERE id = ?", "echo-ord-1"
        )
        state = source.poll()
        assert state is not None and source.full_reads == reads
        assert state.changed_apps == {"echo"}
        assert state.machines["echo-ord-1"].state == "stopped"
        # untouched entities are the very same objects
        assert state.machines["echo-ord-2"] is before.machines["echo-ord-2"]
        assert state.services is before.services
        # equal to a fresh read of the whole database
        fresh = SqliteSource(database)
        try:
            assert fresh.current() == state
            assert fresh.current().machines_by_app.keys() == state.machines_by_app.keys()
            for app, members in fresh.current().machines_by_app.items():
                assert sorted(m.id for m in members) == sorted(
                    m.id for m in state.machines_by_app[app]
                )
        finally:
            fresh.close()
        # a new machine and a deleted one, likewise
        write_from_another_process(database, "DELETE FROM machines WHERE id = ?", "echo-ord-2")
        state = source.poll()
        assert state is not None and "echo-ord-2" not in state.machines
        assert source.full_reads == reads
    finally:
        source.close()


def test_sqlite_incremental_refusal_names_the_row_and_recovers(database: Path) -> None:
    source = SqliteSource(database)
    try:
        taken = str(STATE.hosts["worker-ord"].address)
        write_from_another_process(
            database, "UPDATE machines SET address = ? WHERE id = ?", taken, "echo-ord-1"
        )
        assert source.poll() is None and source.rejected == 1
        assert source.last_error == (
            f"{database}: machines[id=echo-ord-1].address: "
            f"{taken} is already host worker-ord's address"
        )
        assert source.current() == STATE
        # the repair reads everything again (the log moved past a refused change)
        write_from_another_process(
            database,
            "UPDATE machines SET address = ? WHERE id = ?",
            str(STATE.machines["echo-ord-1"].address),
            "echo-ord-1",
        )
        state = source.poll()
        assert state == STATE and state.changed_apps is None
    finally:
        source.close()


def test_sqlite_bulk_or_structural_changes_read_everything(database: Path) -> None:
    source = SqliteSource(database)
    try:
        reads = source.full_reads
        write_from_another_process(
            database, "UPDATE hosts SET address = '198.18.99.99' WHERE id = ?", "worker-ord"
        )
        state = source.poll()
        assert state is not None and source.full_reads == reads + 1
        assert state.changed_apps is None
    finally:
        source.close()


def test_sqlite_whole_read_streams_rows_and_equals_the_list_read(database: Path) -> None:
    """The full read hands parse_state one RowStream per table (never every row at
    once) and gives the same state, with bad rows still named by key."""
    from edgeproxy.sources import read_state_data, stream_state_data
    from edgeproxy.state import RowStream, parse_state

    conn = sqlite3.connect(database)
    try:
        problems: list[object] = []
        data, keys = stream_state_data(conn, problems)  # type: ignore[arg-type]
        assert all(isinstance(data[t], RowStream) for t in ("hosts", "machines"))
        assert keys["machines"] == []  # nothing read until validation gets there
        streamed = parse_state(data, "db")
        assert not problems and sorted(keys["machines"]) == sorted(STATE.machines)
        listed, _ = read_state_data(conn, "db")
        assert streamed == parse_state(listed, "db") == STATE
    finally:
        conn.close()


def test_sqlite_source_refuses_bad_json_on_a_whole_read(database: Path) -> None:
    conn = sqlite3.connect(database)
    conn.execute("UPDATE services SET concurrency = '{' WHERE id = 'echo-tcp'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError) as err:
        SqliteSource(database)
    assert [p.path for p in err.value.problems] == ["services[id=echo-tcp].concurrency"]
    assert "not valid JSON" in str(err.value)


def test_reference_ids_are_shared_strings(database: Path) -> None:
    """Every row brings its own string; references are interned so 600k machines
    share one per app and host."""
    source = SqliteSource(database)
    try:
        state = source.current()
        by_app: dict[str, list[int]] = {}
        for m in state.machines.values():
            by_app.setdefault(m.app, []).append(id(m.app))
            assert m.host is state.hosts[m.host].id or m.host == state.hosts[m.host].id
        assert all(len(set(ids)) == 1 for ids in by_app.values())
        hosts = [id(m.host) for m in state.machines.values() if m.host == "worker-ord"]
        assert len(set(hosts)) == 1
        assert len({id(s.concurrency) for s in state.services.values()
                    if s.concurrency == next(iter(state.services.values())).concurrency}) == 1
    finally:
        source.close()


def test_etcd_source_reads_the_prefix_in_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big prefix is read in pages at one revision; the state is the same."""
    from edgeproxy import sources
    from etcd_cluster import EtcdCluster, etcd_missing_reason

    reason = etcd_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(sources, "ETCD_PAGE", 3)  # the lab state is ~30 keys: many pages
    with EtcdCluster(tmp_path, members=1) as cluster:
        write_state(cluster.endpoints, STATE)
        source = sources.EtcdSource(cluster.endpoints)
        try:
            assert source.current() == STATE
            assert source._pending == {}  # the state is all it keeps
        finally:
            source.close()
