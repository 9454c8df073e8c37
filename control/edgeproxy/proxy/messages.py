"""The HTTP/1 messages, events and errors that both parsers produce.

``framing`` (client requests) and ``responses`` (machine responses), and their
compiled core ``_http1``, all hand out these objects, so every consumer checks one
set of types whichever implementation parsed the bytes (h11's ``_events`` split).
"""

from __future__ import annotations

from dataclasses import dataclass


class HttpError(Exception):
    """A request we refuse; ``status`` is what the client gets before we close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class ResponseError(Exception):
    """The machine's bytes are not a valid HTTP/1.1 response."""


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    http_version: bytes  # b"1.1" or b"1.0"
    headers: list[tuple[bytes, bytes]]  # names lower-cased, order kept
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    expect_continue: bool = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased, order kept
    http_version: bytes


@dataclass(frozen=True, slots=True)
class Data:
    """A piece of a body, in either direction."""

    data: bytes


class EndOfMessage:
    """The body (and its trailers, if any) ended."""


class NeedData:
    """More bytes are needed before the next event."""


END = EndOfMessage()
NEED_DATA = NeedData()
