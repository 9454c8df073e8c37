"""Sans-IO proxy cores: framing/smuggling, header rules, routing, replay, admission."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.placement import choose
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
            st.sampled_from(
                [b":status", b":path", b"content-length", b"cookie", b"x-a", b"server"]
            ),
            st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        ),
        max_size=20,
    )
)
@settings(max_examples=200, deadline=None)
def test_stateless_hpack_encoder_round_trips(fields: list[tuple[bytes, bytes]]) -> None:
    from hpack import Decoder, Encoder

    from edgeproxy.proxy.hpackfast import FastDecoder, StatelessEncoder

    encoder, decoder, fast = StatelessEncoder(), Decoder(), FastDecoder()
    for _ in range(2):  # the second block comes from the per-field cache
        block = encoder.encode(fields)
        assert decoder.decode(block, raw=True) == fields
        assert fast.decode(block, raw=True) == fields
    assert not decoder.header_table.dynamic_entries  # nothing indexed, ever
    # Blocks from a stateful, huffman-coding encoder take the full decoder's path.
    stateful, fast = Encoder(), FastDecoder()
    for _ in range(2):
        assert [tuple(f) for f in fast.decode(stateful.encode(fields), raw=True)] == fields


def test_fast_hpack_decoder_keeps_the_header_list_limit() -> None:
    from hpack import OversizedHeaderListError

    from edgeproxy.proxy.hpackfast import FastDecoder, StatelessEncoder

    decoder = FastDecoder()
    decoder.max_header_list_size = 1000
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(StatelessEncoder().encode([(b"x", b"y" * 2000)]), raw=True)


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
