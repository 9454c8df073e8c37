"""The kernel families' text path (``metrics.TextFamily``): one C-level
``template % values`` per block of lines must write exactly what a plain per-line
formatter writes, and say its length (the endpoint's Content-Length) before writing."""

from __future__ import annotations

import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy import metrics
from edgeproxy.metrics import (
    BY_NAME,
    MACHINE_LABELS,
    LabelRows,
    TextFamily,
    _add_by_group,
    _digits,
    _label_texts,
    exposition,
    render,
)

ODD = ["%", "%d", "%%", "%s%(x)s", '"', "\\", "\\n", "\n", 'a"b\\c%d\n', "é", "名前",
       "}", "{", ",", "=", " ", ""]
EDGES = [0, 1, 9, 10, 99, 100, 10**18 - 1, 10**18, 10**19 - 1, 10**19, 2**63,
         2**64 - 2, 2**64 - 1]


def plain(value: str) -> str:
    """Prometheus label value escaping, written out independently of metrics.py."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def reference(head: str, columns: list[list[str]], values: list[int], skip_zero: bool) -> str:
    """The family's sample lines, one f-string each."""
    out = []
    for row, v in zip(zip(*columns, strict=True), values, strict=True):
        if skip_zero and v == 0:
            continue
        labels = ",".join(f'{n}="{plain(x)}"' for n, x in zip(MACHINE_LABELS, row, strict=True))
        out.append(f"{head}{labels}}} {v}")
    return "".join(out)


def rows(columns: list[list[str]]) -> LabelRows:
    texts, sizes = _label_texts(MACHINE_LABELS, *columns)
    text = np.empty(len(texts), dtype=object)
    text[:] = texts
    return LabelRows(text, np.array(sizes, dtype=np.int64))


def random_case(rng: random.Random, n: int, odd: bool) -> tuple[list[list[str]], list[int]]:
    def word() -> str:
        if odd and rng.random() < 0.3:
            return rng.choice(ODD) + rng.choice(["", "x", "app-1"]) + rng.choice(ODD)
        return f"{rng.choice(['app', 'web', 'svc'])}-{rng.randrange(10**6)}"

    columns = [[word() for _ in range(n)] for _ in MACHINE_LABELS]
    values = [rng.choice(EDGES) if rng.random() < 0.5 else rng.randrange(2**64)
              for _ in range(n)]
    return columns, values


@pytest.mark.parametrize("odd", [False, True])
@pytest.mark.parametrize("block", [1, 3, 7, metrics.BLOCK])
def test_block_formatting_matches_a_line_by_line_formatter(
        odd: bool, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "BLOCK", block)
    rng = random.Random(block * 2 + odd)
    spec = BY_NAME["edgeproxy_app_tcp_disconnects_total"]
    for n in (0, 1, 2, block, block + 1, 3 * block + 2, 50):
        family = TextFamily(spec)
        expected = family.head.decode()
        for k, skip_zero in enumerate((True, False)):
            columns, values = random_case(rng, n, odd)
            head = f'\n{spec.name}{{reason="r%d{k}",' if k else f"\n{spec.name}{{"
            family.add(head, rows(columns), np.array(values, dtype=np.uint64), skip_zero)
            expected += reference(head, columns, values, skip_zero)
        expected += "\n"
        text = family.render()
        assert text.decode() == expected
        assert family.nbytes == len(text)
        assert all(len(c) for c in family.chunks())


def test_digits_at_every_power_of_ten() -> None:
    values = sorted({v for k in range(20) for v in (10**k - 1, 10**k, 10**k + 1)
                     if 0 <= v < 2**64} | {2**64 - 1})
    assert _digits(np.array(values, dtype=np.uint64)).tolist() == [len(str(v)) for v in values]


def test_sums_by_group_match_add_at_and_wrap_like_the_kernel() -> None:
    rng = np.random.default_rng(5)
    for sort in (False, True):
        groups = rng.integers(0, 50, 1000)
        if sort:
            groups.sort()
        values = rng.integers(0, 2**64 - 1, (1000, 3), dtype=np.uint64, endpoint=True)
        expected = np.zeros((60, 3), dtype=np.uint64)
        np.add.at(expected, groups, values)
        got = np.ones((60, 3), dtype=np.uint64)
        _add_by_group(got, groups, values)
        assert (got == expected + np.uint64(1)).all()
    empty = np.zeros((2, 3), dtype=np.uint64)
    _add_by_group(empty, np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.uint64))
    assert not empty.any()


def test_exposition_length_is_known_before_the_text_is_written() -> None:
    """Content-Length is computed from label and digit lengths: it must equal the
    body, odd labels (``%``, quotes, backslashes, UTF-8) and huge counters included."""
    from edgeproxy.metrics import EdgeproxyCollector
    from test_metrics import FakeDataplane, FakeProxy, full_counters, full_snapshot, machine

    counters = full_counters()
    odd = tuple(machine(name, app=name, opened=v, active=v % 3, bytes_in=v, closed=v)
                for name, v in zip(ODD, EDGES[1:] + EDGES, strict=False) if name)
    dp = FakeDataplane(counters.__class__(machines=counters.machines + odd,
                                          services=counters.services,
                                          stats=counters.stats, anomalies=counters.anomalies))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeproxyCollector(dataplane=dp, proxy=FakeProxy(full_snapshot())))
    size, chunks = exposition(registry)
    body = b"".join(chunks)
    assert size == len(body) and body == render(registry)
    samples = {(s.name, s.labels.get("machine")): float(s.value)
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    for m in odd:
        connects = samples.get(("edgeproxy_app_tcp_connects_total", m.machine))
        assert connects == (float(m.opened) if m.opened else None)  # zero: no series
        active = samples.get(("edgeproxy_app_tcp_active", m.machine))
        assert active == (m.active if m.opened or m.active else None)  # idle: no series


def test_text_written_after_a_later_scrape_is_still_this_scrapes() -> None:
    """Lines are written after the collector's lock is released (while the body is
    sent): a scrape that changes the label cache meanwhile must not show in them."""
    from dataclasses import replace

    from test_metrics import full_collector, machine

    collector, dp, _ = full_collector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    expected = render(registry)
    size, chunks = exposition(registry)
    dp.counters = replace(dp.counters, machines=(machine("other-1", opened=7, active=2),
                                                 *dp.counters.machines[1:]))
    later = render(registry)  # id 0 now names another machine: its text rebuilt
    assert b'machine="other-1"' in later
    body = b"".join(chunks)
    assert len(body) == size

    def stable(text: bytes) -> bytes:  # the timestamp line aside
        return b"\n".join(line for line in text.split(b"\n") if b"timestamp" not in line)

    assert stable(body) == stable(expected)
