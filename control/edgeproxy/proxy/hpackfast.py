"""A stateless HPACK encoder for our HTTP/2 connections.

The ``hpack`` library's encoder searches its dynamic table linearly for every
field and huffman-codes every literal, in Python: it was the largest single cost
of a backhauled request. Our header blocks are nearly identical from request to
request, so this encoder uses no dynamic table at all (it announces a table size
of 0 in its first block, RFC 7541 4.2/6.3) and emits static-table indexes or
literals *without indexing*, never huffman-coded. An encoded field then depends
only on its name and value, so the bytes are cached per field. Blocks are a
little larger on the wire; encoding is a dict lookup per field. Any HPACK
decoder reads them (it is plain RFC 7541).

``FastDecoder`` is the other half: a block made only of static-table indexes and
literals without indexing, none huffman-coded (what ``StatelessEncoder`` writes),
is decoded in one tight loop without touching the dynamic table; any other block
(huffman, indexing, table size updates, errors) goes to ``hpack.Decoder``
unchanged, whose state the fast path never touches.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import Decoder
from hpack.table import HeaderTable

_STATIC: dict[bytes, tuple[int, dict[bytes, int]]] = HeaderTable.STATIC_TABLE_MAPPING
_STATIC_ENTRIES: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_STATIC_COUNT = len(_STATIC_ENTRIES)
# Per connection, so small: h2c clients each have a session. Fields whose values
# are unique per message are never cached (they would only churn it).
_CACHE_LIMIT = 256
_UNCACHED_NAMES = frozenset({b"edgeproxy-request-id", b"content-length", b"date"})
_NEVER_INDEXED_NAMES = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"}
)


def encode_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 5.1; ``flags`` are the bits above the prefix in the first byte."""
    max_prefix = (1 << prefix_bits) - 1
    if value < max_prefix:
        return bytes((flags | value,))
    out = bytearray((flags | max_prefix,))
    value -= max_prefix
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_string(data: bytes) -> bytes:
    """RFC 7541 5.2, raw (H = 0)."""
    return encode_integer(len(data), 7, 0) + data


def encode_field(name: bytes, value: bytes) -> bytes:
    # Literal "without indexing" (0000xxxx) or, for credentials, "never indexed"
    # (0001xxxx), so intermediaries keep them out of their tables too.
    flags = 0x10 if name in _NEVER_INDEXED_NAMES else 0x00
    entry = _STATIC.get(name)
    if entry is not None:
        index = entry[1].get(value)
        if index is not None and not flags:
            return encode_integer(index, 7, 0x80)  # fully indexed, static table
        return encode_integer(entry[0], 4, flags) + encode_string(value)
    return bytes((flags,)) + encode_string(name) + encode_string(value)


class StatelessEncoder:
    """Drop-in for ``hpack.Encoder`` inside an ``h2`` connection (``conn.encoder``)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._first = True
        self.header_table_size = 4096  # set by h2 from the peer's SETTINGS; unused

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        parts: list[bytes] = []
        if self._first:
            parts.append(b"\x20")  # dynamic table size update: 0, once
            self._first = False
        cache = self._cache
        for header in headers:
            name, value = header[0], header[1]
            key = (name, value)
            encoded = cache.get(key)
            if encoded is None:
                encoded = encode_field(name, value)
                if name not in _UNCACHED_NAMES:
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()  # other unique values must not grow it forever
                    cache[key] = encoded
            parts.append(encoded)
        return b"".join(parts)


class _NotFast(Exception):
    """The block needs the full decoder."""


def _integer(data: bytes, pos: int, mask: int) -> tuple[int, int]:
    value = data[pos] & mask
    pos += 1
    if value == mask:
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 28:
                raise _NotFast
    return value, pos


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if data[pos] & 0x80:
        raise _NotFast  # huffman-coded
    length, pos = _integer(data, pos, 0x7F)
    end = pos + length
    if end > len(data):
        raise _NotFast
    return data[pos:end], end


class FastDecoder(Decoder):
    """``hpack.Decoder`` with a fast path for stateless blocks (see module doc)."""

    def decode(self, data: bytes, raw: bool = False) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        if raw:
            try:
                return self._decode_stateless(bytes(data))
            except (_NotFast, IndexError):
                pass
        return super().decode(data, raw)  # type: ignore[return-value]

    def _decode_stateless(self, data: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        pos, end = 0, len(data)
        size, limit = 0, self.max_header_list_size
        while pos < end:
            first = data[pos]
            if first & 0x80:  # indexed
                index, pos = _integer(data, pos, 0x7F)
                if not 0 < index <= _STATIC_COUNT:
                    raise _NotFast
                name, value = _STATIC_ENTRIES[index - 1]
            elif first < 0x20:  # literal without indexing / never indexed
                index, pos = _integer(data, pos, 0x0F)
                if index:
                    if index > _STATIC_COUNT:
                        raise _NotFast
                    name = _STATIC_ENTRIES[index - 1][0]
                else:
                    name, pos = _string(data, pos)
                value, pos = _string(data, pos)
            else:  # incremental indexing or a table size update: stateful
                raise _NotFast
            size += len(name) + len(value) + 32
            if size > limit:
                raise _NotFast  # the full decoder raises the proper error
            headers.append((name, value))
        return headers
