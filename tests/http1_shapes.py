"""The pure-Python twins of the compiled HTTP/1 core (``edgeproxy.proxy._http1``)
and a catalogue of request and response heads, shared by the differential tests
(``test_http1_core.py``), the fuzzer (``fuzz/fuzz_http1.py``, whose seed corpus is
written from ``SEED_HEADS``) and the memory test (``test_http1_memory.py``).

Each twin is the specification of its compiled function; ``outcome`` turns a call
into a value that compares equal exactly when two calls behaved the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgeproxy.proxy import _http1, framing, frontend_h1, machines, responses
from edgeproxy.proxy import headers as h
from edgeproxy.proxy.messages import HttpError, RequestHead, ResponseError, ResponseHead

UnsendableRequest = _http1.UnsendableRequest

# What forward_head adds for one client connection (the fast lane's ``forwarding``).
FORWARDING = (b"203.0.113.9", b"http", b"8080", b"1.1", b"iad")


def forward_twin(
    head: RequestHead,
    ip: bytes,
    scheme: bytes,
    port: bytes,
    protocol: bytes,
    region: bytes,
    request_id: bytes,
) -> bytes:
    """``_http1.forward_head`` as the Python path computes it. ``ip``, ``scheme`` and
    ``region`` are text on the Python path (``ClientInfo``): callers pass UTF-8, and
    ``port`` is a canonical decimal (``str(local_port).encode()``)."""
    host = head.header(b"host")
    others = [f for f in head.headers if f[0] != b"host"]
    client = h.ClientInfo(ip.decode(), scheme.decode(), int(port), protocol)
    fields = h.forward_request_headers(others, client, region.decode(), request_id)
    if host is not None:
        fields.insert(0, (b"host", host))
    return machines.serialize_head(machines.MachineRequest(head.method, head.target, fields, None))


def client_twin(
    response: ResponseHead,
    request: RequestHead,
    request_id: bytes,
    close: bool = False,
    check_replay: bool = True,
) -> tuple[bytes, bool, bool] | None:
    """``_http1.client_head`` as the Python path computes it."""
    if check_replay and h.header_value(response.headers, h.REPLAY) is not None:
        return None
    fields = h.client_response_headers(response.headers, request_id)
    fr = frontend_h1.response_framing(request, response.status, fields, close)
    return frontend_h1.head_bytes(response.status, response.reason, fr.headers), fr.chunked, fr.keep


def outcome(fn: Callable[..., Any], *args: Any, messages: bool = True) -> tuple[Any, ...]:
    """What a call did: ("ok", result) or ("error", class, details). HttpError
    carries status and reason; ResponseError and UnsendableRequest their message
    (unless ``messages`` is false: then the class alone). Any other exception
    propagates (a crash)."""
    try:
        return ("ok", fn(*args))
    except HttpError as exc:
        return ("error", "HttpError", exc.status, exc.reason)
    except (ResponseError, UnsendableRequest) as exc:
        return ("error", type(exc).__name__, str(exc) if messages else None)


def parse_pair(block: bytes) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return outcome(_http1.parse_head, block), outcome(framing.reference_parse_head, block)


def response_pair(block: bytes) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (
        outcome(_http1.response_head, block),
        outcome(responses.reference_response_head, block),
    )


def forward_pair(head: RequestHead, *args: bytes) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (
        outcome(_http1.forward_head, head, *args, messages=False),
        outcome(forward_twin, head, *args, messages=False),
    )


def client_pair(
    response: ResponseHead, request: RequestHead, rid: bytes, close: bool, check: bool
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (
        outcome(_http1.client_head, response, request, rid, close, check),
        outcome(client_twin, response, request, rid, close, check),
    )


def _head(*lines: bytes) -> bytes:
    return b"\r\n".join(lines)


def _post(*fields: bytes) -> bytes:
    return _head(b"POST / HTTP/1.1", b"Host: a", *fields)


# Request heads (without the final CRLFCRLF): the usual shapes, then the hostile ones.
SEED_HEADS: dict[str, bytes] = {
    "get": _head(
        b"GET / HTTP/1.1", b"Host: example.com", b"User-Agent: curl/8.0", b"Accept: */*"
    ),
    "post_cl": _head(b"POST /submit HTTP/1.1", b"Host: a", b"Content-Length: 5"),
    "post_chunked": _head(b"POST /up HTTP/1.1", b"Host: a", b"Transfer-Encoding: chunked"),
    "http10": _head(b"GET /x HTTP/1.0"),
    "http10_keepalive": _head(b"GET /x HTTP/1.0", b"Connection: keep-alive"),
    "absolute": _head(b"GET http://example.com/p?q=1 HTTP/1.1", b"Host: example.com"),
    "absolute_https": _head(b"GET https://example.com/ HTTP/1.1", b"Host: example.com"),
    "options_star": _head(b"OPTIONS * HTTP/1.1", b"Host: a"),
    "get_star": _head(b"GET * HTTP/1.1", b"Host: a"),
    "connect": _head(b"CONNECT example.com:443 HTTP/1.1", b"Host: example.com:443"),
    "expect": _head(
        b"PUT /f HTTP/1.1", b"Host: a", b"Expect: 100-Continue", b"Content-Length: 3"
    ),
    "xff_via": _head(
        b"GET / HTTP/1.1",
        b"Host: a",
        b"X-Forwarded-For: 10.0.0.1, 10.0.0.2",
        b"Via: 1.1 cdn",
        b"x-forwarded-for: 10.0.0.3",
        b"via: 1.0 old",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Port: 443",
    ),
    "connection_names": _head(
        b"GET / HTTP/1.1",
        b"Host: a",
        b"Connection: keep-alive, X-Secret, , Cookie",
        b"X-Secret: 1",
        b"Cookie: c=1",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        b"Upgrade: h2c",
    ),
    "own_namespace": _head(
        b"GET / HTTP/1.1",
        b"Host: a",
        b"edgeproxy-client-ip: 6.6.6.6",
        b"EdgeProxy-Force-Machine: m1",
        b"edgeproxy-request-id: forged",
    ),
    "cl_te": _post(b"Content-Length: 4", b"Transfer-Encoding: chunked"),
    "te_cl": _post(b"Transfer-Encoding: chunked", b"Content-Length: 4"),
    "dup_cl_same": _post(b"Content-Length: 4", b"Content-Length: 4"),
    "dup_cl_conflict": _post(b"Content-Length: 4", b"Content-Length: 5"),
    "cl_list": _head(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 4, 4"),
    "cl_sign": _head(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: +4"),
    "cl_hex": _head(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 0x4"),
    "cl_huge": _head(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 1234567890123456789"),
    "cl_space_inside": _head(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 1 2"),
    "te_chunked_identity": _head(
        b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: chunked, identity"
    ),
    "te_identity_chunked": _head(
        b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: identity, chunked"
    ),
    "te_two_fields": _head(
        b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"
    ),
    "te_empty_item": _head(b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: chunked,"),
    "te_case": _head(b"POST / HTTP/1.1", b"Host: a", b"transfer-ENCODING: CHUNKED"),
    "te_xchunked": _head(b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: xchunked"),
    "te_tab": _head(b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding:\tchunked\t"),
    "te_http10": _head(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked"),
    "space_before_colon": _head(b"POST / HTTP/1.1", b"Host: a", b"Content-Length : 4"),
    "obs_fold": _head(b"GET / HTTP/1.1", b"Host: a", b"X-A: b", b" folded"),
    "obs_fold_tab": _head(b"GET / HTTP/1.1", b"Host: a", b"X-A: b", b"\tfolded"),
    "bare_lf": b"GET / HTTP/1.1\nHost: a",
    "bare_cr": b"GET / HTTP/1.1\rHost: a",
    "cr_in_value": _head(b"GET / HTTP/1.1", b"Host: a", b"X-A: b\rc"),
    "nul_in_value": _head(b"GET / HTTP/1.1", b"Host: a", b"X-A: b\x00c"),
    "del_in_value": _head(b"GET / HTTP/1.1", b"Host: a", b"X-A: b\x7fc"),
    "obs_text": _head(b"GET /\xe9t\xe9 HTTP/1.1", b"Host: a", b"X-A: caf\xe9 \xff"),
    "empty_name": _head(b"GET / HTTP/1.1", b"Host: a", b": empty"),
    "no_colon": _head(b"GET / HTTP/1.1", b"Host: a", b"NoColon"),
    "no_host": _head(b"GET / HTTP/1.1", b"Accept: */*"),
    "two_hosts": _head(b"GET / HTTP/1.1", b"Host: a", b"Host: b"),
    "http09_version": b"GET /",
    "version_2": _head(b"GET / HTTP/2.0", b"Host: a"),
    "version_19": _head(b"GET / HTTP/1.9", b"Host: a"),
    "version_lower": _head(b"GET / http/1.1", b"Host: a"),
    "double_space": _head(b"GET  / HTTP/1.1", b"Host: a"),
    "tab_in_line": _head(b"GET\t/ HTTP/1.1", b"Host: a"),
    "relative_target": _head(b"GET index.html HTTP/1.1", b"Host: a"),
    "close": _head(b"GET / HTTP/1.1", b"Host: a", b"Connection: Keep-Alive, CLOSE"),
    "long_line": b"GET /" + b"a" * (8 * 1024 - 14) + b" HTTP/1.1\r\nHost: a",
    "too_long_line": b"GET /" + b"a" * (8 * 1024 - 13) + b" HTTP/1.1\r\nHost: a",
    "100_fields": _head(b"GET / HTTP/1.1", b"Host: a", *[b"X-%d: v" % i for i in range(99)]),
    "101_fields": _head(b"GET / HTTP/1.1", b"Host: a", *[b"X-%d: v" % i for i in range(100)]),
    "big_forward": _head(
        b"GET / HTTP/1.1", b"Host: a", *[b"X-Big-%d: " % i + b"v" * 100 for i in range(60)]
    ),
}

# Response heads (without the final CRLFCRLF).
SEED_RESPONSES: dict[str, bytes] = {
    "ok": _head(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Content-Type: text/plain"),
    "no_reason": _head(b"HTTP/1.1 204", b"Date: x"),
    "empty_reason": b"HTTP/1.1 299 ",
    "http10": _head(b"HTTP/1.0 200 OK", b"Connection: keep-alive"),
    "chunked": _head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Connection: X-Drop"),
    "directives": _head(
        b"HTTP/1.1 200 OK",
        b"edgeproxy-request-id: m",
        b"edgeproxy-upstream-error: e",
        b"edgeproxy-target: t",
        b"edgeproxy-app: a",
        b"edgeproxy-other: kept",
        b"X-Drop: 1",
        b"Connection: x-drop",
    ),
    "replay": _head(b"HTTP/1.1 503 Busy", b"edgeproxy-replay: region=fra"),
    "interim": _head(b"HTTP/1.1 103 Early Hints", b"Link: </s.css>; rel=preload"),
    "bad_status": b"HTTP/1.1 2000 OK",
    "bad_version": b"HTTP/2 200 OK",
    "nul": _head(b"HTTP/1.1 200 OK", b"X: a\x00b"),
    "nul_last": _head(b"HTTP/1.1 200 OK", b"X: a\x00"),
    "bare_lf": b"HTTP/1.1 200 OK\nX: y",
    "fold": _head(b"HTTP/1.1 200 OK", b"X: y", b" folded"),
    "ctl_value": _head(b"HTTP/1.1 200 OK", b"X: \x01\x7f\xff", b"Y:\t \t"),
}
