"""What the client-side protocol code needs from a connection: a byte reader and a
writer with flow control. asyncio's StreamReader/StreamWriter satisfy these, and so
does the fast lane's connection (proxy/fastlane.py), which lends itself to the
general path for the requests it does not serve itself."""

from __future__ import annotations

from typing import Any, Protocol


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
