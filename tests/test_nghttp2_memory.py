"""The compiled HTTP/2 engine (proxy/_nghttp2.pyx over libnghttp2) under valgrind:
10,000 in-memory request/response exchanges (bodies both ways, 1xx, trailers,
resets, PING, GOAWAY) with no invalid access and no leak in our module or the
library."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPT = HERE / "memcheck" / "nghttp2_exchanges.py"
OURS = re.compile(r"_nghttp2|libnghttp2")


def _records(report: str) -> list[str]:
    """valgrind's error and leak records: blocks of lines after the header, split
    at blank ``==pid==`` lines."""
    return [b for b in re.split(r"\n==\d+== \n", report) if b.strip()]


def test_ten_thousand_exchanges_clean_under_valgrind() -> None:
    valgrind = shutil.which("valgrind")
    assert valgrind, "valgrind missing: tools/setup installs it"
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    done = subprocess.run(
        [valgrind, "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite",
         "--errors-for-leak-kinds=definite", "--num-callers=40", sys.executable,
         str(SCRIPT), "10000"],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok 10000", done.stdout[-500:]
    bad = [r for r in _records(done.stderr)
           if OURS.search(r) and re.search(r"Invalid (read|write|free)|uninitialised|"
                                           r"definitely lost|Mismatched", r)]
    assert not bad, "\n\n".join(bad)[:6000]
    summary = re.search(r"ERROR SUMMARY: (\d+) errors", done.stderr)
    assert summary is not None, done.stderr[-2000:]
