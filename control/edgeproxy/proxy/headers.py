"""Header rules for requests leaving the edge and responses returning to clients.

Pure functions over lists of (lower-case name, value) byte pairs, so the rules can
be tested without sockets and applied the same way to HTTP/1.1 and HTTP/2 clients.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]

REQUEST_ID = b"edgeproxy-request-id"
CLIENT_IP = b"edgeproxy-client-ip"
EDGE_REGION = b"edgeproxy-edge-region"
REPLAY = b"edgeproxy-replay"
REPLAY_SOURCE = b"edgeproxy-replay-source"
PREFER_REGION = b"edgeproxy-prefer-region"
PREFER_MACHINE = b"edgeproxy-prefer-machine"
FORCE_REGION = b"edgeproxy-force-region"
FORCE_MACHINE = b"edgeproxy-force-machine"
# Internal backhaul headers: set only by an edge, read and removed by a worker.
TARGET = b"edgeproxy-target"
APP = b"edgeproxy-app"
UPSTREAM_ERROR = b"edgeproxy-upstream-error"

# Every header in our namespace belongs to the proxy; a client may not forge one.
OWN_PREFIX = b"edgeproxy-"

# RFC 9110 7.6.1 hop-by-hop fields, plus the legacy ones proxies still see.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)

VIA_NAME = b"edgeproxy"
# Fields a machine may send us that never reach the client.
_PROXY_DIRECTIVES = frozenset({REPLAY, REQUEST_ID, UPSTREAM_ERROR, TARGET, APP})


# Seeded once from the OS; a syscall per request (os.urandom) showed in profiles.
# Request ids must be unique, not secret.
_ids = random.Random(os.urandom(32))


def new_request_id() -> bytes:
    """128 random bits in hex: unique enough to find one request in every log."""
    return b"%032x" % _ids.getrandbits(128)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What the edge knows about the client connection a request came on."""

    ip: str
    scheme: str  # "http" | "https"
    local_port: int
    protocol: bytes  # as in Via: b"1.1", b"1.0", b"2"


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip(b" \t").lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop fields and every field the Connection header names."""
    # Plain loops, not comprehensions: on CPython 3.11 each comprehension run builds
    # a function object, which costs more than these short loops (hot path).
    kept = []
    for field in headers:
        if field[0] not in HOP_BY_HOP:
            kept.append(field)
    if len(kept) != len(headers):  # a Connection header is hop-by-hop itself
        named = _connection_tokens(headers)
        if named:
            kept = [(n, v) for n, v in kept if n not in named]
    return kept


def forward_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    client: ClientInfo,
    edge_region: str,
    request_id: bytes,
) -> Headers:
    """The header list a machine receives for a client request at the edge."""
    kept: Headers = []
    prior_xff: list[bytes] = []
    prior_via: list[bytes] = []
    for name, value in strip_hop_by_hop(headers):
        if name.startswith(OWN_PREFIX) or name in (b"x-forwarded-proto", b"x-forwarded-port"):
            continue
        if name == b"x-forwarded-for":
            prior_xff.append(value)
        elif name == b"via":
            prior_via.append(value)
        elif name != b"expect" and name != b"content-length":
            # The edge answers 100-continue itself, and frames the body it forwards
            # itself (serialize_head, the backhaul): the client's length would be a
            # second Content-Length, which strict machines refuse.
            kept.append((name, value))
    ip = client.ip.encode()
    kept.append((b"x-forwarded-for", b", ".join([*prior_xff, ip])))
    kept.append((b"x-forwarded-proto", client.scheme.encode()))
    kept.append((b"x-forwarded-port", str(client.local_port).encode()))
    kept.append((b"via", b", ".join([*prior_via, client.protocol + b" " + VIA_NAME])))
    kept.append((CLIENT_IP, ip))
    kept.append((EDGE_REGION, edge_region.encode()))
    kept.append((REQUEST_ID, request_id))
    return kept


def strip_internal(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """What a worker delivers to a machine: the edge's headers minus backhaul-only ones."""
    return [(n, v) for n, v in headers if n not in (TARGET, APP)]


def _client_fields(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """A machine's fields a client may see: no hop-by-hop, no proxy directives."""
    kept = []
    for field in strip_hop_by_hop(headers):
        if field[0] not in _PROXY_DIRECTIVES:
            kept.append(field)
    return kept


def client_response_headers(headers: Sequence[tuple[bytes, bytes]], request_id: bytes) -> Headers:
    """The header list a client receives: no hop-by-hop, no proxy directives, our id.
    The same for a final response and for an interim (1xx) one."""
    kept = _client_fields(headers)
    kept.append((REQUEST_ID, request_id))
    return kept


def forwardable_trailers(trailers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The trailer fields passed on (to a client, or from a worker to the edge): the
    same stripping as a response head, and none of the fields RFC 9110 6.5.1 says a
    trailer must not carry (framing, routing, content handling, authentication)."""
    kept = []
    for field in _client_fields(trailers):
        if field[0] not in _NOT_IN_TRAILERS and field[0][:1] != b":":
            kept.append(field)
    return kept


def forwardable_request_trailers(trailers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """A client's trailer fields as a machine gets them: the response rules, and no
    field in our namespace (a client may not forge one in trailers either)."""
    kept = []
    for field in forwardable_trailers(trailers):
        if not field[0].startswith(OWN_PREFIX):
            kept.append(field)
    return kept


def last_chunk(fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The end of a chunked HTTP/1.1 body carrying ``fields`` (already filtered) as
    its trailer section."""
    if not fields:
        return b"0\r\n\r\n"
    lines = [name + b": " + value + b"\r\n" for name, value in fields]
    return b"".join([b"0\r\n", *lines, b"\r\n"])


_NOT_IN_TRAILERS = frozenset(
    {
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"host",
        b"authorization",
        b"www-authenticate",
        b"set-cookie",
        b"cache-control",
        b"expect",
        b"max-forwards",
        REQUEST_ID,  # ours goes in the head; a machine's copy in trailers is dropped
    }
)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]
