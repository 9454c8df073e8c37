"""A short, bounded run of the HTTP/1 core fuzzer (``tests/fuzz/fuzz_http1.py``).

The fuzzer holds every compiled function equal to its Python twin on inputs that
libFuzzer mutates from the seed corpus (``tests/fuzz/corpus/http1``). When clang
is there, ``_http1`` is first built with sanitizer coverage into a temporary
directory, so libFuzzer is guided by the compiled code's branches as well as the
Python twins' (atheris instruments those); without clang the in-tree module runs,
guided by Python coverage only. New inputs go to a temporary corpus directory
(the checked-in seeds are never written), and so do crash artifacts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FUZZER = REPO / "tests" / "fuzz" / "fuzz_http1.py"
CORPUS = REPO / "tests" / "fuzz" / "corpus" / "http1"
PYX = REPO / "control" / "edgeproxy" / "proxy" / "_http1.pyx"
RUNS = 100_000
MAX_TOTAL_TIME_S = 20
COVERAGE = "-fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp"


def build_with_coverage(directory: Path) -> Path | None:
    """``_http1`` compiled with sanitizer coverage (None without clang or cython)."""
    clang = shutil.which("clang")
    cython = Path(sys.executable).with_name("cython")
    if clang is None or not cython.exists():
        return None
    package = directory / "edgeproxy" / "proxy"
    package.mkdir(parents=True)
    (directory / "edgeproxy" / "__init__.py").touch()
    (package / "__init__.py").touch()  # so cython names the module edgeproxy.proxy._http1
    shutil.copy(PYX, package / PYX.name)
    # Its C-level declarations: the compiled lane cimports them, so the build must
    # lay the parser out exactly as the installed module does.
    shutil.copy(PYX.with_suffix(".pxd"), package / (PYX.stem + ".pxd"))
    c_file = package / "_http1.c"
    subprocess.run([str(cython), "-3", str(package / PYX.name), "-o", str(c_file)],
                   check=True, capture_output=True, timeout=120)
    so = package / ("_http1" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(
        [clang, "-shared", "-fPIC", "-O1", "-g", COVERAGE,
         "-I" + sysconfig.get_paths()["include"], str(c_file), "-o", str(so)],
        check=True, capture_output=True, timeout=120,
    )
    return so


def test_seed_corpus_is_checked_in() -> None:
    seeds = sorted(CORPUS.iterdir())
    assert len(seeds) >= 24
    assert any(b"Transfer-Encoding: chunked" in p.read_bytes() for p in seeds)


def test_fuzzer_finds_no_difference(tmp_path: Path) -> None:
    env = dict(os.environ)
    given = env.get("EDGEPROXY_HTTP1_SO")  # fuzz that build instead (a test of this test)
    so = Path(given) if given else build_with_coverage(tmp_path / "build")
    if so is not None:
        env["EDGEPROXY_HTTP1_SO"] = str(so)
    new = tmp_path / "corpus"
    new.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    proc = subprocess.run(
        [sys.executable, str(FUZZER), str(new), str(CORPUS), "-max_len=10000",
         f"-runs={RUNS}", f"-max_total_time={MAX_TOTAL_TIME_S}", "-timeout=10",
         f"-artifact_prefix={artifacts}/", "-print_final_stats=1"],
        env=env, capture_output=True, text=True, errors="replace",
        timeout=MAX_TOTAL_TIME_S + 60,
    )
    log = proc.stderr[-6000:]
    crashes = list(artifacts.iterdir())
    assert proc.returncode == 0 and not crashes, f"fuzzer reported a crash:\n{log}"
    assert "Done " in proc.stderr, log
    module = str(so) if so is not None else "control/edgeproxy/proxy/_http1"
    assert f"compiled module {module}" in proc.stderr or so is None, log
