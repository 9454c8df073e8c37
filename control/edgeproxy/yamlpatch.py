"""Re-reading a YAML state file by the part that changed (``sources.FileSource``).

A full parse of a 200,000-app file (100 MB) takes about a minute, most of it PyYAML
building Python objects. A one-machine edit changes a few dozen bytes, so the file
source keeps the bytes it last applied and an index of where each top-level list
item starts (``YamlIndex``: from the cold load's line scan, ``load_fast`` below;
for a document the scan does not take, from the node marks of a whole parse). On
a write it compares the old and new bytes in large
chunks (memcmp) to find the changed stretches ("hunks"), widens each to whole list
items, re-parses only those items with the same loader, and hands the changed
entities to ``state.Incremental``.

The splice is correct by construction: outside the hunks the new bytes are verified
equal to the old, and each hunk is re-parsed as a complete block sequence of items at
the section's own indentation, which nothing around it can change the meaning of
(a following item or top-level key starts at a lower or equal indentation and closes
whatever the hunk opened; a hunk that does not parse alone is not trusted). Anything
outside that shape gives ``None`` and the caller parses the whole file: anchors,
aliases, tags or directives anywhere, non-ASCII text (marks count characters), flow
style sections, an edit touching a top-level key or the text before the first one,
a section emptied, an id made duplicate, too many hunks or items at once.
"""

from __future__ import annotations

import os
import re
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from edgeproxy.state import (
    ID_RE,
    ClusterState,
    Problem,
    RowStream,
    StateError,
    parse_state,
    strict_loader,
    yaml_lines,
)

#: top-level lists whose items are indexed, and the field that names an item
ITEM_SECTIONS: dict[str, str] = {
    "regions": "code",
    "hosts": "id",
    "apps": "name",
    "services": "id",
    "machines": "id",
}
#: top-level scalars whose own line may change alone
KEY_SECTIONS = ("version",)
MAX_HUNKS = 32
MAX_ITEMS = 2000  # items re-parsed per change; a bulk edit parses everything
MAX_SNIPPET = 4 << 20  # bytes re-parsed per change
_UNSAFE = (b"&", b"*", b"!")  # anchors, aliases, tags
_BLOCK = 2048  # offsets per block in ``_Starts``


class _Starts:
    """Sorted byte offsets (item starts), in blocks, so an edit that shifts every later
    offset touches one block and the bases of the others rather than 600,000 ints."""

    __slots__ = ("_bases", "_blocks", "_firsts", "_len")

    def __init__(self, values: Sequence[int]) -> None:
        self._set(list(values))

    def _set(self, values: list[int]) -> None:
        self._blocks: list[array[int]] = []
        self._bases: list[int] = []
        self._firsts: list[int] = []
        for i in range(0, len(values), _BLOCK):
            chunk = values[i : i + _BLOCK]
            base = chunk[0]
            self._bases.append(base)
            self._firsts.append(i)
            self._blocks.append(array("q", [v - base for v in chunk]))
        self._len = len(values)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < self._len:
            raise IndexError(k)
        b = bisect_right(self._firsts, k) - 1
        return self._bases[b] + self._blocks[b][k - self._firsts[b]]

    def find(self, pos: int) -> int:
        """Index of the last offset <= ``pos`` (-1 when none)."""
        b = bisect_right(self._bases, pos) - 1
        if b < 0:
            return -1
        return self._firsts[b] + bisect_right(self._blocks[b], pos - self._bases[b]) - 1

    def values(self) -> list[int]:
        return [base + r for base, block in zip(self._bases, self._blocks, strict=True)
                for r in block]

    def shift(self, delta: int) -> None:
        self._bases = [b + delta for b in self._bases]

    def replace(self, k0: int, k1: int, new: Sequence[int], delta: int) -> None:
        """Offsets [k0, k1) become ``new``; every offset after them moves by ``delta``."""
        if not self._blocks:
            self._set(list(new))
            return
        first = max(0, min(bisect_right(self._firsts, k0) - 1, len(self._blocks) - 1))
        if k0 == self._len and k0 > 0:
            first = len(self._blocks) - 1
        last = max(first, bisect_right(self._firsts, max(k0, k1 - 1)) - 1)
        start = self._firsts[first]
        flat = [
            self._bases[b] + r for b in range(first, last + 1) for r in self._blocks[b]
        ]
        lo, hi = k0 - start, k1 - start
        flat[lo:] = list(new) + [v + delta for v in flat[hi:]]
        grown = len(new) - (k1 - k0)
        blocks: list[array[int]] = []
        bases: list[int] = []
        firsts: list[int] = []
        at = start
        for i in range(0, len(flat), _BLOCK):
            chunk = flat[i : i + _BLOCK]
            bases.append(chunk[0])
            firsts.append(at)
            blocks.append(array("q", [v - chunk[0] for v in chunk]))
            at += len(chunk)
        self._blocks[first : last + 1] = blocks
        self._bases[first : last + 1] = bases
        self._firsts[first : last + 1] = firsts
        n = first + len(blocks)
        for b in range(n, len(self._blocks)):
            self._bases[b] += delta
            self._firsts[b] += grown
        self._len += grown


@dataclass
class _Section:
    name: str
    start: int  # offset of its key, at column 0
    prefix: bytes | None = None  # b"  - ": how each item line starts; None: not indexed
    items: _Starts | None = None


@dataclass
class Hunk:
    """Old bytes [a, b) (whole units) became new bytes [a2, b2)."""

    section: int
    kind: str
    a: int
    b: int
    a2: int
    b2: int
    k0: int = 0  # old items [k0, k1) of an item section
    k1: int = 0
    first: int = 0  # index of the first new item in the new file
    rows: list[object] = field(default_factory=list)  # the new items, parsed
    starts: list[int] = field(default_factory=list)  # their offsets in the new bytes
    old_rows: list[object] = field(default_factory=list)
    key_start: int = 0  # a key section: offset of its key in the new bytes
    value: object = None  # a key section: its new value
    snippet: bytes = b""


@dataclass
class Patch:
    """What changed between the indexed bytes and a new version of them."""

    hunks: list[Hunk]
    changes: dict[str, dict[str, object | None]]
    meta: dict[str, object]  # changed top-level scalars (``version``)
    where: dict[tuple[str, str], int]  # (kind, key) -> item index in the new file

    def fingerprint(self) -> tuple[object, ...]:
        """Equal for equal new bytes (given the same old ones)."""
        return tuple((h.a, h.b, h.a2, h.b2, h.snippet) for h in self.hunks)


class YamlIndex:
    """Where the top-level sections and list items of the applied bytes start."""

    def __init__(self, sections: list[_Section]) -> None:
        self.sections = sections

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, text: bytes, root: yaml.Node | None) -> YamlIndex | None:
        """The index of ``text`` from its composed root node, or None when the file
        has a shape the incremental path does not handle (every change parses all)."""
        if root is None or not text.isascii() or any(c in text for c in _UNSAFE):
            return None
        if not isinstance(root, yaml.MappingNode) or root.flow_style:
            return None
        sections: list[_Section] = []
        for key, value in root.value:
            if not isinstance(key, yaml.ScalarNode) or not isinstance(key.value, str):
                return None
            start = key.start_mark.index
            if key.start_mark.column != 0 or not text.startswith(key.value.encode(), start):
                return None
            if sections and start <= sections[-1].start:
                return None
            section = _Section(key.value, start)
            if key.value in ITEM_SECTIONS:
                _index_items(text, section, value)
            sections.append(section)
        if not sections:
            return None
        return cls(sections)

    # ------------------------------------------------------------------- diffing

    def diff(self, old: bytearray, new: FileView) -> list[Hunk] | None:
        """The hunks that turn ``old`` into the file; [] when equal; None when the
        change cannot be localised to whole items."""
        try:
            return self._diff(old, new)
        except ShortRead:
            return None

    def _diff(self, old: bytearray, new: FileView) -> list[Hunk] | None:
        old_len, new_len = len(old), new.size
        suffix = new.common_suffix(old, min(old_len, new_len))
        growth = new_len - old_len
        hunks: list[Hunk] = []
        o = n = 0
        while True:
            m = new.common_prefix(old, o, n, min(old_len - o, new_len - n))
            po = o + m
            if po == old_len and n + m == new_len:
                return hunks
            if len(hunks) >= MAX_HUNKS:
                return None
            unit = self._unit_at(po, old_len)
            if unit is None:
                return None
            s, k = unit
            section = self.sections[s]
            a = section.start if k < 0 else _item(section, k)
            if a < o:
                return None  # overlaps the previous hunk
            a2 = a + (n - o)
            k1 = k + 1
            b = self._end(s, k, old_len)
            last = False  # the rest is the common suffix: nothing more to compare
            while True:
                if b >= old_len - suffix and b + growth >= a2:
                    b2 = b + growth
                    if new.line_start(b2):
                        last = True
                        break
                if b >= old_len:
                    return None
                nxt = self._next_unit_end(b, old_len)
                want = bytes(old[b:nxt])
                limit = min(new_len, a2 + (b - a) + MAX_SNIPPET + len(want))
                b2 = new.find(want, a2, limit)
                if b2 >= 0 and new.line_start(b2):
                    break
                # the next unit changed too: take it into this hunk (same section only)
                if k < 0 or section.items is None or k1 >= len(section.items):
                    return None
                k1 += 1
                b = self._end(s, k1 - 1, old_len)
                if k1 - k > MAX_ITEMS or b - a > MAX_SNIPPET:
                    return None
            if b2 - a2 > MAX_SNIPPET:
                return None
            hunks.append(Hunk(s, section.name, a, b, a2, b2, k, k1 if k >= 0 else 0))
            if last:
                return hunks
            o, n = b, b2

    def _unit_at(self, pos: int, old_len: int) -> tuple[int, int] | None:
        """(section, item) of the unit holding ``pos``; item -1: a key section."""
        if pos >= old_len:
            pos = old_len - 1  # appended at the end: the last unit grows
        starts = [sec.start for sec in self.sections]
        s = bisect_right(starts, pos) - 1
        if s < 0:
            return None  # before the first key (comments): parse it all
        section = self.sections[s]
        if pos == section.start and s > 0:
            before = self.sections[s - 1]
            if before.items is not None:
                return s - 1, len(before.items) - 1  # appended to the section before
        if section.items is not None:
            k = section.items.find(pos)
            return (s, k) if k >= 0 else None  # -1: the section's key line changed
        if section.name in KEY_SECTIONS:
            return s, -1
        return None

    def _end(self, s: int, k: int, old_len: int) -> int:
        """Where unit (s, k) ends: the next item, the next section, or the end."""
        section = self.sections[s]
        if k >= 0 and section.items is not None and k + 1 < len(section.items):
            return section.items[k + 1]
        if s + 1 < len(self.sections):
            return self.sections[s + 1].start
        return old_len

    def _next_unit_end(self, b: int, old_len: int) -> int:
        """The end of the unit starting at ``b`` (a key line, or an item)."""
        starts = [sec.start for sec in self.sections]
        s = bisect_right(starts, b) - 1
        if s < 0:
            return old_len
        section = self.sections[s]
        if b == section.start:
            if section.items is not None:
                return section.items[0]  # the key line up to the first item
            return self._end(s, -1, old_len)
        if section.items is None:
            return old_len
        return self._end(s, section.items.find(b), old_len)

    # ------------------------------------------------------------------ re-parse

    def patch(
        self,
        hunks: list[Hunk],
        old: bytearray,
        new: FileView,
        keys: Mapping[str, Mapping[str, object]],
    ) -> Patch | None:
        """Parse each hunk's new items (and the old ones, for their ids).

        ``keys``: the current entities by kind, to refuse a new id that an untouched
        item already has (the whole parse names that duplicate)."""
        changes: dict[str, dict[str, object | None]] = {}
        meta: dict[str, object] = {}
        where: dict[tuple[str, str], int] = {}
        added: dict[str, set[str]] = {}
        removed: dict[str, set[str]] = {}
        count: dict[int, int] = {}  # items gained per section so far
        for h in hunks:
            section = self.sections[h.section]
            try:
                h.snippet = new.read(h.a2, h.b2)
            except ShortRead:
                return None
            if not _safe(h.snippet):
                return None
            if section.items is None:  # a key section (version)
                parsed = _parse_key(h.snippet, section.name)
                if parsed is None:
                    return None
                h.key_start = h.a2 + parsed[0]
                h.value = meta[section.name] = parsed[1]
                continue
            assert section.prefix is not None
            old_part = _parse_items(bytes(old[h.a : h.b]), section.prefix)
            got = _parse_items(h.snippet, section.prefix)
            if old_part is None or got is None or len(old_part[0]) != h.k1 - h.k0:
                return None
            h.old_rows, h.starts = old_part[0], [h.a2 + s for s in got[1]]
            h.rows = got[0]
            kind, id_field = section.name, ITEM_SECTIONS[section.name]
            gained = count.get(h.section, 0)
            h.first = h.k0 + gained
            rows = changes.setdefault(kind, {})
            for row in h.old_rows:
                key = row.get(id_field) if isinstance(row, dict) else None
                if not isinstance(key, str):
                    return None
                removed.setdefault(kind, set()).add(key)
                rows.setdefault(key, None)
            for i, row in enumerate(h.rows):
                index = h.first + i
                key = row.get(id_field) if isinstance(row, dict) else None
                if not isinstance(key, str) or not ID_RE.match(key):
                    key = f"\0{index}"  # no usable id: the readers say why
                seen = added.setdefault(kind, set())
                if key in seen:
                    return None  # a duplicate: the whole parse names both
                seen.add(key)
                rows[key] = row
                where[(kind, key)] = index
            count[h.section] = gained + len(h.rows) - (h.k1 - h.k0)
        for s, gained in count.items():
            items = self.sections[s].items
            if items is None or len(items) + gained <= 0:
                return None  # a section emptied: the whole parse says what that means
        for kind, ids in added.items():
            existing = keys.get(kind, {})
            gone = removed.get(kind, set())
            if any(key in existing and key not in gone for key in ids):
                return None
        return Patch(hunks, changes, meta, where)

    def commit(self, patch: Patch, old: bytearray) -> None:
        """Make ``old`` the new bytes (each hunk spliced in), and the index describe them."""
        for h in reversed(patch.hunks):  # right to left: earlier offsets stay put
            old[h.a : h.b] = h.snippet
        for h in patch.hunks:  # left to right: later offsets are still old + shift
            delta = (h.b2 - h.a2) - (h.b - h.a)
            section = self.sections[h.section]
            if section.items is None:
                section.start = h.key_start
            else:
                # h.first: where the hunk's items are now (earlier hunks moved them)
                section.items.replace(h.first, h.first + h.k1 - h.k0, h.starts, delta)
            for later in self.sections[h.section + 1 :]:
                later.start += delta
                if later.items is not None:
                    later.items.shift(delta)

    # ------------------------------------------------------------------- errors

    def locate(self, err: StateError, patch: Patch, new: FileView, source: str) -> StateError:
        """Give the problems of a refused patch the lines they have in the new file."""
        problems = []
        for p in err.problems:
            problems.append(Problem(p.path, p.reason, _line(p.path, patch, new)))
        return StateError(source, problems)


def _line(path: str, patch: Patch, new: FileView) -> int | None:
    for h in patch.hunks:
        if h.rows:
            for i in range(len(h.rows)):
                prefix = f"{h.kind}[{h.first + i}]"
                if path == prefix or path.startswith((prefix + ".", prefix + "[")):
                    return _snippet_line(h, f"[{i}]{path[len(prefix):]}", new)
        elif h.kind in KEY_SECTIONS and (path == h.kind or path.startswith(h.kind + ".")):
            return _snippet_line(h, path, new)
    return None


def _snippet_line(h: Hunk, path: str, new: FileView) -> int | None:
    lines = yaml_lines(h.snippet)
    while path not in lines and path:
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    line = lines.get(path)
    if line is None:
        return None
    try:
        return line + new.read(0, h.a2).count(b"\n")
    except ShortRead:
        return None


# --------------------------------------------------------------------- helpers


def _index_items(text: bytes, section: _Section, value: yaml.Node) -> None:
    """Record where each item of a block-sequence section starts, if every item
    starts its own line as ``<indent>- `` with the same indent."""
    if not isinstance(value, yaml.SequenceNode) or value.flow_style or not value.value:
        return
    starts: list[int] = []
    prefix: bytes | None = None
    for item in value.value:
        at = item.start_mark.index
        line = text.rfind(b"\n", 0, at) + 1
        head = text[line:at]
        if prefix is None:
            if not head.endswith(b"- ") or head[:-2].strip(b" ") or line <= section.start:
                return
            prefix = head
        elif head != prefix:
            return
        if starts and line <= starts[-1]:
            return
        starts.append(line)
    section.prefix = prefix
    section.items = _Starts(starts)


def _item(section: _Section, k: int) -> int:
    assert section.items is not None
    return section.items[k]


def _safe(snippet: bytes) -> bool:
    if not snippet.isascii() or any(c in snippet for c in _UNSAFE):
        return False
    for marker in (b"---", b"...", b"%"):
        if snippet.startswith(marker) or b"\n" + marker in snippet:
            return False
    return True


def _compose(snippet: bytes) -> tuple[yaml.Node | None, Any] | None:
    loader = strict_loader(snippet)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError:
        return None  # alone it does not parse: in context it might; parse it all
    finally:
        loader.dispose()
    return node, data


def _parse_items(snippet: bytes, prefix: bytes) -> tuple[list[object], list[int]] | None:
    """A hunk's items and their offsets in it, or None unless it is a clean block
    sequence of items each starting its own line with ``prefix``."""
    composed = _compose(snippet)
    if composed is None:
        return None
    node, data = composed
    if node is None:
        return [], []  # only comments and blank lines: items deleted
    if not isinstance(node, yaml.SequenceNode) or node.flow_style or not isinstance(data, list):
        return None
    starts: list[int] = []
    for item in node.value:
        at = item.start_mark.index
        line = snippet.rfind(b"\n", 0, at) + 1
        if snippet[line:at] != prefix:
            return None
        starts.append(line)
    if len(starts) != len(data):
        return None
    return data, starts


def _parse_key(snippet: bytes, name: str) -> tuple[int, object] | None:
    composed = _compose(snippet)
    if composed is None:
        return None
    node, data = composed
    if not isinstance(node, yaml.MappingNode) or node.flow_style or len(node.value) != 1:
        return None
    key = node.value[0][0]
    if not isinstance(data, dict) or list(data) != [name] or key.start_mark.column != 0:
        return None
    return key.start_mark.index, data[name]


class ShortRead(Exception):
    """The file shrank while it was being read: a writer is at work."""


class FileView:
    """The new version of the file, read through one open descriptor as needed.

    Long runs are compared a chunk at a time through a small buffer that stays in
    the CPU cache, rather than reading 100 MB into memory and comparing it after:
    half the memory traffic, and the source keeps one copy of the file, not two.
    """

    CHUNK = 256 << 10

    def __init__(self, fd: int, size: int, scratch: bytearray | None = None) -> None:
        self.fd = fd
        self.size = size
        self._scratch = scratch if scratch is not None else bytearray(self.CHUNK)

    def read(self, a: int, b: int) -> bytes:
        parts: list[bytes] = []
        at = a
        while at < b:
            got = os.pread(self.fd, b - at, at)
            if not got:
                raise ShortRead
            parts.append(got)
            at += len(got)
        return b"".join(parts)

    def read_all(self) -> bytearray:
        """The whole file, into one buffer (no list of parts joined after)."""
        buf = bytearray(self.size)
        with memoryview(buf) as view:
            self._chunk(view, 0, self.size)
        return buf

    def _chunk(self, view: memoryview, at: int, n: int) -> memoryview:
        done = 0
        while done < n:
            got = os.preadv(self.fd, [view[done:n]], at + done)
            if not got:
                raise ShortRead
            done += got
        return view[:n]

    def find(self, sub: bytes, start: int, end: int) -> int:
        near = min(end, start + 65536 + len(sub))
        at = self.read(start, near).find(sub)
        if at < 0 and near < end:
            at = self.read(start, end).find(sub)
        return at if at < 0 else start + at

    def line_start(self, at: int) -> bool:
        return at == 0 or at == self.size or self.read(at - 1, at) == b"\n"

    def common_prefix(self, a: bytearray, ao: int, bo: int, limit: int) -> int:
        """How many bytes ``a[ao:]`` and the file from ``bo`` share (at most limit)."""
        done = 0
        with memoryview(self._scratch) as scratch:
            while done < limit:
                size = min(self.CHUNK, limit - done)
                view = self._chunk(scratch, bo + done, size)
                if a.startswith(view, ao + done):
                    done += size
                    continue
                lo, hi = 0, size  # a prefix of lo bytes matches, of hi does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if a.startswith(view[lo:mid], ao + done + lo):
                        lo = mid
                    else:
                        hi = mid
                return done + lo
        return done

    def common_suffix(self, a: bytearray, limit: int) -> int:
        """How many bytes ``a`` and the file share at their ends (at most limit)."""
        done = 0
        a_len = len(a)
        with memoryview(self._scratch) as scratch:
            while done < limit:
                size = min(self.CHUNK, limit - done)
                view = self._chunk(scratch, self.size - done - size, size)
                if a.startswith(view, a_len - done - size):
                    done += size
                    continue
                lo, hi = 0, size  # a suffix of lo more bytes matches, of hi does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if a.startswith(view[size - mid : size - lo], a_len - done - mid):
                        lo = mid
                    else:
                        hi = mid
                return done + lo
        return done


def name_rows(patch: Patch) -> Callable[[str, str], str]:
    """``Incremental``'s row namer for a patch: ``machines[12]``, as the whole parse."""
    return lambda kind, key: f"{kind}[{patch.where.get((kind, key), 0)}]"


# ------------------------------------------------------------------ cold load
#
# The first parse of a big file: composing one node tree for 100 MB of YAML costs a
# minute and 6 GiB. Instead a line scan splits the document into its top-level
# sections and each item section into its list items (exactly the units
# ``YamlIndex`` records), and the items are parsed a batch at a time as validation
# asks for them, so the plain data of 600,000 machines is never all in memory.
#
# The scan is trusted only where it cannot disagree with a parser: anything it does
# not recognise returns None and the caller parses the whole document as before.
# A batch is read by ``_BlockParser``, which accepts a small, unambiguous part of
# YAML (block mappings and sequences, one-line plain or quoted scalars, one-line
# flow collections; scalars resolved by the loader's own resolver) and gives up on
# anything else (comments after a value, multi-line or escaped scalars, block
# scalars, ...); then libyaml parses that batch alone, and its items must start on
# the lines the scan found. A batch libyaml cannot parse alone, or whose items start
# elsewhere, means the scan was fooled (a quoted scalar spanning lines, say): the
# whole document is parsed. The boundaries are safe for the reason given at the top
# of this module: a split at a column-0 key or at an item line of the section's own
# indentation leaves any construct spanning it unterminated in the part before, and
# libyaml refuses an unterminated construct.

FAST_BATCH = 1000  # items per batch
_TOP_NAMES = (*ITEM_SECTIONS, "version", "latency_ms")


class _Unsupported(Exception):
    """The batch has YAML the block parser does not read: libyaml reads it."""


class _Fallback(Exception):
    """The scan cannot be trusted for this document: parse the whole of it."""


@dataclass
class _Part:
    name: str
    start: int  # the key line
    end: int  # the next key line, or the end
    prefix: bytes | None = None  # an item section: b"  - "
    starts: list[int] = field(default_factory=list)  # item line offsets


_TOP_LINE = re.compile(rb"\n(?:[^ \n#-]|-(?! ))")  # column 0: not blank, comment, item
_KEY_OPEN = re.compile(rb"([A-Za-z_][A-Za-z0-9_]*):(?:[ ]+#[^\n]*| *)\n")
_KEY_ANY = re.compile(rb"([A-Za-z_][A-Za-z0-9_]*):(?: |\n)")
_QUIET = re.compile(rb"(?:[ ]*(?:#[^\n]*)?\n)*\Z")  # blank and comment lines only
_FIRST_ITEM = re.compile(rb"^( *)- ", re.M)


def scan(text: bytes | bytearray) -> list[_Part] | None:
    """The top-level sections of ``text`` and the items of its block-sequence
    sections, or None when the document is not of the shape the scan trusts."""
    if not text.endswith(b"\n"):
        return None  # (rare: ``_parse_all`` of a file without a final newline)
    if not text.isascii() or any(c in text for c in (*_UNSAFE, b"\r", b"\t", b"%")):
        return None
    for marker in (b"---", b"..."):
        if text.startswith(marker) or b"\n" + marker in text:
            return None
    parts: list[_Part] = []
    tops = [m.start() + 1 for m in _TOP_LINE.finditer(text)]
    if text[:1] not in (b" ", b"\n", b"#") and not text.startswith(b"- "):
        tops.insert(0, 0)
    for at in tops:
        key = _KEY_ANY.match(text, at)
        if key is None:
            return None
        name = key.group(1).decode()
        if name not in _TOP_NAMES or any(p.name == name for p in parts):
            return None
        if parts:
            parts[-1].end = at
        elif not _QUIET.match(text[:at]):
            return None  # indented content before the first key
        parts.append(_Part(name, at, len(text)))
    if not parts:
        return None
    for part in parts:
        opens = part.name in ITEM_SECTIONS and _KEY_OPEN.match(text, part.start)
        if opens and not _scan_items(text, part):
            return None
    return parts


def _scan_items(text: bytes | bytearray, part: _Part) -> bool:
    """Find the items of a section whose key line opens a block; False: give up.
    A section whose value is not a block sequence keeps ``prefix`` None."""
    body = text.index(b"\n", part.start) + 1
    first = _FIRST_ITEM.search(text, body, part.end)
    if first is None or not _QUIET.match(text[body : first.start()]):
        return True  # no items, or a mapping first: parsed whole (libyaml)
    indent = len(first.group(1))
    prefix = b" " * indent + b"- "
    base = first.start() - 1  # the line break before the first item
    # every line at or left of the items' indentation is an item, blank or a comment
    stray = rb"\n {0,%d}(?:[^ \n#-]|-(?! ))" % indent
    if re.compile(stray).search(text, base, part.end):
        return False
    if indent and re.compile(rb"\n {0,%d}- " % (indent - 1)).search(text, base, part.end):
        return False
    items = re.compile(b"\n" + re.escape(prefix))
    starts = [m.start() + 1 for m in items.finditer(text, base, part.end)]
    part.prefix = prefix
    part.starts = starts
    return True


_PLAIN_CHARS = r"A-Za-z0-9_.~/+"
_PLAIN = re.compile(rf"(?:[{_PLAIN_CHARS}]|-[0-9.])[{_PLAIN_CHARS}-]*\Z")
_DQ = re.compile(r'"[ !#-\[\]-~]*"\Z')  # no escapes, no line breaks
_SQ = re.compile(r"'[ -&(-~]*'\Z")  # no '' escapes
_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_FLOW_TOKEN = re.compile(
    rf" *(?:([\[\]{{}},])|(: )|(\"[ !#-\[\]-~]*\"|'[ -&(-~]*')"
    rf"|((?:[{_PLAIN_CHARS}]|-[0-9.])[{_PLAIN_CHARS}-]*)) *"
)
_STR_TAG = "tag:yaml.org,2002:str"
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")
)
_MAX_CACHED = 4096
_MAX_SEEN = 1 << 16
_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


class _Scalars:
    """Plain scalars resolved and constructed as the strict loader does, by asking
    its own resolver and constructors (cached: most values repeat)."""

    def __init__(self) -> None:
        self._loader = strict_loader("")
        self._first = frozenset(k for k in self._loader.yaml_implicit_resolvers if k)
        self._cache: dict[str, object] = {}
        self.keys: dict[str, object] = {}  # mapping keys seen: text -> resolved key
        self.seen: dict[str, object] = {}  # recent values: text -> immutable value

    def key(self, text: str) -> object:
        """A block mapping key as written (``name``, before the colon)."""
        if not _KEY_NAME.match(text):
            raise _Unsupported(text)
        key = self.plain(text)
        if len(self.keys) < _MAX_CACHED:
            self.keys[text] = key
        return key

    def plain(self, value: str) -> object:
        if value[0] not in self._first:
            return value  # no implicit resolver starts with that character: a string
        found = self._cache.get(value, self)
        if found is not self:
            return found
        tag = self._loader.resolve(yaml.ScalarNode, value, (True, False))
        if tag not in _SCALAR_TAGS:
            raise _Unsupported(value)
        if tag == _STR_TAG:
            result: object = value
        else:
            node = yaml.ScalarNode(tag, value)
            result = self._loader.yaml_constructors[tag](self._loader, node)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[value] = result
        return result

    def value(self, text: str) -> object:
        """A one-line scalar or flow collection, as written after ``key: ``."""
        first = text[:1]
        if first == "[" or first == "{":
            if text == "[]":
                return []
            return {} if text == "{}" else self.flow(text)
        if _PLAIN.match(text):
            return self.plain(text)
        if (first == '"' and _DQ.match(text)) or (first == "'" and _SQ.match(text)):
            return text[1:-1]
        raise _Unsupported(text)

    def flow(self, text: str) -> object:
        tokens: list[tuple[int, str]] = []
        at = 0
        while at < len(text):
            m = _FLOW_TOKEN.match(text, at)
            if m is None or m.end() == at:
                raise _Unsupported(text)
            kind = m.lastindex or 0
            tokens.append((kind, m.group(kind)))
            at = m.end()
        value, end = self._flow_node(tokens, 0)
        if end != len(tokens):
            raise _Unsupported(text)
        return value

    def _flow_scalar(self, token: tuple[int, str]) -> object:
        kind, text = token
        if kind == 4:
            return self.plain(text)
        if kind == 3:
            return text[1:-1]
        raise _Unsupported(text)

    def _flow_node(self, tokens: list[tuple[int, str]], i: int) -> tuple[object, int]:
        if i >= len(tokens):
            raise _Unsupported("flow")
        kind, text = tokens[i]
        if kind != 1:
            return self._flow_scalar(tokens[i]), i + 1
        if text == "[":
            items: list[object] = []
            i += 1
            while tokens[i:i + 1] != [(1, "]")]:
                if items:
                    if tokens[i:i + 1] != [(1, ",")]:
                        raise _Unsupported("flow")
                    i += 1
                value, i = self._flow_node(tokens, i)
                items.append(value)
            return items, i + 1
        if text == "{":
            mapping: dict[object, object] = {}
            i += 1
            while tokens[i:i + 1] != [(1, "}")]:
                if mapping:
                    if tokens[i:i + 1] != [(1, ",")]:
                        raise _Unsupported("flow")
                    i += 1
                if i + 2 >= len(tokens) or tokens[i + 1] != (2, ": "):
                    raise _Unsupported("flow")
                key = self._flow_scalar(tokens[i])
                if key in mapping or not isinstance(key, str):
                    raise _Unsupported("flow")
                mapping[key], i = self._flow_node(tokens, i + 2)
            return mapping, i + 1
        raise _Unsupported("flow")


class _BlockParser:
    """A block sequence of items (one batch), or ``_Unsupported``.

    Blank and comment lines are dropped first: with every scalar on one line (multi-
    line scalars are refused) a line starting with ``#`` is always a comment."""

    def __init__(self, text: str, scalars: _Scalars) -> None:
        self.scalars = scalars
        self.keys = scalars.keys
        lines = text.split("\n")
        con = [line.lstrip(" ") for line in lines]
        self.ind = [len(a) - len(b) for a, b in zip(lines, con, strict=True)]
        self.con = con
        if "" in con or any(c[:1] == "#" for c in con):  # blank or comment lines
            keep = [i for i, c in enumerate(con) if c and c[0] != "#"]
            self.ind = [self.ind[i] for i in keep]
            self.con = [con[i] for i in keep]
        self.i = 0
        self.n = len(self.con)

    def items(self, indent: int) -> list[object]:
        if self.n and self.ind[0] != indent:
            raise _Unsupported("first line")
        out = self.seq(indent)
        if self.i != self.n:
            raise _Unsupported("trailing lines")
        return out

    def seq(self, n: int) -> list[object]:
        out: list[object] = []
        ind, con = self.ind, self.con
        while self.i < self.n:
            at = ind[self.i]
            if at < n:
                break
            if at > n:
                raise _Unsupported("indentation")
            c = con[self.i]
            if c[:2] != "- ":
                if c[:1] == "-":
                    raise _Unsupported(c)
                break  # a key at the same indentation: the end of an indentless list
            rest = c[2:]
            colon = rest.find(":")
            if colon > 0 and rest[colon + 1 : colon + 2] in (" ", "") and rest[0] not in "\"'[{-":
                ind[self.i] = n + 2
                con[self.i] = rest
                out.append(self.mapping(n + 2))
            elif rest[:1] == "-" and rest[:2] in ("- ", "-"):
                raise _Unsupported(c)
            else:
                out.append(self.scalars.value(rest))
                self.i += 1
        return out

    def mapping(self, n: int) -> dict[object, object]:
        out: dict[object, object] = {}
        ind, con, keys, scalars = self.ind, self.con, self.keys, self.scalars
        seen = scalars.seen
        i, end = self.i, self.n
        while i < end:
            at = ind[i]
            if at < n:
                break
            if at > n:
                raise _Unsupported("indentation")
            c = con[i]
            colon = c.find(": ")
            name = c[:colon] if colon > 0 else c[:-1] if c[-1] == ":" else None
            if name is None:
                raise _Unsupported(c)
            key = keys.get(name, keys)
            if key is keys:
                key = scalars.key(name)
            if key in out:
                raise _Unsupported("duplicate key")
            i += 1
            if colon > 0:
                text = c[colon + 2 :]
                value = seen.get(text, seen)
                if value is seen:
                    value = scalars.value(text)
                    if type(value) in _IMMUTABLE:
                        if len(seen) >= _MAX_SEEN:
                            seen.clear()
                        seen[text] = value
                out[key] = value
                continue
            self.i = i
            if i < end and ind[i] > n:
                nested = ind[i]
                out[key] = self.seq(nested) if con[i][:2] == "- " else self.mapping(nested)
            elif i < end and ind[i] == n and con[i][:2] == "- ":
                out[key] = self.seq(n)
            else:
                out[key] = None
            i = self.i
        self.i = i
        return out


def _batch(
    text: bytes | bytearray, part: _Part, k0: int, k1: int, scalars: _Scalars
) -> list[object]:
    """Items [k0, k1) of an item section, parsed; ``_Fallback`` when the scan was
    fooled (libyaml disagrees on where the items start, or cannot parse them alone)."""
    assert part.prefix is not None
    a = part.starts[k0]
    b = part.starts[k1] if k1 < len(part.starts) else part.end
    snippet = bytes(text[a:b])
    try:
        items = _BlockParser(snippet.decode("ascii"), scalars).items(len(part.prefix) - 2)
        if len(items) == k1 - k0:
            return items
    except _Unsupported:
        pass
    parsed = _parse_items(snippet, part.prefix)
    if parsed is None or parsed[1] != [s - a for s in part.starts[k0:k1]]:
        raise _Fallback(part.name)
    return parsed[0]


def _rows(text: bytes | bytearray, part: _Part, scalars: _Scalars) -> Iterator[object]:
    for k0 in range(0, len(part.starts), FAST_BATCH):
        yield from _batch(text, part, k0, min(k0 + FAST_BATCH, len(part.starts)), scalars)


class _ScanLines(Mapping[str, int]):
    """Line numbers for problem paths, as ``state.yaml_lines`` of the whole text
    would give them, worked out for the few paths asked about: the item's (or the
    section's) own text composed alone, and its first line added."""

    def __init__(self, text: bytes | bytearray, parts: list[_Part]) -> None:
        self._text = text
        self._parts = {p.name: p for p in parts}
        self._first = parts[0].start

    def _line_at(self, offset: int) -> int:
        return self._text.count(b"\n", 0, offset) + 1

    def get(self, path: str, default: Any = None) -> Any:
        if path == "":
            return self._line_at(self._first)
        cut = min((i for i in (path.find("."), path.find("[")) if i >= 0), default=len(path))
        part = self._parts.get(path[:cut])
        if part is None:
            return default
        if path == part.name:
            return self._line_at(part.start)
        if part.prefix is not None and path[cut] == "[":
            close = path.find("]", cut)
            try:
                k = int(path[cut + 1 : close])
            except ValueError:
                return default
            if not 0 <= k < len(part.starts):
                return default
            a = part.starts[k]
            b = part.starts[k + 1] if k + 1 < len(part.starts) else part.end
            lines = yaml_lines(bytes(self._text[a:b]))
            got = lines.get("[0]" + path[close + 1 :])
            return default if got is None else got + self._line_at(a) - 1
        lines = yaml_lines(bytes(self._text[part.start : part.end]))
        got = lines.get(path)
        return default if got is None else got + self._line_at(part.start) - 1

    def __getitem__(self, path: str) -> int:
        line = self.get(path)
        if line is None:
            raise KeyError(path)
        return int(line)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.get(path) is not None

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError("line numbers are looked up, not listed")

    def __len__(self) -> int:
        raise NotImplementedError("line numbers are looked up, not listed")


def load_fast(text: bytes | bytearray, source: str) -> tuple[ClusterState, YamlIndex] | None:
    """Parse and validate ``text`` by the scan (see above) with the index of its
    items; None when the document needs the whole parse (``state.parse_yaml``).
    Validation problems raise ``StateError`` with line numbers, as the whole parse's."""
    parts = scan(text)
    if parts is None:
        return None
    scalars = _Scalars()
    data: dict[str, object] = {}
    for part in parts:
        if part.prefix is not None:
            data[part.name] = RowStream(_rows(text, part, scalars))
            continue
        parsed = _parse_key(bytes(text[part.start : part.end]), part.name)
        if parsed is None:
            return None
        data[part.name] = parsed[1]
    try:
        state = parse_state(data, source, _ScanLines(text, parts), copy_ids=True)
    except _Fallback:
        return None
    sections = [
        _Section(p.name, p.start, p.prefix, _Starts(p.starts) if p.prefix is not None else None)
        for p in parts
    ]
    return state, YamlIndex(sections)
