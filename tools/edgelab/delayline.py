"""A userspace delay line: the lab's stand-in for netem where the kernel lacks it.

It bridges two interfaces (the far ends of two veths that meet in the wire
namespace) and holds every frame for a fixed one-way delay in each direction.
Packet sockets with a virtio-net header carry GSO and checksum-offload metadata
through unchanged, so the link behaves like a plain veth pair plus delay: big
GSO frames stay big, partial checksums stay partial.

Run as `python -m edgelab.delayline IF_A IF_B --delay-ms N` inside the wire namespace.
"""

from __future__ import annotations

import argparse
import collections
import select
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15  # linux/if_packet.h: prefix each frame with struct virtio_net_hdr
PACKET_IGNORE_OUTGOING = 23  # do not read back the frames we send ourselves
# A GSO frame from veth can be up to 64 KiB (larger only with BIG TCP, not set up here).
MAX_FRAME = 256 * 1024
READ_BATCH = 256  # frames read per wakeup, so one busy direction cannot starve the other
# Per direction, like netem's `limit`: beyond this the line drops, it never grows unbounded.
QUEUE_LIMIT_BYTES = 32 * 1024 * 1024
SOCKET_BUFFER = 8 * 1024 * 1024


@dataclass
class Direction:
    """Frames read from `source`, each due for `sink` at its deadline (FIFO: one delay)."""

    source: socket.socket
    sink: socket.socket
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    queued_bytes: int = 0
    dropped: int = 0

    def read_available(self, delay_s: float) -> None:
        due = time.monotonic() + delay_s
        for _ in range(READ_BATCH):
            try:
                frame = self.source.recv(MAX_FRAME)
            except BlockingIOError:
                return
            if self.queued_bytes + len(frame) > QUEUE_LIMIT_BYTES:
                self.dropped += 1
                continue
            self.queue.append((due, frame))
            self.queued_bytes += len(frame)

    def send_due(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, frame = self.queue.popleft()
            self.queued_bytes -= len(frame)
            try:
                self.sink.send(frame)
            except OSError:
                # A full device queue or a frame the peer refuses is a loss on the wire.
                self.dropped += 1

    def next_deadline(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def run(if_a: str, if_b: str, delay_ms: float, ready_file: Path | None) -> None:
    a, b = open_port(if_a), open_port(if_b)
    directions = {a.fileno(): Direction(a, b), b.fileno(): Direction(b, a)}
    delay_s = delay_ms / 1000.0
    poller = select.poll()
    for fd in directions:
        poller.register(fd, select.POLLIN)
    if ready_file is not None:
        ready_file.write_text("ready\n")
    while True:
        deadlines = [d for d in (x.next_deadline() for x in directions.values()) if d is not None]
        timeout_ms = None
        if deadlines:
            timeout_ms = max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)
        for fd, _ in poller.poll(timeout_ms):
            directions[fd].read_available(delay_s)
        now = time.monotonic()
        for direction in directions.values():
            direction.send_due(now)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgelab.delayline", description=__doc__)
    parser.add_argument("if_a")
    parser.add_argument("if_b")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    run(args.if_a, args.if_b, args.delay_ms, args.ready_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
