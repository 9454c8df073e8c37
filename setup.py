"""Builds the compiled core: every Cython module under control/ becomes an
extension beside the Python module it serves (``proxy/_http1.pyx`` ->
``edgeproxy.proxy._http1``). Libraries a module links are named in its own
header (``# distutils: libraries = nghttp2``), so adding a module needs no edit
here. Everything else about the package is in pyproject.toml."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import setup

HERE = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "control").rglob("*.pyx"))

setup(
    ext_modules=cythonize(
        SOURCES,
        build_dir="build/cython",  # generated C stays out of the source tree
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
