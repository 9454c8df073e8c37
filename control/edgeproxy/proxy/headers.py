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
        elif name != b"expect":  # the edge answers 100-continue itself
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


def client_response_headers(headers: Sequence[tuple[bytes, bytes]], request_id: bytes) -> Headers:
    """The header list a client receives: no hop-by-hop, no proxy directives, our id."""
    kept = []
    for field in strip_hop_by_hop(headers):
        if field[0] not in _PROXY_DIRECTIVES:
            kept.append(field)
    kept.append((REQUEST_ID, request_id))
    return kept


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]
