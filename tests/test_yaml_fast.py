"""The file source's cold load (``yamlpatch.load_fast``: a line scan, then items parsed
in batches) gives what the whole parse (``state.parse_yaml``) gives, or steps aside.

For any document: either ``load_fast`` returns None (the caller parses the whole
document), or it gives the same state and the same item index as the whole parse,
or it refuses with the same problems on the same lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy import yamlpatch
from edgeproxy.sources import FileSource
from edgeproxy.state import StateError, parse_state, parse_yaml, to_dict
from edgeproxy.yamlpatch import YamlIndex, load_fast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from edgebench import synth

LAB_TEXT = (Path(__file__).resolve().parents[1] / "tools" / "edgelab" / "state.yaml").read_text()
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_DATA = to_dict(parse_state(synth.build(6), "synthetic"))
SYNTH_TEXT = synth.yaml_text(_DATA)  # sequences at column 0, addresses quoted
DUMP_TEXT = yaml.dump(_DATA, Dumper=_DUMPER, sort_keys=False)
INDENTED_TEXT = "\n".join(  # item sections' sequences indented under their keys
    line if not line or line[0].isalpha() else "  " + line for line in SYNTH_TEXT.split("\n")
)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(yamlpatch, "FAST_BATCH", 3)  # many batch edges in small files
    yield


def sections(index: YamlIndex) -> list[tuple[object, ...]]:
    return [(s.name, s.start, s.prefix, s.items.values() if s.items else None)
            for s in index.sections]


def compare(text: str | bytes) -> str:
    """Check ``load_fast`` against the whole parse; says which way it went."""
    raw = text.encode() if isinstance(text, str) else text
    try:
        fast = load_fast(bytearray(raw), "f.yaml")
    except StateError as err:
        with pytest.raises(StateError) as full_err:
            parse_yaml(raw, "f.yaml")
        assert str(err) == str(full_err.value)
        return "refused"
    if fast is None:
        return "fallback"
    roots: list[yaml.Node] = []
    state = parse_yaml(raw, "f.yaml", on_root=roots.append)
    assert fast[0] == state
    built = YamlIndex.build(raw, roots[0])
    assert built is not None
    assert sections(fast[1]) == sections(built)
    return "fast"


@pytest.mark.parametrize("name", ["synth", "dump", "indented", "lab"])
def test_generated_and_hand_written_files_take_the_fast_path(name: str) -> None:
    text = {"synth": SYNTH_TEXT, "dump": DUMP_TEXT, "indented": INDENTED_TEXT,
            "lab": LAB_TEXT}[name]
    assert compare(text) == "fast"


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


MACHINE = "- id: app000001-m0\n  app: app000001\n"

# (edit of SYNTH_TEXT, what load_fast must do)
CASES: dict[str, tuple[str, str]] = {
    "comments and blank lines": (
        _edit(_edit(SYNTH_TEXT, MACHINE, "# a note\n\n" + MACHINE + "  # inside\n\n"),
              "machines:\n", "# machines follow\nmachines:   # all of them\n\n"), "fast"),
    "whitespace-only lines": (_edit(SYNTH_TEXT, MACHINE, MACHINE + "   \n"), "fast"),
    "a header comment": ("# state\n\n" + SYNTH_TEXT, "fast"),
    "trailing comment on a value": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("app000001\n", "app000001  # x\n")), "fast"),
    "quoted string holding '- '": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("app: app000001", 'app: "a - b"')),
        "refused"),
    "quoted string spanning an item line": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("app: app000001", 'app: "app\n- id: x"')),
        "fallback"),
    "single-quoted string spanning an item line": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("app: app000001", "app: 'app\n- id: x'")),
        "fallback"),
    "flow list spanning lines": (
        _edit(SYNTH_TEXT, "handlers: []", "handlers: [a,\n    b]"), "refused"),
    "block scalar holding item-like lines": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("app: app000001", "note: |\n    - id: y\n  "
                                                   "app: app000001")), "refused"),
    "multi-line plain scalar": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("app: app000001", "app: app\n    000001")),
        "refused"),
    "CRLF line ends": (SYNTH_TEXT.replace("\n", "\r\n"), "fallback"),
    "a tab": (_edit(SYNTH_TEXT, "state: started", "state:\tstarted"), "fallback"),
    "anchor and alias": (
        _edit(_edit(SYNTH_TEXT, "app: app000001\n", "app: &a app000001\n"),
              "app: app000001\n", "app: *a\n"), "fallback"),
    "a tag": (_edit(SYNTH_TEXT, "state: started", "state: !!str started"), "fallback"),
    "two documents": (SYNTH_TEXT + "---\nversion: 2\n", "fallback"),
    "explicit document start": ("---\n" + SYNTH_TEXT, "fallback"),
    "a directive": ("%YAML 1.1\n---\n" + SYNTH_TEXT, "fallback"),
    "flow-style top level": ('{"version": 1}\n', "fallback"),
    "top-level list": ("- a\n- b\n", "fallback"),
    "an unknown top-level key": (SYNTH_TEXT + "extra: 1\n", "fallback"),
    "a duplicate top-level key": (SYNTH_TEXT + "version: 2\n", "fallback"),
    "indented first key": ("  " + SYNTH_TEXT.replace("\n", "\n  "), "fallback"),
    "non-ASCII": (_edit(SYNTH_TEXT, "state: started", 'state: "st\u00e4rted"'), "fallback"),
    "no final newline": (SYNTH_TEXT.rstrip("\n"), "fallback"),
    "item at a stray indentation": (_edit(SYNTH_TEXT, MACHINE, " " + MACHINE), "fallback"),
    "dash without a space": (_edit(SYNTH_TEXT, MACHINE, "-\n  id: x\n  app: app000001\n"),
                             "fallback"),
    "comment on the item line": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("- id:", "- # c\n  id:")), "fallback"),
    "a syntax error in an item": (_edit(SYNTH_TEXT, MACHINE, MACHINE + "  : x\n"), "fallback"),
    "duplicate key in an item": (_edit(SYNTH_TEXT, MACHINE, MACHINE + "  app: app000002\n"),
                                 "fallback"),
    "keys that resolve to other types": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE + "  on: 1\n  null: 2\n  n: 3\n"), "refused"),
    "scalars of every implicit type": (
        _edit(SYNTH_TEXT, "  state: started\n",
              "  state: started\n  x: [0x1F, 0o17, 017, 1_000, 1:30, -1.5e+3, .inf, -.Inf, .nan,"
              " ~, null, Null, yes, No, on, OFF, y, n, 2001-12-14, 2001-12-14t21:59:43.10-05:00,"
              " '1', \"2\", a.b/c-d, +1, -0, 0.]\n"), "refused"),
    "flow mapping in an item": (
        _edit(SYNTH_TEXT, MACHINE, "- {id: app000001-m0, app: app000001, x: {a: [1, 2]}}\n"
                                   "  # the rest\n- id: zz\n  app: app000001\n"), "refused"),
    "empty values and nested lists": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE + "  a:\n  b:\n  - - 1\n  c:\n    - x\n    -\n"),
        "refused"),
    "version changed": (_edit(SYNTH_TEXT, "version: 1", "version: 7"), "fast"),
    "bad version": (_edit(SYNTH_TEXT, "version: 1", "version: -1"), "refused"),
    "bad machine host (line number)": (
        _edit(SYNTH_TEXT, MACHINE, MACHINE.replace("app: app000001", "app: nope")), "refused"),
    "missing section": (SYNTH_TEXT[: SYNTH_TEXT.index("machines:")], "refused"),
    "empty section": (SYNTH_TEXT[: SYNTH_TEXT.index("machines:")] + "machines: []\n",
                      "fast"),
    "latency table": (
        _edit(SYNTH_TEXT, "regions:", "latency_ms:\n  r00:\n    r01: 7\nregions:"), "fast"),
    "bad latency (line number)": (
        _edit(SYNTH_TEXT, "regions:", "latency_ms:\n  r00:\n    r01: -7\nregions:"), "refused"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_documents(case: str) -> None:
    text, expected = CASES[case]
    assert compare(text) == expected


def test_error_lines_are_those_of_the_whole_parse() -> None:
    text, _ = CASES["bad machine host (line number)"]
    with pytest.raises(StateError) as err:
        load_fast(bytearray(text.encode()), "f.yaml")
    line = text[: text.index("app: nope")].count("\n") + 1
    assert any(p.line == line and p.path.endswith(".app") for p in err.value.problems), err.value


# Lines that can be dropped into a document anywhere: each is either read the same
# by both, or makes the fast path step aside or refuse the same way.
NASTY = [
    "", "   ", "# c", "  # c", "- x", "  - x", "- id: q\n  app: app000001", "  foo: bar",
    '  app: "a\n- b"', "  note: |\n    - id: z", "  note: >\n  - z", "x: 1", "- [a, b]",
    "- {a: 1}", "  - {id: x}", "...", "---", "  k: 'it''s'", '  k: "a\\"b"', "  k: a #c",
    "  k: [a,\n  b]", "-", "- - a", "  - ", "  k:  v", "machines:", "  ? k\n  : v",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([SYNTH_TEXT, DUMP_TEXT, INDENTED_TEXT, LAB_TEXT]),
    inserts=st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(NASTY)),
                     max_size=3),
)
def test_inserted_lines_never_make_the_fast_path_disagree(
    base: str, inserts: list[tuple[int, str]]
) -> None:
    lines = base.split("\n")
    for at, line in inserts:
        lines.insert(at % len(lines), line)
    compare("\n".join(lines))


def test_file_source_loads_by_the_fast_path_and_stays_incremental(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(SYNTH_TEXT)
    source = FileSource(path)
    assert source.current() == parse_yaml(SYNTH_TEXT, "x")
    assert source._index is not None
    new = SYNTH_TEXT.replace("state: started", "state: stopped", 1)
    path.write_text(new)
    state = source.poll()
    assert state is not None and state.changed_apps is not None  # the incremental path
    assert state == parse_yaml(new, "x")
    assert source.full_reads == 1
    source.close()


_PLAINISH = st.from_regex(r"[A-Za-z0-9_.~/+:-]{1,8}", fullmatch=True)  # resolver food
_SCALARS = st.one_of(
    _PLAINISH, _PLAINISH, _PLAINISH,
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=False, width=32), st.text(max_size=12),
    st.sampled_from(["yes", "No", "on", "~", "null", "1:30", "0x1F", "017", "1_000", ".inf",
                     "2001-12-14", "a - b", "- a", "a: b", "a #b", "#", "[a]", "'q'", '"q"',
                     "-", "-1", "- ", "", " x", "x ", "a\nb", "é", "\\", "=", "<<", "!x"]),
)
_KEYS = st.sampled_from(["id", "app", "on", "y", "null", "a-b", "k_1", "x"])
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(_KEYS, inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=4), min_size=1,
                   max_size=4),
    flow=st.sampled_from([False, None]),
    indent=st.sampled_from([2, 4]),
)
def test_the_block_parser_reads_what_libyaml_reads(
    items: list[dict[str, object]], flow: bool | None, indent: int
) -> None:
    """Whatever the block parser accepts, it reads as libyaml does."""
    text = yaml.dump(items, Dumper=_DUMPER, default_flow_style=flow, indent=indent,
                     allow_unicode=True)
    expected = yaml.load(text, Loader=yaml.SafeLoader)
    try:
        got = yamlpatch._BlockParser(text, yamlpatch._Scalars()).items(0)
    except yamlpatch._Unsupported:
        return
    assert typed(got) == typed(expected)


def typed(value: object) -> object:
    """``value`` with each scalar's type beside it (1, 1.0 and True compare equal)."""
    if isinstance(value, dict):
        return {typed(k): typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    if isinstance(value, float) and value != value:
        return (float, "nan")
    return (type(value), value)


@settings(max_examples=1000, deadline=None)
@given(text=st.one_of(st.from_regex(r"[ -~]{1,12}", fullmatch=True), _PLAINISH))
def test_one_line_values_read_as_libyaml_reads_them(text: str) -> None:
    try:
        got = yamlpatch._Scalars().value(text)
    except yamlpatch._Unsupported:
        return
    assert typed(got) == typed(yaml.load(f"k: {text}\n", Loader=yaml.SafeLoader)["k"])
