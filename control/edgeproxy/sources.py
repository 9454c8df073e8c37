"""Where cluster state comes from: one interface, a source per store.

Every source keeps the last good state. A new picture is validated whole; a bad one
(unparseable, unknown fields, dangling references, ...) is logged, counted in
``rejected`` with its message in ``last_error``, and skipped, so the last good state
keeps serving (SPEC, "Cluster state").

The file and SQLite sources poll a cheap change marker every ``poll_interval``
seconds (a file's stat, SQLite's ``PRAGMA data_version``) and only rebuild when it
moves; the etcd source is pushed changes by an etcd watch. Either way the blocking
part runs in a worker thread so neither a slow check nor a large rebuild stalls the
event loop.

Each source is meant for one watcher: ``watch()`` yields every new state once.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import queue
import re
import select
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import yaml

from edgeproxy.etcd import (
    DEFAULT_TIMEOUT,
    Compacted,
    EtcdClient,
    EtcdError,
    Event,
    WatchStream,
    b64,
    header_revision,
    parse_events,
    prefix_end,
)
from edgeproxy.state import (
    ClusterState,
    Incremental,
    NeedsFullParse,
    Problem,
    RowStream,
    StateError,
    entity_dict,
    latency_table,
    parse_state,
    parse_yaml,
    release_free_memory,
    to_dict,
)
from edgeproxy.yamlpatch import FileView, Hunk, ShortRead, YamlIndex, load_fast, name_rows

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_POLL_INTERVAL = 0.02  # seconds: well inside the 100 ms apply budget


class StateSource(Protocol):
    """A store of cluster state, watched for changes."""

    rejected: int  # bad updates refused so far
    last_error: str | None  # the message of the latest refusal

    def current(self) -> ClusterState:
        """The last good state."""
        ...

    def watch(self) -> AsyncIterator[ClusterState]:
        """Yield each new good state as it appears; bad ones are counted and skipped."""
        ...

    def close(self) -> None: ...


class _PollingSource:
    """Shared bookkeeping: last good state, refusals, and the polling loop.

    Subclasses say whether something moved (``_changed``, cheap, called every tick)
    and how to rebuild (``_load``, may be slow; None means the content turned out
    unchanged). Both run in a worker thread, one call at a time.
    """

    def __init__(self, name: str, poll_interval: float) -> None:
        self.name = name
        self.poll_interval = poll_interval
        self.rejected = 0
        self.last_error: str | None = None
        self._good: ClusterState | None = None

    def current(self) -> ClusterState:
        assert self._good is not None, "sources load their first state on construction"
        return self._good

    def _changed(self) -> bool:
        raise NotImplementedError

    def _load(self) -> ClusterState | None:
        raise NotImplementedError

    def _reload(self) -> ClusterState | None:
        """Rebuild; a good new state becomes current, a bad one is counted."""
        try:
            state = self._load()
        except StateError as err:
            self.rejected += 1
            self.last_error = str(err)
            log.warning(
                "%s: update refused, keeping version %s:\n%s",
                self.name,
                self.current().version,
                err,
            )
            return None
        if state is not None:
            self._good = state
            log.info("%s: applied state version %s", self.name, state.version)
        return state

    def poll(self) -> ClusterState | None:
        """Check once; return the new state if one was applied. For tools and tests."""
        return self._reload() if self._changed() else None

    async def watch(self) -> AsyncIterator[ClusterState]:
        while True:
            # Even the cheap check goes to a thread: a stat on a slow disk or a busy
            # SQLite lock must not stall the event loop the proxy runs on.
            state = await asyncio.to_thread(self.poll)
            if state is not None:
                yield state
            await asyncio.sleep(self.poll_interval)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- file


class FileSource(_PollingSource):
    """A YAML file, reloaded when it changes.

    Changes are noticed by inotify on the file's directory (a close after writing, or
    a rename onto the file) when the kernel offers it, and by the file's stat every
    ``poll_interval`` in any case: atomic renames show up as a new inode, in-place
    writes as a new size or mtime. A half-written file fails to parse and is refused;
    the write that completes it changes the stat again and applies.

    The bytes last applied are kept with an index of where each list item starts
    (``yamlpatch``): a change re-parses only the items it touches and validates them
    with ``state.Incremental``; anything else parses and validates the whole file.
    """

    def __init__(self, path: str | Path, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        super().__init__(str(path), poll_interval)
        self.path = Path(path)
        self.full_reads = 0  # whole-file parses so far (for tests and the bench)
        self._seen = self._fingerprint()
        self._buf = bytearray()  # the bytes of the good state
        self._index: YamlIndex | None = None
        self._incremental: Incremental | None = None
        self._refused: object = None  # what the last refused bytes looked like
        self._scratch = bytearray(FileView.CHUNK)  # reused: no heap churn per change
        with self.path.open("rb") as f:  # into a bytearray: it becomes ``_buf``, uncopied
            self._good = self._parse_all(FileView(f.fileno(), os.fstat(f.fileno()).st_size)
                                         .read_all())  # no last good: raise
        self._inotify = _inotify_watch(self.path.parent)

    def _fingerprint(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None  # between an unlink and a create: wait for the file
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _changed(self) -> bool:
        _drain(self._inotify)
        seen = self._fingerprint()
        if seen == self._seen:
            return False
        self._seen = seen
        return seen is not None

    def _load(self) -> ClusterState | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._seen = None  # gone since the stat; look again next tick
            return None
        try:
            return self._load_from(FileView(fd, os.fstat(fd).st_size, self._scratch))
        finally:
            os.close(fd)

    def _load_from(self, new: FileView) -> ClusterState | None:
        # The stat may move without the bytes moving (touch, or a stat taken mid-write
        # that we already read complete): same bytes, same state, nothing to apply.
        if self._index is not None and self._incremental is not None:
            hunks = self._index.diff(self._buf, new)
            if hunks == []:
                self._unchanged()
                return None
            if hunks is not None:
                done, state = self._apply_hunks(hunks, new)
                if done:
                    return state
        elif new.size == len(self._buf):
            with contextlib.suppress(ShortRead):
                if new.common_prefix(self._buf, 0, 0, new.size) == new.size:
                    self._unchanged()
                    return None
        try:
            text = new.read_all()
        except ShortRead:
            return None  # shrinking under a writer: its next write moves the stat
        digest = hashlib.blake2b(text).digest()
        if digest == self._refused:
            return None  # the same bad bytes again: refused once is enough
        try:
            return self._parse_all(text)
        except StateError:
            self._refused = digest
            raise

    def _unchanged(self) -> None:
        """The file holds the serving state's bytes: nothing to apply. After a refused
        update that means the operator put the good state back; say so once."""
        if self._refused is not None:
            self._refused = None
            log.info("%s: back to the serving state version %s; the refused update is gone",
                     self.name, self.current().version)

    def _apply_hunks(self, hunks: list[Hunk], new: FileView) -> tuple[bool, ClusterState | None]:
        """(True, the state after the changed items, or None when there is nothing new
        to apply), or (False, None): parse the whole file."""
        assert self._index is not None and self._incremental is not None
        state = self._incremental.state
        entities: dict[str, Mapping[str, object]] = {
            "regions": state.regions,
            "hosts": state.hosts,
            "apps": state.apps,
            "services": state.services,
            "machines": state.machines,
        }
        patch = self._index.patch(hunks, self._buf, new, entities)
        if patch is None:
            log.info("%s: change not local to list items; parsing the whole file", self.name)
            return False, None
        fingerprint = patch.fingerprint()
        if fingerprint == self._refused:
            return True, None  # the same bad bytes again: refused once is enough
        meta: dict[str, object] | None = None
        if patch.meta:
            meta = {"version": patch.meta.get("version", state.version)}
            if state.latency_ms:
                meta["latency_ms"] = latency_table(state)
        try:
            applied = self._incremental.apply(patch.changes, meta, self.name, name_rows(patch))
        except NeedsFullParse as why:
            log.info("%s: %s; parsing the whole file", self.name, why)
            return False, None
        except StateError as err:
            self._refused = fingerprint
            raise self._index.locate(err, patch, new, self.name) from err
        self._index.commit(patch, self._buf)
        self._refused = None
        return True, applied

    def _parse_all(self, text: bytearray) -> ClusterState:
        """Parse and validate the whole file: by the scan and batches of items
        (``yamlpatch.load_fast``) when the document allows, else in one piece."""
        self.full_reads += 1
        fast = load_fast(text, self.name)
        index: YamlIndex | None
        if fast is not None:
            state, index = fast
        else:
            whole = bytes(text)
            found: list[YamlIndex | None] = [None]

            def build(root: yaml.Node) -> None:
                found[0] = YamlIndex.build(whole, root)

            state = parse_yaml(whole, self.name, on_root=build)
            del whole
            index = found[0]
        self._index = index
        self._incremental = Incremental(state) if self._index is not None else None
        self._buf = text
        self._refused = None
        release_free_memory()
        return state

    def wait(self, timeout: float) -> bool:
        """Block until inotify reports a write in the directory, or ``timeout``
        seconds; True when it did. Without inotify, just sleeps. For tools and tests."""
        if self._inotify is None:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([self._inotify], [], [], timeout)
        return bool(ready)

    async def watch(self) -> AsyncIterator[ClusterState]:
        fd = self._inotify
        if fd is None:
            async for state in super().watch():
                yield state
            return
        loop = asyncio.get_running_loop()
        woke = asyncio.Event()

        def readable() -> None:
            loop.remove_reader(fd)  # until the poll drains it: no busy loop meanwhile
            woke.set()

        try:
            while True:
                woke.clear()
                loop.add_reader(fd, readable)
                new = await asyncio.to_thread(self.poll)
                if new is not None:
                    yield new
                if not woke.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woke.wait(), self.poll_interval)
                loop.remove_reader(fd)
        finally:
            loop.remove_reader(fd)

    def close(self) -> None:
        fd, self._inotify = self._inotify, None
        if fd is not None:
            os.close(fd)


# inotify (linux/inotify.h): a write closed, or a file renamed into the directory
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


def _inotify_watch(directory: Path) -> int | None:
    """An inotify fd watching ``directory`` for finished writes, or None (no
    inotify here: the stat polling alone notices changes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add.restype = ctypes.c_int
    fd = int(init(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        return None
    if add(fd, os.fsencode(directory), _IN_CLOSE_WRITE | _IN_MOVED_TO) < 0:
        os.close(fd)
        return None
    return fd


def _drain(fd: int | None) -> None:
    """Read pending inotify events; which file they name does not matter: the stat
    that follows decides."""
    if fd is None:
        return
    with contextlib.suppress(OSError):  # EAGAIN: drained
        while os.read(fd, 65536):
            pass


# -------------------------------------------------------------------------- SQLite

# One table per entity, in the shape a gossip-replicated SQLite store keeps. List and
# mapping fields are JSON text. No foreign keys: replicas apply rows in any order, so
# references are checked by validation, which refuses a state with dangling ones.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,          -- 'version' (required), 'latency_ms' (optional)
    value TEXT NOT NULL            -- JSON
);
CREATE TABLE IF NOT EXISTS regions (
    code TEXT PRIMARY KEY,
    position TEXT                  -- JSON [lat, lon], or NULL
);
CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    region TEXT NOT NULL,
    address TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    addresses TEXT NOT NULL,       -- JSON list of addresses
    hostnames TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS services (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    protocol TEXT NOT NULL,
    ports TEXT NOT NULL,           -- JSON list of ports
    internal_port INTEGER NOT NULL,
    handlers TEXT NOT NULL DEFAULT '[]',
    concurrency TEXT NOT NULL,     -- JSON {type, soft_limit, hard_limit}
    checks TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    host TEXT NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL
);
"""

# Change tracking: triggers log the key of every row written or deleted, so a reader
# re-reads only those rows (``SqliteSource``). A reader that finds the log pruned
# past its last position reads the whole database again.
TRACKING = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL
);
""" + "".join(
    f"""
CREATE TRIGGER IF NOT EXISTS {table}_ins AFTER INSERT ON {table} BEGIN
    INSERT INTO changes (tbl, key) VALUES ('{table}', NEW.{key});
END;
CREATE TRIGGER IF NOT EXISTS {table}_upd AFTER UPDATE ON {table} BEGIN
    INSERT INTO changes (tbl, key) VALUES ('{table}', OLD.{key});
    INSERT INTO changes (tbl, key) SELECT '{table}', NEW.{key} WHERE NEW.{key} IS NOT OLD.{key};
END;
CREATE TRIGGER IF NOT EXISTS {table}_del AFTER DELETE ON {table} BEGIN
    INSERT INTO changes (tbl, key) VALUES ('{table}', OLD.{key});
END;
"""
    for table, key in (
        ("meta", "key"),
        ("regions", "code"),
        ("hosts", "id"),
        ("apps", "name"),
        ("services", "id"),
        ("machines", "id"),
    )
)

# More changed rows than this at once (a bulk rewrite): read everything instead.
MAX_INCREMENTAL_ROWS = 5000

# Per table: the key column, and the columns that hold JSON.
_TABLES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "regions": ("code", ("code", "position"), ("position",)),
    "hosts": ("id", ("id", "role", "region", "address"), ()),
    "apps": ("name", ("name", "addresses", "hostnames"), ("addresses", "hostnames")),
    "services": (
        "id",
        ("id", "app", "protocol", "ports", "internal_port", "handlers", "concurrency", "checks"),
        ("ports", "handlers", "concurrency", "checks"),
    ),
    "machines": ("id", ("id", "app", "host", "address", "state"), ()),
}


def read_state_data(
    conn: sqlite3.Connection, source: str
) -> tuple[dict[str, object], dict[str, list[str]]]:
    """Read every table into the plain shape ``parse_state`` takes.

    Also returns each table's keys in row order, so problems can name rows by key.
    Call inside a read transaction so the tables are one snapshot.
    """
    problems: list[Problem] = []
    data, keys = stream_state_data(conn, problems)
    for table in _TABLES:
        rows = data[table]
        assert isinstance(rows, RowStream)
        data[table] = list(rows)
    if problems:
        raise StateError(source, problems)
    return data, keys


def stream_state_data(
    conn: sqlite3.Connection, problems: list[Problem]
) -> tuple[dict[str, object], dict[str, list[str]]]:
    """``read_state_data`` without holding the rows: each table is a ``RowStream``
    that runs its query when ``parse_state`` reaches it and builds one row at a time.

    ``keys`` fills as the streams are read; JSON problems land in ``problems`` (check
    them after parsing: a row with bad JSON also fails validation, and the JSON
    problem is the one to report).
    """
    data: dict[str, object] = {}
    for key, value in conn.execute("SELECT key, value FROM meta ORDER BY key"):
        data[key] = _json(value, str(key), problems)
    keys: dict[str, list[str]] = {}
    for table in _TABLES:
        keys[table] = []
        data[table] = RowStream(_table_rows(conn, table, keys[table], problems))
    return data, keys


def _table_rows(
    conn: sqlite3.Connection, table: str, keys: list[str], problems: list[Problem]
) -> Iterator[dict[str, object]]:
    key_column, columns, json_columns = _TABLES[table]
    query = f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid"
    for values in conn.execute(query):
        row = dict(zip(columns, values, strict=True))
        keys.append(str(row[key_column]))
        for column in json_columns:
            if row[column] is None:
                del row[column]  # NULL: the field is absent
            else:
                where = f"{table}[{key_column}={row[key_column]}].{column}"
                row[column] = _json(row[column], where, problems)
        yield row


def _read_rows(
    conn: sqlite3.Connection, table: str, keys: list[str], problems: list[Problem]
) -> dict[str, object | None]:
    """Rows of ``table`` by key, as ``read_state_data`` shapes them; None: deleted."""
    key_column, columns, json_columns = _TABLES[table]
    out: dict[str, object | None] = dict.fromkeys(keys)
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        query = (
            f"SELECT {', '.join(columns)} FROM {table} "
            f"WHERE {key_column} IN ({', '.join('?' * len(chunk))})"
        )
        for values in conn.execute(query, chunk):
            row = dict(zip(columns, values, strict=True))
            for column in json_columns:
                if row[column] is None:
                    del row[column]
                else:
                    where = f"{table}[{key_column}={row[key_column]}].{column}"
                    row[column] = _json(row[column], where, problems)
            out[str(row[key_column])] = row
    return out


def _json(text: object, path: str, problems: list[Problem]) -> object:
    if not isinstance(text, str):
        problems.append(Problem(path, f"expected JSON text, got {type(text).__name__}"))
        return None
    try:
        return json.loads(text)
    except ValueError as err:
        problems.append(Problem(path, f"not valid JSON: {err}"))
        return None


_ROW_PATH = re.compile(r"(regions|hosts|apps|services|machines)\[(\d+)\]")


def _name_rows(err: StateError, keys: Mapping[str, list[str]]) -> StateError:
    """Name rows by key (``machines[id=web-ord-1]``): a database has no line numbers."""

    def by_key(match: re.Match[str]) -> str:
        table, n = match.group(1), int(match.group(2))
        key_column = _TABLES[table][0]
        return f"{table}[{key_column}={keys[table][n]}]"

    return StateError(
        err.source,
        [Problem(_ROW_PATH.sub(by_key, p.path, count=1), p.reason, p.line) for p in err.problems],
    )


def write_sqlite_state(conn: sqlite3.Connection, state: ClusterState) -> None:
    """Replace the database's contents with ``state`` in one transaction.

    For tests and tools; a real store changes single rows.
    """
    conn.executescript(SCHEMA + TRACKING)
    data = to_dict(state)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM meta")
        conn.execute("INSERT INTO meta VALUES ('version', ?)", (json.dumps(data["version"]),))
        if "latency_ms" in data:
            conn.execute(
                "INSERT INTO meta VALUES ('latency_ms', ?)", (json.dumps(data["latency_ms"]),)
            )
        for table, (_, columns, json_columns) in _TABLES.items():
            conn.execute(f"DELETE FROM {table}")
            rows = data[table]
            assert isinstance(rows, list)
            conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})",
                [_row_values(row, columns, json_columns) for row in rows],
            )
        # a whole rewrite: readers see the log pruned past them and read everything
        conn.execute("DELETE FROM changes WHERE seq < (SELECT max(seq) FROM changes)")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _row_values(
    row: Mapping[str, object], columns: tuple[str, ...], json_columns: tuple[str, ...]
) -> tuple[object, ...]:
    return tuple(
        (json.dumps(row[c]) if c in row else None) if c in json_columns else row[c] for c in columns
    )


class SqliteSource(_PollingSource):
    """A SQLite database written by another process.

    ``PRAGMA data_version`` changes whenever another connection commits, and costs
    no I/O beyond the lock check, so polling it every tick is cheap. On a change,
    in one read transaction (a consistent snapshot): the ``changes`` log (filled by
    triggers, ``TRACKING``) names the rows written since the last read; only those
    are read and validated (``state.Incremental``). A bulk change, a change
    ``Incremental`` does not handle piecewise, a log pruned past our position, a
    database without the log, or the first change after a refusal read and
    validate the whole state instead.
    """

    def __init__(self, path: str | Path, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        super().__init__(str(path), poll_interval)
        self.path = Path(path)
        if not self.path.exists():
            # sqlite3.connect would quietly create an empty database.
            raise StateError(self.name, [Problem("", "no such database file")])
        # Autocommit, so our own BEGIN/COMMIT bound the snapshot; the connection is used
        # from whichever thread polls, one call at a time.
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=1.0
        )
        self._seen = self._data_version()
        self._tracked = self._install_tracking()
        self._log_seq = 0  # last change-log row applied
        self._incremental: Incremental | None = None
        self.full_reads = 0  # whole-database reads so far (for tests and the bench)
        state = self._load()
        assert state is not None
        self._good = state

    def _install_tracking(self) -> bool:
        try:
            self._conn.executescript(TRACKING)
        except sqlite3.Error as err:  # read-only database or file: whole reads only
            log.warning(
                "%s: no change tracking (%s); every change reads everything", self.name, err
            )
            return False
        self._seen = self._data_version()
        return True

    def _data_version(self) -> int:
        row = self._conn.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def _changed(self) -> bool:
        seen = self._data_version()
        if seen == self._seen:
            return False
        self._seen = seen
        return True

    def _load(self) -> ClusterState:
        try:
            self._conn.execute("BEGIN")
            try:
                state = self._read_changes() if self._incremental is not None else None
                if state is None:
                    state = self._read_all()
            finally:
                self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            self._incremental = None
            raise StateError(self.name, [Problem("", f"cannot read the database: {err}")]) from err
        except StateError:
            self._incremental = None  # the next change reads everything
            raise
        return state

    def _last_seq(self) -> int:
        if not self._tracked:
            return 0
        row = self._conn.execute("SELECT max(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def _read_all(self) -> ClusterState:
        self.full_reads += 1
        seq = self._last_seq()
        # table by table, row by row: the plain rows are never all in memory
        problems: list[Problem] = []
        data, keys = stream_state_data(self._conn, problems)
        try:
            state = parse_state(data, self.name)
        except StateError as err:
            if problems:  # bad JSON: that is the problem, not what validation made of it
                raise StateError(self.name, problems) from err
            raise _name_rows(err, keys) from err
        if problems:
            raise StateError(self.name, problems)
        del data, keys
        self._log_seq = seq
        self._incremental = Incremental(state) if self._tracked else None
        return state

    def _read_changes(self) -> ClusterState | None:
        """The state after the logged changes, or None: read everything instead."""
        assert self._incremental is not None
        first = self._conn.execute(
            "SELECT min(seq) FROM changes WHERE seq > ?", (self._log_seq,)
        ).fetchone()[0]
        if first is None:
            return None  # committed without a logged row: be safe
        if first != self._log_seq + 1:
            oldest = self._conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
            if oldest is None or oldest > self._log_seq + 1:
                return None  # pruned past us (AUTOINCREMENT leaves gaps otherwise)
        rows = self._conn.execute(
            "SELECT seq, tbl, key FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._log_seq, MAX_INCREMENTAL_ROWS + 1),
        ).fetchall()
        if len(rows) > MAX_INCREMENTAL_ROWS:
            return None
        touched: dict[str, set[str]] = {}
        for _, table, key in rows:
            touched.setdefault(str(table), set()).add(str(key))
        meta: dict[str, object] | None = None
        problems: list[Problem] = []
        if "meta" in touched:
            meta = {
                str(k): _json(v, str(k), problems)
                for k, v in self._conn.execute("SELECT key, value FROM meta")
            }
        changes: dict[str, dict[str, object | None]] = {}
        for table, keys in touched.items():
            if table == "meta":
                continue
            if table not in _TABLES:
                return None
            changes[table] = _read_rows(self._conn, table, sorted(keys), problems)
        if problems:
            raise StateError(self.name, problems)
        try:
            state = self._incremental.apply(
                changes, meta, self.name, lambda kind, key: f"{kind}[{_TABLES[kind][0]}={key}]"
            )
        except NeedsFullParse as why:
            log.info("%s: %s; reading the whole state", self.name, why)
            return None
        self._log_seq = int(rows[-1][0])
        return state

    def close(self) -> None:
        self._conn.close()


# ---------------------------------------------------------------------------- etcd

DEFAULT_ETCD_PREFIX = "/edgeproxy/"
# How long one watch read blocks before the loop looks round (close, liveness).
ETCD_READ_WAIT = 0.5  # seconds
# Silence on a watch is normal, but a member cut off from its quorum is silent too;
# after this long without a message the member is asked a linearizable question.
ETCD_PROBE_AFTER = 3.0  # seconds
ETCD_RETRY_BACKOFF = 0.25  # seconds between rounds when no member takes a watch
ETCD_PAGE = 25_000  # keys per range request when reading the whole prefix
ETCD_READ_ATTEMPTS = 3  # whole reads tried when compaction overtakes one

# One key per entity: <prefix><kind>/<id>, the value the entity as JSON in the YAML
# shape; <prefix>meta holds the top-level fields. Kind → the field the key names.
ETCD_KINDS: dict[str, str] = {
    "regions": "code",
    "hosts": "id",
    "apps": "name",
    "services": "id",
    "machines": "id",
}
ETCD_META_KEY = "meta"
ETCD_META_FIELDS = ("version", "latency_ms")


class _BadJson:
    """A value that did not parse, kept so the rebuild can say where and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _etcd_doc(value: bytes) -> object:
    try:
        return json.loads(value)
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        return _BadJson(f"not valid JSON: {err}")


def _etcd_value(value: object) -> object:
    """A raw value parsed, or a document (``_EtcdDocs``) as it is."""
    return _etcd_doc(value) if isinstance(value, bytes) else value


class _EtcdDocs(Mapping[str, object]):
    """The keys under the prefix as a state says them, with ``pending`` over them:
    relative key -> document (plain data, what the entity's JSON would parse to), or
    the raw bytes of a pending key. Documents are made as they are read."""

    def __init__(self, state: ClusterState, pending: Mapping[str, bytes | None]) -> None:
        self._state = state
        self._pending = pending
        self._kinds: dict[str, Mapping[str, object]] = {
            "regions": state.regions,
            "hosts": state.hosts,
            "apps": state.apps,
            "services": state.services,
            "machines": state.machines,
        }

    def _own(self, key: str) -> object | None:
        if key == ETCD_META_KEY:
            meta: dict[str, object] = {"version": self._state.version}
            if self._state.latency_ms:
                meta["latency_ms"] = latency_table(self._state)
            return meta
        kind, _, name = key.partition("/")
        entities = self._kinds.get(kind)
        entity = entities.get(name) if entities is not None else None
        return None if entity is None else entity_dict(kind, entity)

    def get(self, key: str, default: object = None) -> object:
        if key in self._pending:
            value = self._pending[key]
            return default if value is None else value
        own = self._own(key)
        return default if own is None else own

    def __getitem__(self, key: str) -> object:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        pending = self._pending
        if ETCD_META_KEY not in pending:
            yield ETCD_META_KEY
        for kind, entities in self._kinds.items():
            for name in entities:
                key = f"{kind}/{name}"
                if key not in pending:
                    yield key
        for key, value in pending.items():
            if value is not None:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _compacted(err: EtcdError) -> bool:
    return "compacted" in str(err)


def etcd_state(docs: Mapping[str, object], prefix: str, source: str = "etcd") -> ClusterState:
    """Validate the parsed values under a prefix (keys relative to it) as one state.

    Problems name the etcd key and the field: ``/edgeproxy/machines/web-1.host``.
    """
    return etcd_state_from_values(docs, prefix, source, parse=lambda doc: doc)


def etcd_state_from_values(
    values: Mapping[str, object],
    prefix: str,
    source: str = "etcd",
    parse: Callable[[object], object] | None = None,
) -> ClusterState:
    """``etcd_state`` over raw values (bytes), each parsed as validation reaches it,
    so the parsed documents of 800,000 keys are never all in memory at once."""
    others: list[str] = []
    by_kind: dict[str, list[str]] = {kind: [] for kind in ETCD_KINDS}
    for key in sorted(values):
        kind, slash, name = key.partition("/")
        if kind in ETCD_KINDS and slash and name and "/" not in name:
            by_kind[kind].append(key)
        else:
            others.append(key)
    return etcd_state_from_rows(
        ((key, values[key]) for key in others),
        {kind: ((key, values[key]) for key in keys) for kind, keys in by_kind.items()},
        prefix,
        source,
        parse,
    )


def etcd_state_from_rows(
    others: Iterable[tuple[str, object]],
    by_kind: Mapping[str, Iterable[tuple[str, object]]],
    prefix: str,
    source: str = "etcd",
    parse: Callable[[object], object] | None = None,
) -> ClusterState:
    """``etcd_state_from_values`` over the keys as they come: ``others`` (``meta``
    and any key outside the kinds), then each kind's keys in key order, which may
    still be arriving (``by_kind`` iterated lazily, kind after kind)."""
    load = parse or (lambda value: _etcd_doc(value))  # type: ignore[arg-type]
    problems: list[Problem] = []
    data: dict[str, object] = {}
    keys: dict[str, list[str]] = {kind: [] for kind in ETCD_KINDS}
    expected = ", ".join(f"{k}/<{f}>" for k, f in ETCD_KINDS.items())
    for key, value in others:
        where = f"{prefix}{key}"
        if key == ETCD_META_KEY:
            doc = load(value)
            if isinstance(doc, _BadJson):
                problems.append(Problem(where, doc.reason))
            else:
                _read_etcd_meta(doc, where, data, problems)
        else:
            problems.append(Problem(where, f"unknown key; expected meta, {expected}"))

    def rows(kind: str) -> Iterator[object]:
        id_field = ETCD_KINDS[kind]
        for key, value in by_kind[kind]:
            where = f"{prefix}{key}"
            name = key.partition("/")[2]
            if not name or "/" in name:
                problems.append(Problem(where, f"unknown key; expected meta, {expected}"))
                continue
            doc = load(value)
            if isinstance(doc, _BadJson):
                problems.append(Problem(where, doc.reason))
                continue
            if isinstance(doc, dict) and id_field in doc and doc[id_field] != name:
                problems.append(
                    Problem(f"{where}.{id_field}", f"{doc[id_field]!r} differs from the key")
                )
                continue
            keys[kind].append(key)
            yield doc

    for kind in ETCD_KINDS:
        data[kind] = RowStream(rows(kind))
    try:
        state = parse_state(data, source)
    except StateError as err:
        if problems:
            raise StateError(source, sorted(problems, key=lambda p: p.path)) from err
        raise _name_keys(err, keys, prefix) from err
    if problems:
        raise StateError(source, sorted(problems, key=lambda p: p.path))
    return state


def _read_etcd_meta(
    doc: object, where: str, data: dict[str, object], problems: list[Problem]
) -> None:
    if not isinstance(doc, dict):
        problems.append(Problem(where, "expected a JSON object {version, latency_ms?}"))
        return
    for field_name, value in doc.items():
        if field_name in ETCD_META_FIELDS:
            data[field_name] = value
        else:
            problems.append(Problem(f"{where}.{field_name}", "unknown field"))


_ETCD_ROW = re.compile(r"\b(regions|hosts|apps|services|machines)\[(\d+)\]")


def _name_keys(err: StateError, keys: Mapping[str, list[str]], prefix: str) -> StateError:
    """Name entities by their etcd key, in paths and in reasons (``first at ...``)."""

    def by_key(match: re.Match[str]) -> str:
        return f"{prefix}{keys[match.group(1)][int(match.group(2))]}"

    def path(text: str) -> str:
        if text.startswith(ETCD_META_FIELDS):
            return f"{prefix}{ETCD_META_KEY}.{text}"
        return _ETCD_ROW.sub(by_key, text, count=1)

    return StateError(
        err.source,
        [Problem(path(p.path), _ETCD_ROW.sub(by_key, p.reason), p.line) for p in err.problems],
    )


def etcd_layout(state: ClusterState, prefix: str = DEFAULT_ETCD_PREFIX) -> dict[bytes, bytes]:
    """The keys and values that hold ``state`` under ``prefix``.

    Values are compact JSON with sorted keys, so an unchanged entity gives the same
    bytes and a writer can skip it.
    """
    data = to_dict(state)

    def dump(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    meta = {name: data[name] for name in ETCD_META_FIELDS if name in data}
    layout = {f"{prefix}{ETCD_META_KEY}".encode(): dump(meta)}
    for kind, id_field in ETCD_KINDS.items():
        rows = data[kind]
        assert isinstance(rows, list)
        for row in rows:
            layout[f"{prefix}{kind}/{row[id_field]}".encode()] = dump(row)
    return layout


def write_etcd_state(
    target: EtcdClient | Sequence[str], state: ClusterState, prefix: str = DEFAULT_ETCD_PREFIX
) -> int:
    """Make the keys under ``prefix`` hold ``state``, in one transaction; returns its revision.

    Only changed keys are written and only vanished ones deleted, so watchers see a
    one-machine change as one event. For tests and tools: the read and the write are
    not guarded against a concurrent writer, and etcd caps a transaction's operations
    (``--max-txn-ops``, 128 by default), so this is not the way to load a huge state.
    """
    client = target if isinstance(target, EtcdClient) else EtcdClient(target)
    revision, current = client.range_prefix(prefix.encode())
    have = {kv.key: kv.value for kv in current}
    want = etcd_layout(state, prefix)
    puts = {key: value for key, value in want.items() if have.get(key) != value}
    deletes = [key for key in have if key not in want]
    if not puts and not deletes:
        return revision
    return client.txn(puts, deletes)


class EtcdSource:
    """Cluster state kept in etcd under a prefix, one key per entity, watched.

    Start: one linearizable range over the prefix, remembering its revision. Then a
    watch from the revision after it; each watch message (etcd delivers a
    transaction's events in one message) is applied to the keys and the whole state
    rebuilt and validated. A bad picture is counted and skipped; the keys still
    follow etcd, so the write that repairs it applies.

    The watch lives on one member. When it breaks (the member died, was cut off, or
    cancelled the watch) it is opened on the next member from the last revision seen,
    so nothing is missed; when that history was compacted meanwhile, the whole
    prefix is read again. A member that is alive but cut off from its quorum sends
    nothing; after ``probe_after`` seconds of silence it is asked a linearizable
    question, and one that cannot answer is left.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_ETCD_PREFIX,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        read_wait: float = ETCD_READ_WAIT,
        probe_after: float = ETCD_PROBE_AFTER,
    ) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"etcd prefix must end with '/', got {prefix!r}")
        self.name = "etcd"
        self.prefix = prefix
        self.client = EtcdClient(endpoints, timeout)
        self.timeout = timeout
        self.read_wait = read_wait
        self.probe_after = probe_after
        self.rejected = 0
        self.last_error: str | None = None
        self._key = prefix.encode()
        # Keys (relative to the prefix) whose value in etcd the good state does not
        # reflect: the value, or None when deleted. Empty while the state follows
        # etcd; after a refusal, the keys that made the bad picture. Everything else
        # is what the good state's entities say (``_EtcdDocs``): keeping the raw
        # values of 1,000,000 keys cost 500 MiB at 200k apps.
        self._pending: dict[str, bytes | None] = {}
        self._stream: WatchStream | None = None
        self._member = 0  # index of the member to open the next watch on
        self._heard_at = time.monotonic()
        self._out_of_members = False  # logged once per outage, not every retry
        self._closed = False
        # no member answers: raise, as for a bad state
        self._revision, self._good = self._load_all()
        self._incremental: Incremental | None = Incremental(self._good)
        self.full_reads = 1  # whole-state validations so far (for tests and the bench)

    def current(self) -> ClusterState:
        return self._good

    @property
    def revision(self) -> int:
        """The etcd revision the keys reflect: resume point for the watch."""
        return self._revision

    @property
    def connected_endpoint(self) -> str | None:
        """``host:port`` of the member the watch is open on, if one is."""
        stream = self._stream
        return str(stream.endpoint) if stream is not None else None

    async def watch(self) -> AsyncIterator[ClusterState]:
        while not self._closed:
            # Blocking socket reads go to a thread; each call returns within about
            # read_wait (or a connect timeout), so the loop notices close() promptly.
            state = await asyncio.to_thread(self.step)
            if state is not None:
                yield state

    def step(self) -> ClusterState | None:
        """Wait up to ``read_wait`` for one watch message; the new state if one applied."""
        if self._closed:
            return None
        if self._stream is None:
            self._stream = self._open_watch()
            if self._stream is None:
                return None
        try:
            result = self._stream.read(self.read_wait)
            events = parse_events(result) if result is not None else None
        except Compacted as err:
            log.warning("%s: %s; reading %s again", self.name, err, self.prefix)
            self._drop_stream()
            return self._resync()
        except (EtcdError, OSError) as err:
            self._leave_member(err)
            return None
        if events is None:
            self._probe_if_silent()
            return None
        self._heard_at = time.monotonic()
        return self._apply(events)

    def _open_watch(self) -> WatchStream | None:
        endpoints = self.client.endpoints
        for step in range(len(endpoints)):
            index = (self._member + step) % len(endpoints)
            try:
                stream = WatchStream(
                    endpoints[index],
                    self._key,
                    prefix_end(self._key),
                    self._revision + 1,
                    self.timeout,
                )
            except (EtcdError, OSError) as err:
                log.debug("%s: no watch on %s: %s", self.name, endpoints[index], err)
                continue
            self._member = index
            self._heard_at = time.monotonic()
            if self._out_of_members:
                log.warning("%s: watching again on %s", self.name, endpoints[index])
            self._out_of_members = False
            return stream
        if not self._out_of_members:
            log.error("%s: no member takes a watch; retrying", self.name)
        self._out_of_members = True
        time.sleep(min(ETCD_RETRY_BACKOFF, self.read_wait))  # in the worker thread
        return None

    def _leave_member(self, err: Exception) -> None:
        stream = self._drop_stream()
        if self._closed or stream is None:
            return
        log.warning(
            "%s: watch on %s lost (%s); resuming from revision %d on another member",
            self.name,
            stream.endpoint,
            err,
            self._revision + 1,
        )
        self._member = (self._member + 1) % len(self.client.endpoints)

    def _drop_stream(self) -> WatchStream | None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        return stream

    def _probe_if_silent(self) -> None:
        stream = self._stream
        if stream is None or time.monotonic() - self._heard_at < self.probe_after:
            return
        try:
            self.client.range_prefix(self._key, endpoint=stream.endpoint, count_only=True)
        except EtcdError as err:
            self._leave_member(err)
            return
        self._heard_at = time.monotonic()

    # Reading the whole prefix. etcd's JSON gateway spends most of a read encoding
    # the reply (some 20 s of one core for 1,000,000 keys, read one page after
    # another), so the prefix is cut at the kinds (``regions/``, ``hosts/``, ...; the
    # pieces between them hold ``meta`` and any stray key) and the pieces are read
    # side by side, each on its own connection in pages of ``ETCD_PAGE`` keys, every
    # page at the revision of a first linearizable count: one snapshot, as a single
    # reader would see it. Pages keep a reply from being hundreds of MB of JSON.

    def _pieces(self) -> list[tuple[bytes, bytes, str | None]]:
        """(key, range_end, kind or None) covering the prefix, in key order."""
        kinds = {self._key + f"{kind}/".encode(): kind for kind in ETCD_KINDS}
        pieces: list[tuple[bytes, bytes, str | None]] = []
        at = self._key
        for start in sorted(kinds):
            end = prefix_end(start)
            pieces += [(at, start, None), (start, end, kinds[start])]
            at = end
        pieces.append((at, prefix_end(self._key), None))
        return pieces

    def _snapshot_revision(self) -> int:
        reply = self.client.call("kv/range", {"key": b64(self._key),
                                              "range_end": b64(prefix_end(self._key)),
                                              "count_only": True})
        return header_revision(reply)

    def _pages(self, key: bytes, end: bytes, revision: int) -> Iterator[list[tuple[str, bytes]]]:
        """The keys in [key, end) at ``revision``, a page at a time: (relative key,
        value) in key order."""
        skip = len(self._key)
        range_end = b64(end)
        unb64 = binascii.a2b_base64
        body: dict[str, object] = {"key": b64(key), "range_end": range_end,
                                   "limit": ETCD_PAGE, "revision": str(revision)}
        while True:
            reply = self.client.call("kv/range", body)
            kvs = reply.get("kvs", [])
            if not isinstance(kvs, list):
                raise EtcdError(f"unexpected range reply {reply!r}")
            page: list[tuple[str, bytes]] = []
            last = b""
            try:
                for raw in kvs:
                    last = unb64(raw["key"])
                    value = raw.get("value")
                    page.append((last[skip:].decode("utf-8", errors="replace"),
                                 unb64(value) if value else b""))
            except (TypeError, KeyError, ValueError, binascii.Error) as err:
                raise EtcdError(f"unexpected key-value in a range reply: {err}") from err
            more = bool(reply.get("more"))
            del reply, kvs
            yield page
            if not more or not last:
                return
            body = {"key": b64(last + b"\0"), "range_end": range_end, "limit": ETCD_PAGE,
                    "revision": str(revision)}

    def _at_one_revision(self, read: Callable[[int], _T]) -> tuple[int, _T]:
        """``read(revision)`` at the revision etcd is at now; again when compaction
        overtakes the read (it takes seconds at 1,000,000 keys)."""
        for attempt in range(1, ETCD_READ_ATTEMPTS + 1):
            revision = self._snapshot_revision()
            try:
                return revision, read(revision)
            except EtcdError as err:
                if not _compacted(err) or attempt == ETCD_READ_ATTEMPTS:
                    raise
                log.warning("%s: revision %d compacted while reading; again", self.name,
                            revision)
        raise AssertionError("unreachable")

    def _read_all(self) -> tuple[int, dict[str, bytes]]:
        """Every key under the prefix at one revision: the revision and the values
        by relative key (kept: a refused re-read compares them with the state)."""
        return self._at_one_revision(self._values_at)

    def _values_at(self, revision: int) -> dict[str, bytes]:
        pieces = self._pieces()

        def read(piece: tuple[bytes, bytes, str | None]) -> list[list[tuple[str, bytes]]]:
            return list(self._pages(piece[0], piece[1], revision))

        with ThreadPoolExecutor(len(pieces), thread_name_prefix="etcd-read") as pool:
            parts = list(pool.map(read, pieces))
        return {key: value for pages in parts for page in pages for key, value in page}

    def _load_all(self) -> tuple[int, ClusterState]:
        """Read the prefix (as ``_read_all``) and validate it as the pages arrive: the
        kinds are validated in turn while the later ones are still being read, and no
        raw value is kept past its validation."""
        return self._at_one_revision(self._state_at)

    def _state_at(self, revision: int) -> ClusterState:
        pieces = self._pieces()
        stop = threading.Event()
        queues: list[queue.SimpleQueue[object]] = [queue.SimpleQueue() for _ in pieces]

        def pump(i: int) -> None:
            key, end, _ = pieces[i]
            try:
                for page in self._pages(key, end, revision):
                    if stop.is_set():
                        return
                    queues[i].put(page)
                queues[i].put(None)
            except BaseException as err:  # handed to the validating thread
                queues[i].put(err)

        def drain(i: int) -> Iterator[tuple[str, bytes]]:
            while True:
                item = queues[i].get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield from item  # type: ignore[misc]

        pool = ThreadPoolExecutor(len(pieces), thread_name_prefix="etcd-read")
        try:
            for i in range(len(pieces)):
                pool.submit(pump, i)
            others = [kv for i, p in enumerate(pieces) if p[2] is None for kv in drain(i)]
            by_kind = {p[2]: drain(i) for i, p in enumerate(pieces) if p[2] is not None}
            return etcd_state_from_rows(others, by_kind, self.prefix, self.name)
        finally:
            stop.set()
            pool.shutdown(wait=True)

    def _resync(self) -> ClusterState | None:
        try:
            revision, values = self._read_all()
        except EtcdError as err:
            log.warning("%s: cannot read %s again: %s", self.name, self.prefix, err)
            return None
        self._revision = revision
        self.full_reads += 1
        try:
            state = etcd_state_from_values(values, self.prefix, self.name)
        except StateError as err:
            good = _EtcdDocs(self._good, {})
            pending: dict[str, bytes | None] = {
                key: value for key, value in values.items() if good.get(key) != _etcd_doc(value)
            }
            pending.update((key, None) for key in good if key not in values)
            self._pending = pending
            self._refuse(err)
            return None
        self._pending = {}
        self._incremental = Incremental(state)
        if state == self._good:
            return None
        return self._accept(state)

    def _relative(self, key: bytes) -> str:
        return key[len(self._key) :].decode("utf-8", errors="replace")

    def _apply(self, events: list[Event]) -> ClusterState | None:
        applied = self._revision
        latest: dict[str, bytes | None] = {}
        for event in events:
            if 0 < event.mod_revision <= applied:
                continue  # seen already (a watch resumed a little early)
            self._revision = max(self._revision, event.mod_revision)
            latest[self._relative(event.key)] = None if event.type == "delete" else event.value
        changed: set[str] = set()
        good = _EtcdDocs(self._good, {})
        for key, value in latest.items():
            if key not in self._pending:
                # what the good state already says (a rewrite of the same entity, a
                # delete of a key it never had): nothing to rebuild
                now = good.get(key)
                if (now is None and value is None) or (
                    now is not None and value is not None and _etcd_doc(value) == now
                ):
                    continue
            self._pending[key] = value
            changed.add(key)
        return self._rebuild(changed) if changed else None

    def _changed_rows(self, keys: set[str]) -> ClusterState | None:
        """Validate only the changed keys (``state.Incremental``); None: do it whole."""
        assert self._incremental is not None
        changes: dict[str, dict[str, object | None]] = {}
        meta: Mapping[str, object] | None = None
        if set(self._pending) - keys:
            return None  # older changes not in the state yet: the whole check
        for key in sorted(keys):
            value = self._pending.get(key)
            doc = None if value is None else _etcd_doc(value)
            if isinstance(doc, _BadJson):
                raise StateError(self.name, [Problem(f"{self.prefix}{key}", doc.reason)])
            kind, slash, name = key.partition("/")
            if key == ETCD_META_KEY:
                if not isinstance(doc, dict):
                    return None
                meta = doc
            elif kind in ETCD_KINDS and slash and name and "/" not in name:
                changes.setdefault(kind, {})[name] = doc
            else:
                return None  # an unknown key: the whole check names it
        try:
            return self._incremental.apply(
                changes, meta, self.name, lambda kind, name: f"{self.prefix}{kind}/{name}"
            )
        except NeedsFullParse as why:
            log.info("%s: %s; validating the whole state", self.name, why)
            return None

    def _rebuild(self, keys: set[str]) -> ClusterState | None:
        try:
            state = None
            if self._incremental is not None:
                state = self._changed_rows(keys)
            if state is None:
                # the good state's entities, with the pending keys over them
                self.full_reads += 1
                docs = _EtcdDocs(self._good, self._pending)
                state = etcd_state_from_values(docs, self.prefix, self.name, parse=_etcd_value)
                self._incremental = Incremental(state)
        except StateError as err:
            self._refuse(err)
            return None
        self._pending = {}
        return self._accept(state)

    def _refuse(self, err: StateError) -> None:
        self._incremental = None  # the next change validates everything
        self.rejected += 1
        self.last_error = str(err)
        log.warning(
            "%s: update at revision %d refused, keeping version %s:\n%s",
            self.name,
            self._revision,
            self._good.version,
            err,
        )

    def _accept(self, state: ClusterState) -> ClusterState:
        self._good = state
        log.info(
            "%s: applied state version %s (revision %d)", self.name, state.version, self._revision
        )
        return state

    def close(self) -> None:
        self._closed = True
        self._drop_stream()


# -------------------------------------------------------------------------- config


def write_state(
    target: sqlite3.Connection | EtcdClient | Sequence[str],
    state: ClusterState,
    prefix: str = DEFAULT_ETCD_PREFIX,
) -> None:
    """Put ``state`` into a store in one transaction: a SQLite connection, or etcd
    (a client or its endpoints) under ``prefix``. For tests and tools."""
    if isinstance(target, sqlite3.Connection):
        write_sqlite_state(target, state)
    else:
        write_etcd_state(target, state, prefix)


#: The keys a daemon config's ``state:`` section may hold, by ``source``; the config
#: check (``config.py``) refuses any other. A key added to ``make_source`` goes here.
SOURCE_KEYS: Mapping[str, tuple[str, ...]] = {
    "file": ("source", "path", "poll_interval"),
    "sqlite": ("source", "path", "poll_interval"),
    "etcd": ("source", "endpoints", "prefix"),
}


def make_source(config: Mapping[str, object]) -> StateSource:
    """Build the source a config names.

    ``{source: file|sqlite, path, poll_interval?}`` or
    ``{source: etcd, endpoints: [host:port, ...], prefix?}``. ``source`` defaults to
    ``file``, the embedded default (SPEC, "Cluster state").
    """
    kind = config.get("source", "file")
    if kind == "etcd":
        return _make_etcd_source(config)
    path = config.get("path")
    poll = config.get("poll_interval", DEFAULT_POLL_INTERVAL)
    if not isinstance(path, str | Path):
        raise ValueError(f"state source needs a path, got {path!r}")
    if not isinstance(poll, int | float) or isinstance(poll, bool) or poll <= 0:
        raise ValueError(f"poll_interval must be a positive number of seconds, got {poll!r}")
    if kind == "file":
        return FileSource(path, float(poll))
    if kind == "sqlite":
        return SqliteSource(path, float(poll))
    raise ValueError(f"unknown state source {kind!r}; expected file, sqlite or etcd")


def _make_etcd_source(config: Mapping[str, object]) -> EtcdSource:
    endpoints = config.get("endpoints")
    prefix = config.get("prefix", DEFAULT_ETCD_PREFIX)
    if (
        not isinstance(endpoints, list)
        or not endpoints
        or not all(isinstance(e, str) for e in endpoints)
    ):
        raise ValueError(f"etcd source needs endpoints: a list of host:port, got {endpoints!r}")
    if not isinstance(prefix, str):
        raise ValueError(f"etcd prefix must be a string, got {prefix!r}")
    return EtcdSource([str(e) for e in endpoints], prefix)
