"""h1core: the compiled HTTP/1 core (control/edgeproxy/proxy/_http1.pyx) beside its
pure-Python twins, per step of a keep-alive GET's common path.

Steps: parse the client's head; build the machine's head; parse the machine's
response head; build the client's head. Each is timed (timeit, best of the runs)
and, where valgrind is installed, counted in instructions (callgrind over a
harness process, the difference between two iteration counts, so start-up cancels
out). Ratios are compiled / Python.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

from edgebench.common import VENV_PYTHON, Result, Row, relate
from edgeproxy.proxy import _http1
from edgeproxy.proxy import headers as h
from edgeproxy.proxy.framing import reference_parse_head
from edgeproxy.proxy.frontend_h1 import head_bytes, response_framing
from edgeproxy.proxy.machines import MachineRequest, serialize_head
from edgeproxy.proxy.responses import reference_response_head

REQUEST = (b"GET /index.html HTTP/1.1\r\nHost: web.lab\r\nUser-Agent: wrk/4.1.0\r\n"
           b"Accept: */*\r\nAccept-Encoding: gzip")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 15:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive")
CLIENT = h.ClientInfo(ip="198.18.0.2", scheme="http", local_port=80, protocol=b"1.1")
FORWARDING = (b"198.18.0.2", b"http", b"80", b"1.1", b"ord")
RID = b"0" * 32


def _py_forward(head: object) -> bytes:
    assert isinstance(head, type(_http1.parse_head(REQUEST)))
    host = head.header(b"host")
    others = [f for f in head.headers if f[0] != b"host"]
    fields = h.forward_request_headers(others, CLIENT, "ord", RID)
    if host is not None:
        fields.insert(0, (b"host", host))
    return serialize_head(MachineRequest(head.method, head.target, fields, None))


def _py_client(response: object, request: object) -> bytes:
    fields = h.client_response_headers(response.headers, RID)  # type: ignore[attr-defined]
    framing = response_framing(request, response.status, fields, close=False)  # type: ignore[arg-type,attr-defined]
    return head_bytes(response.status, response.reason, framing.headers)  # type: ignore[attr-defined]


def steps() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """step -> (Python twin, compiled); both produce equal results (checked)."""
    head = _http1.parse_head(REQUEST)
    response, _ = _http1.response_head(RESPONSE)
    out = {
        "parse-request-head": (lambda: reference_parse_head(REQUEST),
                               lambda: _http1.parse_head(REQUEST)),
        "machine-head": (lambda: _py_forward(head),
                         lambda: _http1.forward_head(head, *FORWARDING, RID)),
        "parse-response-head": (lambda: reference_response_head(RESPONSE),
                                lambda: _http1.response_head(RESPONSE)),
        "client-head": (lambda: _py_client(response, head),
                        lambda: _http1.client_head(response, head, RID)),
    }
    for name, (py, c) in out.items():
        a, b = py(), c()
        if name == "client-head":
            assert isinstance(b, tuple)
            b = b[0]
        assert a == b, (name, a, b)
    return out


def _harness(which: str, n: int) -> None:
    """Run every step ``n`` times in one implementation (for callgrind)."""
    chosen = [pair[0 if which == "python" else 1] for pair in steps().values()]
    for _ in range(n):
        for fn in chosen:
            fn()


def _instructions(which: str, n: int, workdir: Path) -> int:
    out = workdir / f"cg.{which}.{n}"
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(VENV_PYTHON),
         "-m", "edgebench.h1core", which, str(n)],
        capture_output=True, text=True, timeout=600, check=True)
    m = re.search(r"Collected : (\d+)", proc.stderr)
    if not m:
        raise RuntimeError(f"callgrind printed no total: {proc.stderr[-300:]}")
    return int(m.group(1))


def measure(result: Result, runs: int, quick: bool) -> None:
    number = 20_000 if quick else 100_000
    total = {"python": 0.0, "compiled": 0.0}
    for name, (py, c) in steps().items():
        for impl, fn in (("python", py), ("compiled", c)):
            times = timeit.repeat(fn, number=number, repeat=max(runs, 1))
            per = [t / number * 1e6 for t in times]
            total[impl] += min(per)
            result.rows.append(Row(f"{name}-{impl}", "time", "us", per, better="lower").finish())
        relate(result.rows, f"{name}-compiled", f"{name}-python", "time")
    result.rows.append(Row("all-steps-python", "time", "us", [total["python"]],
                           better="lower").finish())
    result.rows.append(Row("all-steps-compiled", "time", "us", [total["compiled"]],
                           better="lower").finish())
    relate(result.rows, "all-steps-compiled", "all-steps-python", "time")
    if shutil.which("valgrind"):
        n0, n1 = (200, 2200) if quick else (1000, 11000)
        with tempfile.TemporaryDirectory() as d:
            for impl in ("python", "compiled"):
                per = (_instructions(impl, n1, Path(d)) - _instructions(impl, n0, Path(d)))
                result.rows.append(Row(f"all-steps-{impl}", "instructions", "instr",
                                       [per / (n1 - n0)], better="lower").finish())
        relate(result.rows, "all-steps-compiled", "all-steps-python", "instructions")
    result.notes += [
        f"timeit: {number:,} calls per run, {runs} runs; a row's value is µs per call. "
        "The steps' inputs are a wrk-like GET and an nginx-like 200 response head.",
        "instructions: callgrind over `python -m edgebench.h1core IMPL N`, the count "
        "for N1 iterations minus the count for N0, over N1-N0 (start-up cancels out); "
        "all four steps per iteration.",
    ]


if __name__ == "__main__":
    _harness(sys.argv[1], int(sys.argv[2]))
