"""Re-reading a YAML state file by the part that changed (``sources.FileSource``).

A full parse of a 200,000-app file (100 MB) takes about a minute, most of it PyYAML
building Python objects. A one-machine edit changes a few dozen bytes, so the file
source keeps the bytes it last applied and an index of where each top-level list
item starts (``YamlIndex``, from the node marks of the last full parse, so it is
exactly what the parser saw). On a write it compares the old and new bytes in large
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
from array import array
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from edgeproxy.state import ID_RE, Problem, StateError, strict_loader, yaml_lines

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
