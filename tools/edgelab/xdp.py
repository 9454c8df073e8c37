"""A do-nothing XDP program (return XDP_PASS) for the client's ends of edge links.

Why: the edge refuses a connection by turning the SYN into an RST and sending it back
with XDP_TX. A veth delivers XDP_TX frames to its peer only when the peer runs an
XDP program of its own: without one the frames stay queued in the peer's ring
(the edge counts them as sent, the client never sees them, and its connect hangs).
A real NIC has no such condition, so the lab gives the client's veths this program.

Loaded with two raw bpf(2) calls (no compiler: two instructions), pinned for the
moment `ip link` needs it, then unpinned: the attachment keeps it alive, and
deleting the namespace removes it.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from edgelab import netns
from edgelab.rundir import BPF_ROOT

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_PROG_TYPE_XDP = 6
XDP_PASS = 2
ATTR_SIZE = 128
# r0 = XDP_PASS; exit
PROGRAM = struct.pack("<BBhi", 0xB7, 0, 0, XDP_PASS) + struct.pack("<BBhi", 0x95, 0, 0, 0)
LICENSE = b"GPL\0"


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(SYS_BPF, cmd, attr, ATTR_SIZE))
    if result < 0:
        err = ctypes.get_errno()
        raise netns.NetnsError(f"bpf({cmd}) failed: {os.strerror(err)}")
    return result


def load_pass_program() -> int:
    """The program's fd."""
    insns = ctypes.create_string_buffer(PROGRAM, len(PROGRAM))
    license_ = ctypes.create_string_buffer(LICENSE, len(LICENSE))
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, BPF_PROG_TYPE_XDP, len(PROGRAM) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_))
    struct.pack_into("16s", attr, 48, b"lab_xdp_pass")
    return _bpf(BPF_PROG_LOAD, attr)


def attach_pass(namespace: str, dev: str) -> None:
    """Attach XDP_PASS (native mode) to `dev` in `namespace`."""
    pin = BPF_ROOT / f"lab-xdp-pass-{os.getpid()}"
    fd = load_pass_program()
    try:
        path = ctypes.create_string_buffer(str(pin).encode() + b"\0")
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("<QI", attr, 0, ctypes.addressof(path), fd)
        BPF_ROOT.mkdir(parents=True, exist_ok=True)
        _bpf(BPF_OBJ_PIN, attr)
        try:
            netns.run(netns.enter_argv(namespace, [
                "ip", "link", "set", "dev", dev, "xdpdrv", "pinned", str(pin)]))
        finally:
            Path(pin).unlink(missing_ok=True)
    finally:
        os.close(fd)
