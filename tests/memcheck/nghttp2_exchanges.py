"""Drive two in-memory libnghttp2 sessions (client and server, the compiled
``_nghttp2`` module) through N request/response exchanges: bodies both ways,
trailers, informational heads, resets and a GOAWAY. Run under valgrind by
tests/test_nghttp2_memory.py; also runs as a plain script."""

from __future__ import annotations

import sys

from edgeproxy.proxy import _nghttp2 as ng


def pump(a: ng.Session, b: ng.Session) -> list[ng.Event]:
    """Move bytes both ways until both sides are quiet; every event, both sides."""
    events: list[ng.Event] = []
    for _ in range(64):  # bounded: a few round trips settle any exchange
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            break
        if out_a:
            events += b.receive(out_a)
        if out_b:
            events += a.receive(out_b)
    return events


def exchange(client: ng.Session, server: ng.Session, i: int) -> None:
    body = b"x" * (i % 5000)
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p%d" % i),
               (b":authority", b"web.test"), (b"x-n", b"%d" % i)]
    sid = client.submit_request(headers, end_stream=not body)
    if body:
        client.send_data(sid, body, True)
    seen = pump(client, server)
    got = b"".join(v for k, s, v, _ in seen if k == ng.EV_DATA and s == sid)
    assert got == body, (i, len(got), len(body))
    server.consume(sid, len(got))
    if i % 7 == 0:
        server.reset(sid, 8)  # CANCEL
        pump(server, client)
        return
    if i % 11 == 0:
        server.submit_headers(sid, [(b":status", b"103"), (b"link", b"</a>")], False)
    server.submit_response(sid, [(b":status", b"200"), (b"server", b"t")], False)
    server.send_data(sid, b"y" * (i % 3000), i % 3 != 0)
    if i % 3 == 0:
        server.submit_trailers(sid, [(b"x-t", b"done")])
    events = pump(server, client)
    statuses = [v[0][1] for k, s, v, _ in events if k == ng.EV_HEADERS and s == sid and v
                and v[0][0] == b":status"]
    assert statuses[-1:] == [b"200"], (i, statuses)
    data = 0
    for kind, stream, value, _ in events:
        if kind == ng.EV_DATA and stream == sid:
            data += len(value)
            client.consume(sid, len(value))
    assert data == i % 3000, (i, data)


def main(n: int) -> None:
    for round_ in range(max(1, n // 500)):
        client = ng.Session(True)
        server = ng.Session(False, enable_connect_protocol=True)
        pump(client, server)
        for i in range(min(500, n - round_ * 500)):
            exchange(client, server, i)
        client.ping(b"12345678")
        pump(client, server)
        server.goaway(0)
        pump(server, client)
    print("ok", n)


if __name__ == "__main__":
    main(int(sys.argv[1]))
