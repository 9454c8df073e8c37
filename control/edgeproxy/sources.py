"""Where cluster state comes from: one interface, a source per store.

Every source keeps the last good state. A new picture is validated whole; a bad one
(unparseable, unknown fields, dangling references, ...) is logged, counted in
``rejected`` with its message in ``last_error``, and skipped, so the last good state
keeps serving (SPEC, "Cluster state").

Sources poll a cheap change marker every ``poll_interval`` seconds (a file's stat,
SQLite's ``PRAGMA data_version``) and only rebuild when it moves. Polling runs in a
worker thread so neither a slow check nor a large rebuild stalls the event loop.

Each source is meant for one watcher: ``watch()`` yields every new state once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Protocol

from edgeproxy.state import (
    ClusterState,
    Problem,
    StateError,
    parse_state,
    parse_yaml,
    to_dict,
)

log = logging.getLogger(__name__)

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
    """A YAML file, reloaded when its stat changes.

    Atomic renames show up as a new inode; in-place writes as a new size or mtime.
    A half-written file fails to parse and is refused; the write that completes it
    changes the stat again and applies.
    """

    def __init__(self, path: str | Path, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        super().__init__(str(path), poll_interval)
        self.path = Path(path)
        self._seen = self._fingerprint()
        self._content = self.path.read_bytes()
        self._good = parse_yaml(self._content, self.name)  # no last good: raise

    def _fingerprint(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None  # between an unlink and a create: wait for the file
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _changed(self) -> bool:
        seen = self._fingerprint()
        if seen == self._seen:
            return False
        self._seen = seen
        return seen is not None

    def _load(self) -> ClusterState | None:
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            self._seen = None  # gone since the stat; look again next tick
            return None
        # The stat may move without the bytes moving (touch, or a stat taken mid-write
        # that we already read complete): same bytes, same state, nothing to apply.
        if content == self._content:
            return None
        self._content = content
        return parse_yaml(content, self.name)


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
    data: dict[str, object] = {}
    for key, value in conn.execute("SELECT key, value FROM meta ORDER BY key"):
        data[key] = _json(value, str(key), problems)
    keys: dict[str, list[str]] = {}
    for table, (key_column, columns, json_columns) in _TABLES.items():
        rows: list[object] = []
        keys[table] = []
        query = f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid"
        for values in conn.execute(query):
            row = dict(zip(columns, values, strict=True))
            keys[table].append(str(row[key_column]))
            for column in json_columns:
                if row[column] is None:
                    del row[column]  # NULL: the field is absent
                else:
                    where = f"{table}[{key_column}={row[key_column]}].{column}"
                    row[column] = _json(row[column], where, problems)
            rows.append(row)
        data[table] = rows
    if problems:
        raise StateError(source, problems)
    return data, keys


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


def write_state(conn: sqlite3.Connection, state: ClusterState) -> None:
    """Replace the database's contents with ``state`` in one transaction.

    For tests and tools; a real store changes single rows.
    """
    conn.executescript(SCHEMA)
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
    no I/O beyond the lock check, so polling it every tick is cheap. On a change the
    whole state is read in one read transaction (a consistent snapshot) and validated.
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
        state = self._load()
        assert state is not None
        self._good = state

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
                data, keys = read_state_data(self._conn, self.name)
            finally:
                self._conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise StateError(self.name, [Problem("", f"cannot read the database: {err}")]) from err
        try:
            return parse_state(data, self.name)
        except StateError as err:
            raise _name_rows(err, keys) from err

    def close(self) -> None:
        self._conn.close()


# -------------------------------------------------------------------------- config


def make_source(config: Mapping[str, object]) -> StateSource:
    """Build the source a config names: ``{source: file|sqlite, path, poll_interval?}``.

    ``source`` defaults to ``file``, the embedded default (SPEC, "Cluster state").
    """
    kind = config.get("source", "file")
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
    raise ValueError(f"unknown state source {kind!r}; expected file or sqlite")
