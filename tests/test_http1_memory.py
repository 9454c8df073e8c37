"""Memory safety of the compiled HTTP/1 core (``edgeproxy.proxy._http1``).

10,000 requests' worth of every compiled function, in a subprocess under
valgrind's memcheck with ``PYTHONMALLOC=malloc`` (so every Python allocation is
visible to it): parse_head, forward_head on heads bigger than its 4 KiB stack
buffer (the heap paths: malloc, then realloc past 8 KiB, and free),
response_head, client_head (stack and heap paths), ResponseParser over a
connection's responses, and the error paths
(refused heads, UnsendableRequest raised after the buffer went to the heap, the
replay directive). Any invalid read or
write, and any definitely-lost block, whose stack names ``_http1`` fails the test.
A second, plain run checks that the process' RSS stays flat over the same loop.
``EDGEPROXY_HTTP1_SO`` in the environment points both runs at another build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
VALGRIND_ITERATIONS = 10_000
VALGRIND_TIMEOUT_S = 150
RSS_ITERATIONS = 30_000
RSS_GROWTH_LIMIT_KB = 4096

# One "request": the compiled functions on their success and error paths.
WORKLOAD = r"""
import importlib.util, os, resource, sys
sys.path.insert(0, {tests!r})
if os.environ.get("EDGEPROXY_HTTP1_SO"):  # another build of _http1 (a test of this test)
    class Build:
        def find_spec(self, name, path=None, target=None):
            if name == "edgeproxy.proxy._http1":
                so = os.environ["EDGEPROXY_HTTP1_SO"]
                return importlib.util.spec_from_file_location(name, so)
    sys.meta_path.insert(0, Build())
from edgeproxy.proxy import _http1
from edgeproxy.proxy.messages import HttpError, ResponseError, ResponseHead
from http1_shapes import FORWARDING, SEED_HEADS, SEED_RESPONSES

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

small = SEED_HEADS["xff_via"]
big = SEED_HEADS["big_forward"]                      # forward_head output > 4 KiB
refused = [b for b in SEED_HEADS.values() if b not in (small, big)]
big_head = _http1.parse_head(big)
# Output past 8 KiB: the buffer goes stack -> malloc -> realloc.
huge_head = _http1.parse_head(b"\r\n".join(
    [b"GET / HTTP/1.1", b"Host: a"] + [b"X-Huge-%d: " % i + b"h" * 100 for i in range(98)]))
assert len(_http1.forward_head(huge_head, *FORWARDING, b"r")) > 8192
small_head = _http1.parse_head(small)
assert len(_http1.forward_head(big_head, *FORWARDING, b"r")) > 4096
bad_ip = (b"1.2.3.4\n",) + FORWARDING[1:]           # unsendable: raised on the heap path
response_block = SEED_RESPONSES["directives"]
big_response = ResponseHead(200, b"", [(b"x-big-%d" % i, b"v" * 100) for i in range(50)]
                            + [(b"connection", b"x-big-1")], b"1.1")
replay = _http1.response_head(SEED_RESPONSES["replay"])[0]
bad_responses = [SEED_RESPONSES[k] for k in ("bad_status", "nul", "bare_lf", "fold")]
# A keep-alive connection's worth of responses, cut mid-way, for the framing parser:
# Content-Length, chunked with trailers, HEAD, and one broken chunk at the end.
stream = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
          b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
          b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")

def frame(i):
    parser = _http1.ResponseParser()
    parser.start(b"GET")
    cut = 7 + i % 60
    try:
        for piece in (stream[:cut], stream[cut:]):
            parser.feed(piece)
            while True:
                event = parser.next_event()
                if type(event).__name__ == "NeedData":
                    break
                if type(event).__name__ == "EndOfMessage":
                    parser.start(b"GET")
    except ResponseError:
        pass

def one(i):
    head = _http1.parse_head(small)
    _http1.forward_head(head, *FORWARDING, b"%032x" % i)
    _http1.forward_head(big_head, *FORWARDING, b"r")
    _http1.forward_head(huge_head, *FORWARDING, b"r")
    try:
        _http1.forward_head(big_head, *bad_ip, b"r")
    except _http1.UnsendableRequest:
        pass
    try:
        _http1.parse_head(refused[i % len(refused)])
    except HttpError:
        pass
    response, _ = _http1.response_head(response_block)
    _http1.client_head(response, head, b"rid")
    _http1.client_head(big_response, small_head, b"rid", True, False)
    assert _http1.client_head(replay, head, b"rid") is None
    try:
        _http1.response_head(bad_responses[i % len(bad_responses)])
    except ResponseError:
        pass
    frame(i)

n = int(sys.argv[1])
for i in range(min(n, 2000)):  # warm up caches, interned objects, free lists
    one(i)
before = rss_kb()
for i in range(n):
    one(i)
print("RSS_KB", before, rss_kb(), flush=True)
"""


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "workload.py"
    path.write_text(WORKLOAD.format(tests=str(TESTS)))
    return path


def _records(log: str) -> list[str]:
    """valgrind's report split into its error and leak records."""
    lines = [re.sub(r"^==\d+== ?", "", line) for line in log.splitlines()]
    return [r for r in "\n".join(lines).split("\n\n") if r.strip()]


def _bad(record: str) -> bool:
    kind = "Invalid read" in record or "Invalid write" in record or "Invalid free" in record
    lost = "definitely lost in loss record" in record
    return (kind or lost) and "_http1" in record


def test_no_invalid_access_or_leak_under_valgrind(tmp_path: Path) -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind not installed (tools/setup installs it)")
    log = tmp_path / "valgrind.log"
    env = dict(os.environ, PYTHONMALLOC="malloc")
    proc = subprocess.run(
        [valgrind, "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite",
         "--num-callers=40", f"--log-file={log}", sys.executable, str(_script(tmp_path)),
         str(VALGRIND_ITERATIONS)],
        env=env, capture_output=True, text=True, timeout=VALGRIND_TIMEOUT_S,
    )
    report = log.read_text(errors="replace")
    bad = [r for r in _records(report) if _bad(r)]
    assert not bad, "\n\n".join(bad[:5])  # before the exit status: a crash's cause
    assert proc.returncode == 0, proc.stderr[-4000:] + report[-4000:]
    assert "RSS_KB" in proc.stdout and "ERROR SUMMARY" in report


def test_rss_is_flat_over_the_loop(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(_script(tmp_path)), str(RSS_ITERATIONS)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    before, after = (int(v) for v in proc.stdout.split("RSS_KB")[1].split())
    assert after - before < RSS_GROWTH_LIMIT_KB, (before, after)
