"""Request and response bodies as pull streams, and the replay buffer.

A body is read chunk by chunk (``b""`` at the end); nothing reads ahead of its
consumer, so backpressure reaches the sender through sockets and HTTP/2 windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Request bodies up to this size are kept so the request can be retried or replayed.
REPLAY_LIMIT = 1024 * 1024


class BodyReader(Protocol):
    async def read(self) -> bytes:
        """The next chunk, or b"" once the body has ended."""
        ...


def read_ready(body: BodyReader) -> bytes | None:
    """The next chunk if ``body`` has it without waiting (b"" at its end), else None.

    Readers that can tell (a machine's response already in the buffer, HTTP/2 DATA
    already received) define ``read_ready()``; it lets a small response leave in one
    write with its head instead of a write per piece."""
    method = getattr(body, "read_ready", None)
    return method() if method is not None else None


def trailers_of(body: BodyReader) -> Sequence[tuple[bytes, bytes]]:
    """The trailer fields that came at the end of ``body`` (read to its end), as
    received: readers that can carry them (a machine's chunked response, an HTTP/2
    stream) define ``trailers()``; every other body has none."""
    method = getattr(body, "trailers", None)
    return method() if method is not None else ()


class EmptyBody:
    async def read(self) -> bytes:
        return b""


class BytesBody:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self) -> bytes:
        data, self._data = self._data, b""
        return data

    def read_ready(self) -> bytes | None:
        data, self._data = self._data, b""
        return data


class ReplayableBody:
    """Records the first ``limit`` bytes read from ``source`` so a new cursor can
    send them again; past the limit the body streams on but can no longer be replayed."""

    def __init__(self, source: BodyReader, limit: int = REPLAY_LIMIT) -> None:
        self._source = source
        self._limit = limit
        self._recorded: list[bytes] = []
        self._recorded_size = 0
        self._overflowed = False
        self._ended = False
        self._generation = 0

    @property
    def replayable(self) -> bool:
        return not self._overflowed

    @property
    def bytes_read(self) -> int:
        return self._recorded_size

    def trailers(self) -> Sequence[tuple[bytes, bytes]]:
        """The source's trailer fields, once it ended (kept for a replay too)."""
        return trailers_of(self._source) if self._ended else ()

    def cursor(self) -> BodyReader:
        """A reader from the start; invalidates earlier cursors."""
        if self._overflowed:
            raise RuntimeError("body larger than the replay buffer was partly sent")
        self._generation += 1
        return _Cursor(self, self._generation)

    async def _read_source(self) -> bytes:
        if self._ended:
            return b""
        chunk = await self._source.read()
        if not chunk:
            self._ended = True
            return b""
        if not self._overflowed:
            if self._recorded_size + len(chunk) <= self._limit:
                self._recorded.append(chunk)
                self._recorded_size += len(chunk)
            else:
                self._overflowed = True
                self._recorded.clear()
        return chunk


class _Cursor:
    def __init__(self, body: ReplayableBody, generation: int) -> None:
        self._body = body
        self._generation = generation
        self._index = 0

    async def read(self) -> bytes:
        body = self._body
        if self._generation != body._generation:
            raise RuntimeError("stale body cursor")
        if self._index < len(body._recorded):
            self._index += 1
            return body._recorded[self._index - 1]
        chunk = await body._read_source()
        if chunk and not body._overflowed:
            self._index = len(body._recorded)
        return chunk

    def trailers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._body.trailers()
