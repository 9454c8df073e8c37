"""The etcd source against a real 3-member etcd cluster on loopback.

Two sources stand for two edges watching the same prefix. Each test uses its own
prefix on a shared cluster; the failover test gets a cluster of its own, since it
kills a member.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeproxy.etcd import EtcdClient, EtcdError
from edgeproxy.placement import place
from edgeproxy.sources import EtcdSource, etcd_state, make_source, write_state
from edgeproxy.state import ClusterState, StateError, load_state, parse_state, to_dict
from etcd_cluster import EtcdCluster, etcd_missing_reason

pytestmark = pytest.mark.skipif(
    etcd_missing_reason() is not None, reason=str(etcd_missing_reason())
)

LAB_STATE = load_state(Path(__file__).resolve().parents[1] / "tools" / "edgelab" / "state.yaml")
WAIT = 10.0  # seconds: generous, for a loaded box and a leader election; speed is printed
WRITE_RETRY_FOR = 10.0  # seconds a test keeps retrying a write while a leader is elected
Data = dict[str, list[dict[str, object]]]
# Machines stopped one by one: each step touches another key, so a final state that
# has them all stopped proves no step was lost on the way.
STOP_ORDER = ("echo-ord-1", "echo-ord-2", "echo-ams-1", "echo-ams-2", "echo-syd-1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as running:
        yield running


def changed(state: ClusterState, edit: Callable[[Data], object], version: int) -> ClusterState:
    """``state`` with ``edit`` applied to its plain data and a new version."""
    data = to_dict(state)
    edit(data)  # type: ignore[arg-type]
    data["version"] = version
    return parse_state(data, "test")


def machine(data: Data, machine_id: str) -> dict[str, object]:
    return next(m for m in data["machines"] if m["id"] == machine_id)


def stopping_one_by_one(count: int) -> list[ClusterState]:
    """Versions 2.. of the lab state, each with one more machine stopped."""
    states: list[ClusterState] = []
    previous = LAB_STATE
    for version, machine_id in enumerate(STOP_ORDER[:count], start=2):

        def stop(data: Data, machine_id: str = machine_id) -> None:
            machine(data, machine_id)["state"] = "stopped"

        previous = changed(previous, stop, version)
        states.append(previous)
    return states


async def follow_until(edge: Edge, last: ClusterState) -> list[int]:
    """Versions the edge yields until ``last``: each one a watch message's worth."""
    versions: list[int] = []
    while True:
        state = (await edge.next_state())[1]
        versions.append(state.version)
        if state == last:
            return versions


def write_with_retry(endpoints: list[str], state: ClusterState, prefix: str) -> None:
    """Write, retrying while the cluster elects a leader (bounded)."""
    deadline = time.monotonic() + WRITE_RETRY_FOR
    while True:
        try:
            write_state(EtcdClient(endpoints), state, prefix)
            return
        except EtcdError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Edge:
    """One source, followed by a task that queues each state it yields, with arrival time."""

    def __init__(self, source: EtcdSource) -> None:
        self.source = source
        self.arrivals: asyncio.Queue[tuple[float, ClusterState]] = asyncio.Queue()
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for state in self.source.watch():
            self.arrivals.put_nowait((time.monotonic(), state))

    async def next_state(self) -> tuple[float, ClusterState]:
        return await asyncio.wait_for(self.arrivals.get(), WAIT)

    async def reaches(self, expected: ClusterState) -> float:
        """Wait until the source yields ``expected``; returns when it arrived."""
        deadline = time.monotonic() + WAIT
        while True:
            at, state = await asyncio.wait_for(
                self.arrivals.get(), max(0.0, deadline - time.monotonic())
            )
            if state == expected:
                return at

    async def watching(self) -> str:
        """Wait until the watch is open; returns the member it is open on."""
        deadline = time.monotonic() + WAIT
        while (endpoint := self.source.connected_endpoint) is None:
            assert time.monotonic() < deadline, "the source never opened a watch"
            await asyncio.sleep(0.01)
        return endpoint

    async def close(self) -> None:
        self.source.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# ------------------------------------------------------------------ without etcd


def test_problems_name_the_etcd_key_and_field() -> None:
    docs: dict[str, object] = {
        "meta": {"version": 1},
        "regions/ord": {"code": "ord", "position": [41.9, -87.9]},
        "hosts/w1": {"id": "w1", "role": "worker", "region": "ord", "address": "10.0.0.1"},
        "apps/a": {"name": "a", "addresses": ["10.1.0.1"]},
        "machines/m1": {
            "id": "m1",
            "app": "a",
            "host": "ghost",
            "address": "10.0.0.2",
            "state": "started",
        },
        "machines/m2": {
            "id": "other",
            "app": "a",
            "host": "w1",
            "address": "10.0.0.3",
            "state": "started",
        },
        "stray": {},
    }
    with pytest.raises(StateError) as refused:
        etcd_state(docs, "/ep/")
    message = str(refused.value)
    assert "/ep/machines/m2.id: 'other' differs from the key" in message
    assert "/ep/stray: unknown key" in message

    del docs["machines/m2"], docs["stray"]
    with pytest.raises(StateError) as refused:
        etcd_state(docs, "/ep/")
    assert str(refused.value) == "etcd: /ep/machines/m1.host: unknown host ghost"


def test_make_source_checks_the_etcd_config() -> None:
    with pytest.raises(ValueError, match="endpoints"):
        make_source({"source": "etcd"})
    with pytest.raises(ValueError, match="end with '/'"):
        make_source({"source": "etcd", "endpoints": ["127.0.0.1:1"], "prefix": "/ep"})


# --------------------------------------------------------------------- with etcd


def test_source_starts_with_the_state_in_etcd(cluster: EtcdCluster) -> None:
    write_state(cluster.endpoints, LAB_STATE, "/start/")
    source = make_source({"source": "etcd", "endpoints": cluster.endpoints, "prefix": "/start/"})
    try:
        assert source.current() == LAB_STATE
        assert (source.rejected, source.last_error) == (0, None)
    finally:
        source.close()


def test_source_refuses_a_bad_first_state(cluster: EtcdCluster) -> None:
    EtcdClient(cluster.endpoints).put(b"/empty/meta", b'{"version": "one"}')
    with pytest.raises(StateError, match=r"/empty/meta\.version"):
        EtcdSource(cluster.endpoints, "/empty/")


def test_two_edges_converge_after_every_change(cluster: EtcdCluster) -> None:
    prefix = "/converge/"
    stopped = changed(LAB_STATE, lambda d: machine(d, "echo-ord-1").update(state="stopped"), 2)
    removed = changed(
        stopped,
        lambda d: d["machines"].remove(machine(d, "echo-ord-2")),
        3,
    )
    added = changed(
        removed,
        lambda d: d["machines"].append(
            {
                "id": "echo-ord-3",
                "app": "echo",
                "host": "worker-ord",
                "address": "198.18.64.3",
                "state": "started",
            }
        ),
        4,
    )

    def raise_limits(data: Data) -> None:
        service = next(s for s in data["services"] if s["id"] == "web-http")
        service["concurrency"] = {"type": "requests", "soft_limit": 80, "hard_limit": 160}

    limits = changed(added, raise_limits, 5)
    back = changed(limits, lambda d: machine(d, "echo-ord-1").update(state="started"), 6)
    sequence = [stopped, removed, added, limits, back]

    async def scenario() -> list[float]:
        write_state(cluster.endpoints, LAB_STATE, prefix)
        edges = [Edge(EtcdSource(cluster.endpoints, prefix)) for _ in range(2)]
        delays: list[float] = []
        try:
            for edge in edges:
                await edge.watching()
            for expected in sequence:
                written = time.monotonic()
                await asyncio.to_thread(write_state, cluster.endpoints, expected, prefix)
                for edge in edges:
                    delays.append(await edge.reaches(expected) - written)
                first, second = (edge.source.current() for edge in edges)
                assert first == second == expected
                for host in ("edge-ord", "edge-ams"):
                    assert place(first, host) == place(second, host)
        finally:
            for edge in edges:
                await edge.close()
        return delays

    delays = asyncio.run(scenario())
    print(
        f"etcd write → source: median {statistics.median(delays) * 1000:.1f} ms, "
        f"max {max(delays) * 1000:.1f} ms over {len(delays)}"
    )


def test_bad_update_is_refused_and_the_last_good_state_kept(cluster: EtcdCluster) -> None:
    prefix = "/bad/"
    ghost = (
        b'{"id":"echo-ghost","app":"echo","host":"worker-nowhere",'
        b'"address":"198.18.64.99","state":"started"}'
    )
    fixed = changed(
        LAB_STATE,
        lambda d: d["machines"].append(
            {
                "id": "echo-ghost",
                "app": "echo",
                "host": "worker-ord",
                "address": "198.18.64.99",
                "state": "started",
            }
        ),
        1,
    )

    async def scenario() -> None:
        write_state(cluster.endpoints, LAB_STATE, prefix)
        edges = [Edge(EtcdSource(cluster.endpoints, prefix)) for _ in range(2)]
        client = EtcdClient(cluster.endpoints)
        try:
            for edge in edges:
                await edge.watching()
            await asyncio.to_thread(client.put, b"/bad/machines/echo-ghost", ghost)
            deadline = time.monotonic() + WAIT
            while any(edge.source.rejected == 0 for edge in edges):
                assert time.monotonic() < deadline, "the bad update was never refused"
                await asyncio.sleep(0.01)
            for edge in edges:
                assert edge.source.rejected == 1
                assert edge.source.last_error == (
                    "etcd: /bad/machines/echo-ghost.host: unknown host worker-nowhere"
                )
                assert edge.source.current() == LAB_STATE
                assert edge.arrivals.empty()
            # The write that repairs it applies on both.
            await asyncio.to_thread(write_state, client, fixed, prefix)
            for edge in edges:
                await edge.reaches(fixed)
                assert edge.source.current() == fixed
        finally:
            for edge in edges:
                await edge.close()

    asyncio.run(scenario())


def test_updates_made_while_not_watching_all_arrive(cluster: EtcdCluster) -> None:
    prefix = "/resume/"
    states = stopping_one_by_one(3)

    async def scenario() -> list[int]:
        write_state(cluster.endpoints, LAB_STATE, prefix)
        source = EtcdSource(cluster.endpoints, prefix)
        for state in states:  # before any watch is open: only the revision remembers
            write_state(cluster.endpoints, state, prefix)
        edge = Edge(source)
        try:
            return await follow_until(edge, states[-1])
        finally:
            await edge.close()

    versions = asyncio.run(scenario())
    # etcd may send the missed revisions in one message (one state) or several.
    assert versions == sorted(set(versions)) and versions[-1] == 4


def test_compacted_history_is_read_again(cluster: EtcdCluster) -> None:
    prefix = "/compact/"
    middle = changed(LAB_STATE, lambda d: None, 8)
    newer = changed(LAB_STATE, lambda d: machine(d, "web-syd-2").update(state="stopped"), 9)

    async def scenario() -> ClusterState:
        client = EtcdClient(cluster.endpoints)
        write_state(client, LAB_STATE, prefix)
        source = EtcdSource(cluster.endpoints, prefix)
        write_state(client, middle, prefix)
        write_state(client, newer, prefix)
        # A key outside the prefix gives a later revision to compact at, so the
        # source's resume point is gone when its watch opens.
        client.compact(client.put(b"/compact-elsewhere", b"x"))
        edge = Edge(source)
        try:
            return (await edge.next_state())[1]
        finally:
            await edge.close()

    assert asyncio.run(scenario()) == newer  # read whole again: the middle is skipped


def test_updates_keep_arriving_when_the_watched_member_dies(tmp_path: Path) -> None:
    prefix = "/failover/"
    states = stopping_one_by_one(len(STOP_ORDER))

    async def scenario(cluster: EtcdCluster) -> tuple[str, str, list[list[int]]]:
        write_state(cluster.endpoints, LAB_STATE, prefix)
        edges = [Edge(EtcdSource(cluster.endpoints, prefix)) for _ in range(2)]
        try:
            victim = await edges[0].watching()
            await edges[1].watching()
            cluster.member_at(victim).kill()
            survivors = [e for e in cluster.endpoints if e != victim]
            for state in states:
                await asyncio.to_thread(write_with_retry, survivors, state, prefix)
            seen = [await follow_until(edge, states[-1]) for edge in edges]
            assert edges[0].source.current() == edges[1].source.current() == states[-1]
            now = edges[0].source.connected_endpoint
            assert now is not None
            return victim, now, seen
        finally:
            for edge in edges:
                await edge.close()

    with EtcdCluster(tmp_path) as cluster:
        victim, now, seen = asyncio.run(scenario(cluster))
    print(f"killed {victim}; watch moved to {now}; versions seen per edge: {seen}")
    assert now != victim
    for versions in seen:
        assert versions == sorted(set(versions)) and versions[-1] == states[-1].version


def test_a_silent_member_is_left_for_another(tmp_path: Path) -> None:
    """A member alive but unresponsive (frozen) keeps the watch open and sends nothing;
    the source notices by probing after a silence and moves on."""
    prefix = "/silent/"
    (after,) = stopping_one_by_one(1)

    async def scenario(cluster: EtcdCluster) -> tuple[str, str, float]:
        write_state(cluster.endpoints, LAB_STATE, prefix)
        edge = Edge(EtcdSource(cluster.endpoints, prefix, timeout=0.5, probe_after=0.5))
        try:
            victim = await edge.watching()
            cluster.member_at(victim).freeze()
            survivors = [e for e in cluster.endpoints if e != victim]
            written = time.monotonic()
            await asyncio.to_thread(write_with_retry, survivors, after, prefix)
            arrived = await edge.reaches(after)
            now = edge.source.connected_endpoint
            assert now is not None
            return victim, now, arrived - written
        finally:
            await edge.close()

    with EtcdCluster(tmp_path) as cluster:
        victim, now, delay = asyncio.run(scenario(cluster))
    print(f"froze {victim}; watch moved to {now}; update arrived after {delay * 1000:.0f} ms")
    assert now != victim


def test_the_source_keeps_no_values_and_rebuilds_from_its_state(cluster: EtcdCluster) -> None:
    """Steady state holds no raw values; a change it cannot validate piecewise (a
    service) and the repair after a refusal rebuild from the state's own entities
    plus the changed keys; rewrites of what the state already says do nothing."""
    prefix = "/novalues/"
    client = EtcdClient(cluster.endpoints)
    write_state(client, LAB_STATE, prefix)
    source = EtcdSource(cluster.endpoints, prefix, read_wait=0.2)
    try:
        assert source._pending == {}

        def settle() -> ClusterState | None:
            got = None
            for _ in range(10):  # a few reads: the watch opens, then the event
                got = source.step() or got
                if got is not None and not source._pending:
                    return got
            return got

        settle()  # opens the watch
        reads = source.full_reads
        # the same entity rewritten (as another writer would): nothing new
        key = f"{prefix}machines/echo-ord-1".encode()
        client.put(key, client.range_prefix(key)[1][0].value)
        client.put(f"{prefix}nothing/here".encode(), b"{}")  # unknown key: refused
        assert settle() is None and source.rejected == 1
        assert set(source._pending) == {"nothing/here"} and source.full_reads == reads + 1
        client.delete(f"{prefix}nothing/here".encode())  # repaired: rebuilt whole
        assert settle() == LAB_STATE and source._pending == {}
        assert source.full_reads == reads + 2
        # a service change: whole validation over the state's own documents
        slower = changed(LAB_STATE, lambda d: d["services"][0]["concurrency"].update(
            soft_limit=150), 2)
        write_state(client, slower, prefix)
        assert settle() == slower and source.full_reads == reads + 3
        # a machine change: piecewise again
        stopped = changed(slower, lambda d: machine(d, "web-ams-1").update(state="stopped"), 3)
        write_state(client, stopped, prefix)
        got = settle()
        assert got == stopped and source.full_reads == reads + 3
        assert got is not None and got.changed_apps == {"web"}
    finally:
        source.close()


def test_the_first_read_is_one_snapshot_and_the_watch_takes_over(
    cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefix is read in pieces side by side, page by page, all at the revision
    of the first count: writes landing meanwhile are not in the first state (not
    even the pages still to come) and arrive through the watch after it."""
    from edgeproxy import sources

    prefix = "/snapshot/"
    client = EtcdClient(cluster.endpoints)
    write_state(client, LAB_STATE, prefix)
    monkeypatch.setattr(sources, "ETCD_PAGE", 2)  # many pages per kind
    stopped = changed(LAB_STATE, lambda d: [m.update(state="stopped")
                                            for m in d["machines"]], 2)
    pages = EtcdSource._pages
    wrote: list[int] = []

    def pages_then_write(self: EtcdSource, key: bytes, end: bytes, revision: int
                         ) -> Iterator[list[tuple[str, bytes]]]:
        for page in pages(self, key, end, revision):
            if not wrote and b"machines/" in key:
                wrote.append(revision)
                write_state(client, stopped, prefix)  # while the machines are read
            yield page

    monkeypatch.setattr(EtcdSource, "_pages", pages_then_write)
    source = EtcdSource(cluster.endpoints, prefix, read_wait=0.2)
    try:
        assert wrote and source.revision == wrote[0]
        assert source.current() == LAB_STATE
        got = None
        for _ in range(20):
            got = source.step() or got
            if got == stopped:
                break
        assert got == stopped
    finally:
        source.close()


def test_whole_reads_say_what_the_values_would(cluster: EtcdCluster) -> None:
    """Strays between the kinds, keys nested under a kind, bad JSON and a key that
    disagrees with its id: the streamed first read refuses as the whole check does."""
    from edgeproxy.sources import etcd_state_from_values

    prefix = "/strays/"
    client = EtcdClient(cluster.endpoints)
    write_state(client, LAB_STATE, prefix)
    for key, value in ((b"aaa", b"{}"), (b"hosts", b"{}"), (b"machines/x/y", b"{}"),
                       (b"nothing/here", b"{}"), (b"zzz", b"1"), (b"apps/bad", b"{"),
                       (b"machines/echo-ord-1", b'{"id": "other"}')):
        client.put(prefix.encode() + key, value)
    _, kvs = client.range_prefix(prefix.encode())
    values = {kv.key.decode()[len(prefix):]: kv.value for kv in kvs}
    with pytest.raises(StateError) as whole:
        etcd_state_from_values(values, prefix)
    with pytest.raises(StateError) as streamed:
        EtcdSource(cluster.endpoints, prefix)
    assert str(streamed.value) == str(whole.value)
    for key in ("aaa", "hosts", "machines/x/y", "nothing/here", "zzz", "apps/bad",
                "machines/echo-ord-1.id"):
        assert f"{prefix}{key}:" in str(streamed.value)
