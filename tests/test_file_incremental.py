"""The file source's incremental path (``yamlpatch``) gives what a whole parse gives."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.sources import FileSource
from edgeproxy.state import ClusterState, StateError, parse_state, parse_yaml, to_dict
from edgeproxy.yamlpatch import YamlIndex, _Starts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from edgebench import synth

LAB_TEXT = (Path(__file__).resolve().parents[1] / "tools" / "edgelab" / "state.yaml").read_text()
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
SYNTH_TEXT = yaml.dump(
    to_dict(parse_state(synth.build(8), "synthetic")), Dumper=_DUMPER, sort_keys=False
)
BASES = {"lab": LAB_TEXT, "synth": SYNTH_TEXT}


def write(path: Path, text: str) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def index_of(text: bytes) -> list[tuple[object, ...]] | None:
    roots: list[yaml.Node] = []
    parse_yaml(text, "x", on_root=roots.append)
    index = YamlIndex.build(text, roots[0])
    return None if index is None else sections(index)


def sections(index: YamlIndex) -> list[tuple[object, ...]]:
    return [(s.name, s.start, s.prefix, s.items.values() if s.items else None)
            for s in index.sections]


def full(text: str) -> ClusterState | None:
    try:
        return parse_yaml(text.encode(), "x")
    except StateError:
        return None


# ----------------------------------------------------------------------- edits
# Each edit takes the text and a draw function and returns the new text. Some are
# valid one-machine changes (the incremental path), some must fall back (services,
# keys, anchors, duplicates), some are refused.

_MACHINE_BLOCK = re.compile(r"^- id: (\S+)\n(?:  .*\n)*", re.M)
_MACHINE_FLOW = re.compile(r"^  - \{id: ([^,]+),.*\}\n", re.M)


def _machines(text: str) -> list[re.Match[str]]:
    start = text.find("\nmachines:\n")
    found = [m for m in _MACHINE_BLOCK.finditer(text, start) if "host:" in m.group(0)]
    return found or [m for m in _MACHINE_FLOW.finditer(text, start)]


def _pick(text: str, draw: st.DataObject) -> re.Match[str] | None:
    found = _machines(text)
    return draw.draw(st.sampled_from(found)) if found else None


def flip_state(text: str, draw: st.DataObject) -> str:
    m = _pick(text, draw)
    if m is None:
        return text
    item = m.group(0)
    if "started" in item:
        item = item.replace("started", "stopped")
    else:
        item = item.replace("stopped", "started")
    return text[: m.start()] + item + text[m.end() :]


def bump_version(text: str, draw: st.DataObject) -> str:
    v = draw.draw(st.integers(0, 10**6))
    return re.sub(r"^version: .*$", f"version: {v}", text, count=1, flags=re.M)


def delete_machine(text: str, draw: st.DataObject) -> str:
    m = _pick(text, draw)
    return text if m is None else text[: m.start()] + text[m.end() :]


def add_machine(text: str, draw: st.DataObject) -> str:
    m = _pick(text, draw)
    if m is None:
        return text
    n = draw.draw(st.integers(1, 999))
    item = m.group(0).replace(m.group(1), f"new-{n}", 1)
    item = re.sub(r"address: [\d.]+", f"address: 10.99.{n // 250}.{n % 250 + 1}", item)
    at = draw.draw(st.sampled_from([m.start(), m.end()]))
    return text[:at] + item + text[at:]


def unknown_host(text: str, draw: st.DataObject) -> str:
    m = _pick(text, draw)
    if m is None:
        return text
    item = re.sub(r"host: [\w.-]+", "host: ghost", m.group(0))
    return text[: m.start()] + item + text[m.end() :]


def duplicate_machine(text: str, draw: st.DataObject) -> str:
    m = _pick(text, draw)
    return text if m is None else text[: m.end()] + m.group(0) + text[m.end() :]


def move_machine(text: str, draw: st.DataObject) -> str:
    found = _machines(text)
    if len(found) < 2:
        return text
    a, b = sorted(draw.draw(st.lists(st.sampled_from(found), min_size=2, max_size=2)),
                  key=lambda m: m.start())
    if a.start() == b.start():
        return text
    return text[: a.start()] + text[a.end() : b.end()] + a.group(0) + text[b.end() :]


def service_limit(text: str, draw: st.DataObject) -> str:
    v = draw.draw(st.integers(1, 300))
    return re.sub(r"soft_limit: \d+", f"soft_limit: {v}", text, count=1)


def add_comment(text: str, draw: st.DataObject) -> str:
    lines = text.splitlines(keepends=True)
    at = draw.draw(st.integers(0, len(lines)))
    note = draw.draw(st.sampled_from(["# note\n", "\n", "# & anchors would stop it\n"]))
    return "".join(lines[:at]) + note + "".join(lines[at:])


def rename_key(text: str, draw: st.DataObject) -> str:
    key = draw.draw(st.sampled_from(["hosts", "apps", "machines"]))
    return text.replace(f"\n{key}:\n", f"\n{key}x:\n", 1)


def anchor(text: str, draw: st.DataObject) -> str:
    m = _pick(text, draw)
    if m is None:
        return text
    item = m.group(0).replace("app: ", "app: &a ", 1)
    return text[: m.start()] + item + text[m.end() :]


def poke_byte(text: str, draw: st.DataObject) -> str:
    at = draw.draw(st.integers(0, max(0, len(text) - 1)))
    ch = draw.draw(st.sampled_from([" ", "-", "x", "\n", ":", "1", "{", "'"]))
    cut = draw.draw(st.integers(0, 2))
    return text[:at] + ch + text[at + cut :]


def restore(text: str, draw: st.DataObject) -> str:
    return draw.draw(st.sampled_from(sorted(BASES.values())))


EDITS = [flip_state, flip_state, flip_state, bump_version, delete_machine, add_machine,
         unknown_host, duplicate_machine, move_machine, service_limit, add_comment,
         rename_key, anchor, poke_byte, restore]


@pytest.mark.parametrize("base", sorted(BASES))
@settings(max_examples=int(os.environ.get('EDGE_EXAMPLES', '60')), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_edits_match_a_whole_parse(
    tmp_path: Path, base: str, data: st.DataObject
) -> None:
    path = tmp_path / "state.yaml"
    text = BASES[base]
    write(path, text)
    source = FileSource(path)
    try:
        good = source.current()
        good_text = text
        rejected = 0
        for _ in range(data.draw(st.integers(1, 8))):
            edit = data.draw(st.sampled_from(EDITS))
            new_text = edit(text, data)
            if new_text == text:
                continue
            text = new_text
            write(path, text)
            expected = full(text)
            source.poll()
            if expected is None:
                rejected += 1
                assert source.rejected == rejected, edit.__name__
            else:
                good, good_text = expected, text
            assert source.rejected == rejected, edit.__name__
            # the kept bytes are the good state's, and its index is a fresh one's
            assert bytes(source._buf) == good_text.encode()
            if source._index is not None:
                assert sections(source._index) == index_of(good_text.encode())
            assert source.current() == good, edit.__name__
            got = source.current()
            # the derived indexes agree too (layered mappings included)
            assert {a: set(ms) for a, ms in got.machines_by_app.items()} == {
                a: set(ms) for a, ms in good.machines_by_app.items()
            }
    finally:
        source.close()


# ------------------------------------------------------------- explicit cases


@pytest.fixture
def synth_file(tmp_path: Path) -> Path:
    path = tmp_path / "state.yaml"
    path.write_text(SYNTH_TEXT)
    return path


def _line_of(text: str, needle: str, after: str = "") -> int:
    return text[: text.index(needle, text.index(after) if after else 0)].count("\n") + 1


def test_one_machine_change_is_incremental(synth_file: Path) -> None:
    source = FileSource(synth_file)
    reads = source.full_reads
    text = SYNTH_TEXT.replace("version: 1\n", "version: 2\n")
    at = text.index("- id: app000003-m1\n")
    text = text[:at] + text[at:].replace("state: started", "state: stopped", 1)
    write(synth_file, text)
    state = source.poll()
    assert state is not None and source.full_reads == reads
    assert state.version == 2 and state.machines["app000003-m1"].state == "stopped"
    assert state.changed_apps == {"app000003"}
    assert state == parse_yaml(text.encode(), "x")


def test_service_change_falls_back_to_a_whole_parse(synth_file: Path) -> None:
    source = FileSource(synth_file)
    reads = source.full_reads
    text = SYNTH_TEXT.replace("soft_limit: 50", "soft_limit: 60", 1)
    write(synth_file, text)
    state = source.poll()
    assert state is not None and source.full_reads == reads + 1
    assert state.changed_apps is None and state == parse_yaml(text.encode(), "x")


@pytest.mark.parametrize("base", sorted(BASES))
def test_bad_machine_edit_is_refused_with_path_and_line(tmp_path: Path, base: str) -> None:
    path = tmp_path / "state.yaml"
    write(path, BASES[base])
    source = FileSource(path)
    good = source.current()
    reads = source.full_reads
    victim = sorted(good.machines)[3]
    text = BASES[base]
    at = text.index(f"id: {victim}")
    host = good.machines[victim].host
    text = text[:at] + text[at:].replace(f"host: {host}", "host: ghost", 1)
    write(path, text)
    assert source.poll() is None
    assert source.full_reads == reads  # refused on the incremental path
    assert source.rejected == 1 and source.current() is good
    with pytest.raises(StateError) as whole:
        parse_yaml(text.encode(), str(path))
    assert source.last_error == str(whole.value)  # same path, reason and line
    index = list(good.machines).index(victim)
    line = _line_of(text, "host: ghost")
    assert f"{path}:{line}: machines[{index}].host: unknown host ghost" in source.last_error

    # the same bytes again are not refused twice; the repair applies incrementally
    os.utime(path, ns=(1, 1))
    assert source.poll() is None and source.rejected == 1
    write(path, BASES[base].replace("version: 1\n", "version: 7\n"))
    state = source.poll()
    assert state is not None and state.version == 7 and source.full_reads == reads


def test_bad_version_and_bad_field_are_refused_with_lines(synth_file: Path) -> None:
    source = FileSource(synth_file)
    reads = source.full_reads
    at = SYNTH_TEXT.index("- id: app000005-m2\n")
    text = SYNTH_TEXT.replace("version: 1\n", "version: -3\n")
    text = text[:at] + text[at:].replace("state: started", "state: sleeping", 1)
    write(synth_file, text)
    assert source.poll() is None and source.full_reads == reads
    with pytest.raises(StateError) as whole:
        parse_yaml(text.encode(), str(synth_file))
    assert source.last_error is not None
    assert set(source.last_error.splitlines()) == set(str(whole.value).splitlines())
    line = _line_of(text, "state: sleeping")
    assert f":{line}: machines[17].state: 'sleeping' is not one of" in source.last_error
    assert f"{synth_file}:1: version: -3 is out of range" in source.last_error
    assert source.current().version == 1


def test_yaml_syntax_error_in_an_item_falls_back(synth_file: Path) -> None:
    source = FileSource(synth_file)
    reads = source.full_reads
    at = SYNTH_TEXT.index("- id: app000002-m0\n")
    text = SYNTH_TEXT[:at] + SYNTH_TEXT[at:].replace("app: app000002", "app: [app", 1)
    write(synth_file, text)
    assert source.poll() is None and source.full_reads == reads + 1
    assert source.rejected == 1 and "not valid YAML" in (source.last_error or "")


def test_in_place_partial_write_then_completion(synth_file: Path) -> None:
    source = FileSource(synth_file)
    at = SYNTH_TEXT.index("- id: app000007-m0\n")
    text = SYNTH_TEXT[:at] + SYNTH_TEXT[at:].replace("started", "stopped", 1)
    with synth_file.open("r+") as out:
        out.write(text[: at + 10])
        out.flush()
        source.poll()  # a prefix of the old bytes: equal so far, or refused
        out.write(text[at + 10 :])
    state = source.poll()
    assert state is not None and state.machines["app000007-m0"].state == "stopped"


def test_inotify_wakes_the_waiter(synth_file: Path) -> None:
    source = FileSource(synth_file)
    try:
        if source._inotify is None:
            pytest.skip("no inotify here")
        assert not source.wait(0.01)
        write(synth_file, SYNTH_TEXT.replace("version: 1\n", "version: 3\n"))
        assert source.wait(1.0)
        state = source.poll()
        assert state is not None and state.version == 3
    finally:
        source.close()


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 40), st.integers(0, 40)),
                max_size=30))
def test_starts_replace_matches_a_list(ops: list[tuple[int, int, int]]) -> None:
    values = list(range(0, 50_000, 10))
    starts = _Starts(values)
    for at, removed, added in ops:
        k0 = min(at, len(values))
        k1 = min(k0 + removed, len(values))
        low = values[k0 - 1] + 1 if k0 > 0 else 0
        new = [low + i for i in range(added)]
        old_span = (values[k1 - 1] + 1 if k1 > k0 else low) - low
        delta = added - old_span
        values[k0:] = new + [v + delta for v in values[k1:]]
        starts.replace(k0, k1, new, delta)
        assert starts.values() == values and len(starts) == len(values)
        for probe in (0, len(values) // 2, len(values) - 1):
            if values:
                assert starts[probe] == values[probe]
                assert starts.find(values[probe]) == probe
