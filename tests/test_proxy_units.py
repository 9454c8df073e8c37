"""Sans-IO proxy cores: framing/smuggling, header rules, routing, replay, admission."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeproxy.placement import choose
from edgeproxy.proxy import _nghttp2 as ng
from edgeproxy.proxy import headers as h
from edgeproxy.proxy.admission import Admission, QueueFull
from edgeproxy.proxy.bodies import BytesBody, ReplayableBody
from edgeproxy.proxy.framing import (
    NEED_DATA,
    Data,
    EndOfMessage,
    HttpError,
    RequestHead,
    RequestParser,
)
from edgeproxy.proxy.routes import build_routes, normalize_host
from edgeproxy.proxy.targeting import (
    ReplayDirective,
    Restriction,
    RoutingHints,
    candidate_tables,
    parse_replay,
    parse_routing_hints,
)
from edgeproxy.routing import Backend, ServiceTable


def parse_all(data: bytes) -> list[object]:
    parser = RequestParser()
    parser.feed(data)
    events: list[object] = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, EndOfMessage):
            parser.next_request()


def status_of(data: bytes) -> int:
    try:
        parse_all(data)
    except HttpError as exc:
        return exc.status
    return 0


SMUGGLING = {
    "cl_and_te": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate_cl": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "conflicting_cl": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        400,
    ),
    "cl_list": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nabcd", 400),
    "cl_signed": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd", 400),
    "bad_chunk_size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        400,
    ),
    "chunk_size_overflow": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        400,
    ),
    "chunk_size_space": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 2\r\nab\r\n0\r\n\r\n",
        400,
    ),
    "chunk_missing_crlf": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    "bare_lf": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "bare_lf_in_header": (b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
    "bare_cr": (b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    "space_before_colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "bad_header_name": (b"GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n", 400),
    "ctl_in_value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "te_not_chunked": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    "te_chunked_twice": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        501,
    ),
    "te_http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "no_host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two_hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "huge_headers": (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: " + b"a" * 40000 + b"\r\n\r\n", 431),
    "many_headers": (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: a\r\n" * 200 + b"\r\n", 431),
    "huge_request_line": (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "bad_version": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "junk_request_line": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_malformed_requests_are_refused(name: str) -> None:
    data, status = SMUGGLING[name]
    assert status_of(data) == status


def test_incomplete_oversized_head_is_refused_before_it_ends() -> None:
    # No terminating CRLFCRLF: must still be refused once over the bound.
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 40000) == 431


def test_chunked_body_and_pipelined_requests() -> None:
    data = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer-X: y\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    events = parse_all(data)
    assert isinstance(events[0], RequestHead) and events[0].chunked
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"abcde"
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [x.target for x in heads] == [b"/a", b"/b"]


def test_content_length_body_and_keep_alive() -> None:
    events = parse_all(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nxyz"
    )
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.content_length == 3 and not head.keep_alive
    assert events[1] == Data(b"xyz") and isinstance(events[2], EndOfMessage)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=17))
def test_chunked_body_survives_any_split(body: bytes, piece: int) -> None:
    """Any body, chunked and fed in arbitrary pieces, comes out whole."""
    wire = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"".join(
        b"%x\r\n%b\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    wire += b"0\r\n\r\n"
    parser = RequestParser()
    out = b""
    ended = False
    for i in range(0, len(wire), piece):
        parser.feed(wire[i : i + piece])
        while (event := parser.next_event()) is not NEED_DATA:
            if isinstance(event, Data):
                out += event.data
            elif isinstance(event, EndOfMessage):
                ended = True
    assert ended and out == body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_crashes(junk: bytes) -> None:
    """Arbitrary bytes give events or HttpError, never another exception."""
    with contextlib.suppress(HttpError):
        parse_all(b"GET / HTTP/1.1\r\nHost: a\r\n" + junk)


CLIENT = h.ClientInfo(ip="192.0.2.7", scheme="http", local_port=80, protocol=b"1.1")


def test_forward_headers_add_and_strip() -> None:
    sent = [
        (b"connection", b"keep-alive, x-secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"5"),
        (b"te", b"trailers"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-proto", b"https"),
        (b"edgeproxy-client-ip", b"6.6.6.6"),
        (b"edgeproxy-target", b"10.0.0.9:80"),
        (b"edgeproxy-force-region", b"syd"),
        (b"via", b"1.0 other"),
        (b"accept", b"*/*"),
    ]
    out = h.forward_request_headers(sent, CLIENT, "ord", b"rid")
    names = [n for n, _ in out]
    for gone in (
        b"connection",
        b"x-secret",
        b"keep-alive",
        b"te",
        b"edgeproxy-target",
        b"edgeproxy-force-region",
    ):
        assert gone not in names
    d = dict(out)
    assert d[b"x-forwarded-for"] == b"10.0.0.1, 192.0.2.7"
    assert d[b"x-forwarded-proto"] == b"http" and d[b"x-forwarded-port"] == b"80"
    assert d[b"via"] == b"1.0 other, 1.1 edgeproxy"
    assert d[b"edgeproxy-client-ip"] == b"192.0.2.7" and names.count(b"edgeproxy-client-ip") == 1
    assert d[b"edgeproxy-edge-region"] == b"ord" and d[b"edgeproxy-request-id"] == b"rid"
    assert d[b"accept"] == b"*/*"


def test_client_response_headers_carry_request_id_and_drop_directives() -> None:
    out = h.client_response_headers(
        [(b"edgeproxy-replay", b"region=syd"), (b"transfer-encoding", b"chunked"), (b"x", b"1")],
        b"id1",
    )
    assert out == [(b"x", b"1"), (h.REQUEST_ID, b"id1")]


def B(mid: str, region: str) -> Backend:
    n = abs(hash(mid)) % 200 + 1
    return Backend(mid, "web", region, IPv4Address(f"10.0.0.{n}"), 80, IPv4Address("10.1.0.1"))


TABLE = ServiceTable(
    "web-http",
    "web",
    (IPv4Address("198.19.0.80"),),
    (80,),
    ("http",),
    "requests",
    1,
    2,
    ((B("ord-1", "ord"), B("ord-2", "ord")), (B("ams-1", "ams"),), (B("syd-1", "syd"),)),
)


def test_routing_hints_and_candidates() -> None:
    hints = parse_routing_hints([(h.PREFER_REGION, b"syd")])
    tables = candidate_tables(TABLE, hints)
    assert [b.machine_id for t in tables[0].tiers for b in t] == ["syd-1"]
    assert len(tables) == 2 and tables[1] == TABLE
    forced = candidate_tables(TABLE, parse_routing_hints([(h.FORCE_MACHINE, b"ams-1")]))
    assert len(forced) == 1 and [b.machine_id for t in forced[0].tiers for b in t] == ["ams-1"]
    none = candidate_tables(TABLE, parse_routing_hints([(h.FORCE_REGION, b"fra")]))
    assert not none[0].tiers
    excluded = candidate_tables(TABLE, RoutingHints(), frozenset({"ord-1", "ord-2"}))
    assert excluded[0].tiers[0][0].machine_id == "ams-1"
    with pytest.raises(HttpError):
        parse_routing_hints([(h.FORCE_REGION, b"bad region!")])
    with pytest.raises(HttpError):
        parse_routing_hints([(h.FORCE_REGION, b"syd"), (h.FORCE_REGION, b"ams")])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"region=syd", ReplayDirective(region="syd")),
        (b" machine=web-syd-1 ", ReplayDirective(machine="web-syd-1")),
        (b"elsewhere", ReplayDirective(elsewhere=True)),
        (b"Elsewhere", ReplayDirective(elsewhere=True)),
        (b"region=", None),
        (b"planet=mars", None),
        (b"syd", None),
        (b"region=SYD!", None),
    ],
)
def test_replay_header_parsing(value: bytes, expected: ReplayDirective | None) -> None:
    assert parse_replay(value) == expected


def test_replay_directive_routes() -> None:
    hints, exclude = ReplayDirective(region="syd").hints("ord-1")
    assert hints.force == Restriction(region="syd") and exclude == {"ord-1"}
    hints, exclude = ReplayDirective(elsewhere=True).hints("ord-1")
    assert hints.force is None and exclude == {"ord-1"}


def test_routes_by_host_and_address() -> None:
    routes = build_routes([TABLE], {"Web.Lab": "web"})
    assert routes.resolve(b"web.lab:80", "127.0.0.1", 80) is TABLE
    assert routes.resolve(b"WEB.LAB.", "127.0.0.1", 80) is TABLE
    assert routes.resolve(b"other", "198.19.0.80", 80) is TABLE  # dedicated address
    assert routes.resolve(b"other", "127.0.0.1", 80) is None
    assert routes.resolve(b"web.lab", "127.0.0.1", 81) is None
    assert normalize_host(b"[::1]:80") == "::1"
    assert routes.listen == {("198.19.0.80", 80)}


def test_admission_limits_queue_and_isolation() -> None:
    admission: Admission[str] = Admission(choose, random.Random(1), queue_limit=2)
    one = ServiceTable("a-http", "a", (), (80,), ("http",), "requests", 1, 2, ((B("a-1", "ord"),),))
    got = [admission.try_acquire("a", [one]) for _ in range(3)]
    assert [g.machine_id if g else None for g in got] == ["a-1", "a-1", None]
    admission.enqueue("a", "w1", [one])
    admission.enqueue("a", "w2", [one])
    with pytest.raises(QueueFull):
        admission.enqueue("a", "w3", [one])
    # Another app is untouched by a's overload.
    other = ServiceTable(
        "b-http", "b", (), (80,), ("http",), "requests", 1, 2, ((B("b-1", "ord"),),)
    )
    assert admission.try_acquire("b", [other]) is not None
    assert admission.queue_depth() == {"a": 2}
    grants = admission.release("a", "a-1")
    assert [(t, b.machine_id) for t, b in grants] == [("w1", "a-1")]
    admission.cancel("a", "w2")
    assert admission.queue_depth() == {}
    assert admission.in_flight()[("a", "a-1")] == 2


def test_replayable_body_rewinds_within_limit() -> None:
    async def main() -> None:
        body = ReplayableBody(BytesBody(b"hello"), limit=10)
        first = body.cursor()
        assert await first.read() == b"hello" and await first.read() == b""
        again = body.cursor()
        assert await again.read() == b"hello" and await again.read() == b""
        big = ReplayableBody(BytesBody(b"x" * 20), limit=10)
        cursor = big.cursor()
        assert await cursor.read() == b"x" * 20 and not big.replayable

    asyncio.run(main())


# --------------------------------------------------------------------------- hot-path cores


def _response_events(
    data: bytes, method: bytes = b"GET", eof: bool = False
) -> tuple[list[object], bool]:
    from edgeproxy.proxy.responses import END, ResponseParser
    from edgeproxy.proxy.responses import NEED_DATA as R_NEED

    parser = ResponseParser()
    parser.start(method)
    parser.feed(data)
    if eof:
        parser.feed(b"")
    events: list[object] = []
    while True:
        event = parser.next_event()
        if event is R_NEED:
            events.append("need")
            return events, parser.keep_alive
        events.append(event)
        if event is END:
            return events, parser.keep_alive


def test_response_parser_frames_like_rfc9112() -> None:
    from edgeproxy.proxy.responses import END
    from edgeproxy.proxy.responses import Data as RData

    events, keep = _response_events(b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 3\r\n\r\nabc")
    assert events[0].status == 200 and events[0].headers == [  # type: ignore[attr-defined]
        (b"server", b"x"),
        (b"content-length", b"3"),
    ]
    assert events[1:] == [RData(b"abc"), END] and keep
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    )
    events, keep = _response_events(chunked)
    assert events[1:] == [RData(b"abc"), END] and keep
    # HTTP/1.0 without keep-alive: until close, and the connection is not reused
    events, keep = _response_events(b"HTTP/1.0 200 OK\r\n\r\nabc", eof=True)
    assert events[1:] == [RData(b"abc"), END] and not keep
    # bodiless: HEAD, 204, 304 end right after the head (no I/O needed)
    for data, method in (
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET"),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", b"GET"),
    ):
        events, keep = _response_events(data, method)
        assert events[1:] == [END] and keep
    # 100 Continue is skipped over by the caller; the final head follows
    events, _ = _response_events(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    assert [e.status for e in events[:2]] == [100, 200]  # type: ignore[attr-defined]
    _, keep = _response_events(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert not keep


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nA: b\nC: d\r\n\r\n",  # bare LF
        b"HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n",  # bare CR
        b"HTTP/1.1 200 OK\r\n x: y\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nA b: c\r\n\r\n",  # bad name
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_response_parser_refuses_malformed_responses(data: bytes) -> None:
    from edgeproxy.proxy.responses import ResponseError

    with pytest.raises(ResponseError):
        _response_events(data)


def test_response_parser_truncated_body_is_an_error() -> None:
    from edgeproxy.proxy.responses import ResponseError

    with pytest.raises(ResponseError):
        _response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)


def test_machine_request_head_refuses_header_injection() -> None:
    from edgeproxy.proxy.machines import MachineRequest, UnsendableRequest, serialize_head

    ok = serialize_head(MachineRequest(b"GET", b"/", [(b"host", b"a"), (b"x", b"y z")], None))
    assert ok == b"GET / HTTP/1.1\r\nhost: a\r\nx: y z\r\n\r\n"
    body = ReplayableBody(BytesBody(b"hi"))
    post = serialize_head(MachineRequest(b"POST", b"/", [(b"host", b"a")], body, 2))
    assert post.endswith(b"content-length: 2\r\n\r\n")
    chunked = serialize_head(MachineRequest(b"POST", b"/", [(b"host", b"a")], body))
    assert chunked.endswith(b"transfer-encoding: chunked\r\n\r\n")
    for headers in (
        [(b"x", b"a\r\nevil: 1")],
        [(b"x", b"a\nb")],
        [(b"x\r\nevil", b"1")],
        [(b"x", b"a\x00")],
    ):
        with pytest.raises(UnsendableRequest):
            serialize_head(MachineRequest(b"GET", b"/", headers, None))
    with pytest.raises(UnsendableRequest):
        serialize_head(MachineRequest(b"GET", b"/ HTTP/1.1\r\nx:", [], None))


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"x-a", b"content-length", b"cookie", b"server", b"x-long"]),
            st.binary(max_size=3000).map(
                lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
            ),
        ),
        max_size=30,
    )
)
@example([(b"x-long", b"v" * 3000)] * 30)  # 90 KB: HEADERS + CONTINUATION frames
@settings(max_examples=100, deadline=None)
def test_nghttp2_engine_header_lists_arrive_whole(fields: list[tuple[bytes, bytes]]) -> None:
    """Any header list (spanning CONTINUATION frames or not) is one event, in order,
    both ways, the second time through HPACK's dynamic table as the first."""
    client, server = _engine_pair(
        max_header_list=1 << 20, max_header_block=1 << 20, max_header_frames=100
    )
    request = [*_REQUEST, *fields]
    for _ in range(2):
        sid = client.submit_request(request, True)
        events = _pump(client, server)[1]
        assert [(k, s, v, f) for k, s, v, f in events if k == ng.EV_REQUEST] == [
            (ng.EV_REQUEST, sid, request, True)
        ]
        server.submit_response(sid, [(b":status", b"200"), *fields], True)
        got = [e for e in _pump(client, server)[0] if e[0] == ng.EV_HEADERS]
        assert got == [(ng.EV_HEADERS, sid, [(b":status", b"200"), *fields], True)]


def test_nghttp2_engine_interim_trailers_and_connect_protocol() -> None:
    client, server = _engine_pair(enable_connect_protocol=True)
    _pump(client, server)
    assert client.remote_connect_protocol() and not server.remote_connect_protocol()
    connect = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
               (b":path", b"/ws"), (b":authority", b"web.test")]
    sid = client.submit_request(connect, False)
    assert client.send_data(sid, b"up", False) == 2
    client.submit_trailers(sid, [(b"x-sum", b"1")])
    ev = _pump(client, server)[1]
    assert [e[0] for e in ev if e[1] == sid] == [ng.EV_REQUEST, ng.EV_DATA, ng.EV_HEADERS]
    assert (ng.EV_DATA, sid, b"up", False) in ev
    assert (ng.EV_HEADERS, sid, [(b"x-sum", b"1")], True) in ev
    server.submit_headers(sid, [(b":status", b"103"), (b"link", b"</a>")], False)
    server.submit_response(sid, [(b":status", b"200")], False)
    server.send_data(sid, b"down", False)
    server.submit_trailers(sid, [(b"x-t", b"2")])
    ev = [e for e in _pump(client, server)[0] if e[1] == sid]
    assert ev[:4] == [
        (ng.EV_HEADERS, sid, [(b":status", b"103"), (b"link", b"</a>")], False),
        (ng.EV_HEADERS, sid, [(b":status", b"200")], False),
        (ng.EV_DATA, sid, b"down", False),
        (ng.EV_HEADERS, sid, [(b"x-t", b"2")], True),
    ]
    assert ev[4] == (ng.EV_CLOSED, sid, 0, 0)
    client.ping(b"12345678")
    assert (ng.EV_PING_ACK, 0, b"12345678", 0) in _pump(client, server)[0]
    server.goaway(0)
    assert (ng.EV_GOAWAY, sid, 0, 0) in _pump(client, server)[0]


def test_nghttp2_engine_flow_control() -> None:
    """Inbound: the connection window is credited on arrival, a stream's only when
    consumed; outbound: a stream sends what the windows allow, the rest waits in its
    buffer, and its writer hears (drained) when the buffer is back at its limit."""
    window = 65536
    client, server = _engine_pair(stream_window=window, connection_window=1 << 24)
    sids = [client.submit_request(_REQUEST, True) for _ in range(2)]
    _pump(client, server)
    for sid in sids:
        server.submit_response(sid, [(b":status", b"200")], False)
        assert server.send_data(sid, b"x" * 300_000, True) == 300_000
    assert server.over(sids[0], 100_000)

    def received(events: list[tuple[int, int, Any, Any]], sid: int) -> int:
        return sum(len(v) for k, s, v, _ in events if k == ng.EV_DATA and s == sid)

    first = _pump(client, server)[0]
    # Each stream got exactly its window, nothing more, though the connection had room.
    assert received(first, sids[0]) == received(first, sids[1]) == window
    assert server.pending(sids[0]) == 300_000 - window
    assert server.drained() == []
    client.consume(sids[0], window)  # only stream 1's consumer reads
    again = _pump(client, server)[0]
    assert received(again, sids[0]) == window and received(again, sids[1]) == 0
    for _ in range(8):
        client.consume(sids[0], window)
        _pump(client, server)
    assert server.pending(sids[0]) == 0 and sids[0] in server.drained()
    assert server.pending(sids[1]) == 300_000 - window  # still stalled by its own window


def test_nghttp2_engine_abuse_is_fatal_with_enhance_your_calm() -> None:
    """A PING flood past the bucket: a fatal event naming the kind, GOAWAY
    ENHANCE_YOUR_CALM queued, nothing more read or written after it."""
    client = ng.Session(True)
    server_side = ng.Session(False, ping_burst=10, ping_rate=1)
    _pump(client, server_side)
    for n in range(20):
        client.ping(b"%08d" % n)
    events = server_side.receive(client.data_to_send())
    assert events[-1] == (ng.EV_FATAL, 0, "ping_flood", 0xB) and server_side.abuse == "ping_flood"
    out = server_side.data_to_send()
    assert b"\x07\x00\x00\x00\x00\x00" in out and out.endswith(b"\x00\x00\x00\x0b")  # GOAWAY
    assert server_side.finished()


_REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
            (b":authority", b"web.test")]


def _engine_pair(**kwargs: Any) -> tuple[ng.Session, ng.Session]:
    return ng.Session(True, **kwargs), ng.Session(False, **kwargs)


def _pump(
    client: ng.Session, server: ng.Session
) -> tuple[list[tuple[int, int, Any, Any]], list[tuple[int, int, Any, Any]]]:
    """Move bytes both ways until both are quiet; (client's events, server's events)."""
    at_client: list[tuple[int, int, Any, Any]] = []
    at_server: list[tuple[int, int, Any, Any]] = []
    for _ in range(100):
        up, down = client.data_to_send(), server.data_to_send()
        if not up and not down:
            break
        if up:
            at_server += server.receive(up)
        if down:
            at_client += client.receive(down)
    return at_client, at_server


def test_h2_request_checks_per_stream() -> None:
    from edgeproxy.proxy.frontend_h2 import malformed_request

    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
    assert malformed_request([*base, (b":authority", b"web.test"), (b"accept", b"*/*")]) is None
    bad = [
        [*base, (b"Accept", b"x")],  # upper-case name
        [*base, (b"connection", b"close")],
        [*base, (b"transfer-encoding", b"chunked")],
        [*base, (b"te", b"gzip")],
        [*base, (b"x", b"a\r\nb: c")],
        [*base, (b"content-length", b"1"), (b"content-length", b"2")],
        [(b":method", b"GET"), (b"accept", b"x"), (b":path", b"/"), (b":scheme", b"http")],
        [*base, (b":path", b"/again")],
        [(b":method", b"GET"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")],
    ]
    for headers in bad:
        assert malformed_request(headers) is not None, headers
    assert malformed_request([*base, (b"te", b"trailers")]) is None


def test_h2_host_header_and_authority_rfc9113_8_3_1() -> None:
    from edgeproxy.proxy.frontend_h2 import request_authority

    # Host alone (no :authority) names the target; :authority alone too.
    assert request_authority(None, [(b"host", b"web.test")]) == (b"web.test", None)
    assert request_authority(b"web.test", []) == (b"web.test", None)
    # Both, same entity (case, trailing dot): allowed, :authority is used.
    assert request_authority(b"web.test:80", [(b"host", b"WEB.test.:80")]) == (b"web.test:80", None)
    # Both, different entities (h2load -H "host: x" keeps :authority from the URL):
    # malformed, refused with 400 on that stream only.
    authority, problem = request_authority(b"198.19.0.80", [(b"host", b"web.lab")])
    assert authority is None and problem is not None and "differs" in problem
    assert request_authority(b"a", [(b"host", b"a"), (b"host", b"a")])[1] is not None


# The response parser checks a header section by counting lines against matches
# anchored at line starts; this is the rule it replaced, stated as one regex.
_WHOLE_SECTION = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r\n)*")
_SECTION_BYTES = [
    b"a", b"X", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"-", b"(", b"\x7f", b"\xff"
]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_SECTION_BYTES), max_size=16))
def test_response_header_section_rule_is_the_whole_section_regex(parts: list[bytes]) -> None:
    from edgeproxy.proxy.responses import ResponseError, ResponseParser

    section = b"".join(parts)
    if not section or section.startswith(b"\r\n") or b"\r\n\r\n" in section + b"\r\n":
        return  # an empty line ends the head: not a section of field lines
    parser = ResponseParser()
    parser.start(b"GET")
    parser.feed(b"HTTP/1.1 200 OK\r\n" + section + b"\r\n\r\n")
    expected = _WHOLE_SECTION.fullmatch(section + b"\r\n") is not None
    try:
        parser.next_event()
        accepted = True
    except ResponseError as exc:
        assert "header section" in str(exc), exc
        accepted = False
    assert accepted == expected, section


def test_one_letter_names_leave_shared_bytes_alone() -> None:
    """CPython shares one object per 1-byte bytes value; the compiled parser must not
    lower-case a one-letter name in place (b"X" would become b"x" process-wide)."""
    from edgeproxy.proxy import _http1

    upper = bytes([88])  # b"X", the shared object
    head = _http1.parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nY-: 2")
    assert (b"x", b"1") in head.headers
    _http1.response_head(b"HTTP/1.1 200 OK\r\nZ: 3")
    assert upper == bytes([88]) and bytes([88]).lower() == bytes([120])
    assert bytes([88, 90]) == b"X" + b"Z"
