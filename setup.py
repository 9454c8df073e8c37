"""Builds the compiled core: every Cython module under control/ becomes an
extension beside the Python module it serves (``proxy/_http1.pyx`` ->
``edgeproxy.proxy._http1``). Libraries a module links are named in its own
header (``# distutils: libraries = nghttp2``), so adding a module needs no edit
here. Everything else about the package is in pyproject.toml, except that the
wheel also carries bpf/ (``BuildPyWithBpf``)."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "control").rglob("*.pyx"))
BPF = HERE / "bpf"  # the one home of the C programs and headers


class BuildPyWithBpf(build_py):
    """Also copies bpf/*.c and bpf/*.h into the built package as ``edgeproxy/bpf/``:
    bcc compiles them when a program loads, and an installed wheel has no checkout
    to find them in (``dataplane.bpf_sources()`` looks there with importlib.resources).
    MANIFEST.in puts bpf/ in the sdist, so a wheel built from the sdist has them too."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # editable: the checkout's bpf/ is read
            return
        target = Path(self.build_lib) / "edgeproxy" / "bpf"
        self.mkpath(str(target))
        for source in sorted(BPF.glob("*.[ch]")):
            self.copy_file(str(source), str(target / source.name))


setup(
    cmdclass={"build_py": BuildPyWithBpf},
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
