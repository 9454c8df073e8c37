#!/usr/bin/env python3
"""Coverage-guided fuzzer (atheris / libFuzzer) for the compiled HTTP/1 core.

One input is ``request head [CRLFCRLF response head [CRLFCRLF flags]]``. The
request head goes to ``_http1.parse_head`` and ``framing.reference_parse_head``,
the response head to ``_http1.response_head`` and
``responses.reference_response_head``; when both parse, ``forward_head`` and
``client_head`` run on the parsed output against their Python twins
(``tests/http1_shapes.py``), with ``close`` and ``check_replay`` taken from the
first flag byte. Any difference, and any exception other than HttpError,
ResponseError or UnsendableRequest, is a crash.

Coverage: the Python twins and helpers are instrumented by atheris
(``instrument_imports``). The compiled module is C: libFuzzer sees its branches
only if it was built with sanitizer coverage (``-fsanitize-coverage=
inline-8bit-counters,pc-table,trace-cmp``: the parts of ``-fsanitize=fuzzer-no-link``
that atheris' libFuzzer provides); set ``EDGEPROXY_HTTP1_SO`` to such a build
of ``_http1`` (``tests/test_fuzz_http1.py`` makes one in a
temporary directory when clang is there) and it is imported in place of the
in-tree module. Otherwise the compiled code runs uninstrumented (its results are
still checked on every input).

    .venv/bin/python tests/fuzz/fuzz_http1.py NEW_CORPUS_DIR tests/fuzz/corpus/http1 \\
        -max_len=10000 -max_total_time=60
    .venv/bin/python tests/fuzz/fuzz_http1.py --write-corpus tests/fuzz/corpus/http1
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # http1_shapes

shapes: Any = None


class _CoverageBuild:
    """A meta-path finder that serves ``edgeproxy.proxy._http1`` from a coverage
    build (``edgeproxy.proxy`` imports it while the package initialises, so it has
    to be in place before anything imports ``edgeproxy``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "edgeproxy.proxy._http1":
            return None
        return importlib.util.spec_from_file_location(name, self.path)


def _load_instrumented(path: str) -> None:
    """The coverage build's ``__sanitizer_cov_*`` references resolve against the
    libFuzzer inside atheris, which atheris loads privately when fuzzing starts:
    make it global, then route the import to the build."""
    assert "edgeproxy" not in sys.modules
    core = next(m.__file__ for name, m in sys.modules.items() if "core_with_libfuzzer" in name)
    ctypes.CDLL(core, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    sys.meta_path.insert(0, _CoverageBuild(path))


def _load() -> None:
    """On the first input (libFuzzer is up): the compiled module, then the twins
    under atheris' Python instrumentation."""
    global shapes
    so = os.environ.get("EDGEPROXY_HTTP1_SO")
    if so:
        _load_instrumented(so)
    with atheris.instrument_imports(include=["edgeproxy", "http1_shapes"]):
        import http1_shapes
    from edgeproxy.proxy import _http1

    assert not so or _http1.__file__ == so, _http1.__file__
    print(f"fuzz_http1: compiled module {_http1.__file__}", file=sys.stderr, flush=True)
    shapes = http1_shapes


SEP = b"\r\n\r\n"


def check(data: bytes) -> None:
    if shapes is None:
        _load()
    request, _, rest = data.partition(SEP)
    response, _, flags = rest.partition(SEP)
    compiled, reference = shapes.parse_pair(request)
    assert compiled == reference, ("parse_head", request, compiled, reference)
    rcompiled, rreference = shapes.response_pair(response)
    assert rcompiled == rreference, ("response_head", response, rcompiled, rreference)
    if compiled[0] != "ok":
        return
    head = compiled[1]
    flag = flags[0] if flags else 0
    rid = flags[1:9]
    fwd = shapes.forward_pair(head, *shapes.FORWARDING, rid)
    assert fwd[0] == fwd[1], ("forward_head", request, rid, fwd)
    if rcompiled[0] == "ok":
        made = shapes.client_pair(rcompiled[1][0], head, rid, bool(flag & 1), bool(flag & 2))
        assert made[0] == made[1], ("client_head", request, response, flag, made)


def write_corpus(directory: Path) -> None:
    """The seed corpus: each catalogued request head with a catalogued response."""
    directory.mkdir(parents=True, exist_ok=True)
    responses_ = list(shapes.SEED_RESPONSES.items())
    for i, (name, request) in enumerate(shapes.SEED_HEADS.items()):
        rname, response = responses_[i % len(responses_)]
        flags = bytes([i % 4]) + b"r%07d" % i
        (directory / f"{name}+{rname}").write_bytes(request + SEP + response + SEP + flags)


def main() -> None:
    if sys.argv[1:2] == ["--write-corpus"]:
        _load()
        write_corpus(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
