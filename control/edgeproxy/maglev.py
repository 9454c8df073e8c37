"""Maglev consistent-hash tables (Eisenbud et al., NSDI 2016), pure and deterministic.

A table of ``size`` slots (a prime) is filled by letting every machine claim slots
in the order of its own permutation ``(offset + j * skip) % size``; offset and skip
come from hashing the machine's name, so the same names always give the same table
on every edge. Each machine gets ``size / n`` slots give or take one, and removing
one of ``n`` machines re-assigns roughly its ``1/n`` share while the rest stay put.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: slots per machine: with M >= 100 N every machine's share is within ~1% of 1/N
SLOTS_PER_MACHINE = 100
#: largest table (a prime below 2^16): keeps 200k services affordable
MAX_SIZE = 65521


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def table_size(machines: int, per_machine: int = SLOTS_PER_MACHINE,
               max_size: int = MAX_SIZE) -> int:
    """Slots for a table of ``machines``: the smallest prime >= per_machine * machines,
    capped at ``max_size`` (a prime); 1 for a single machine, 0 for none."""
    if machines <= 0:
        return 0
    if machines == 1:
        return 1
    n = min(per_machine * machines, max_size)
    while not is_prime(n):  # terminates: primes are dense; n <= max_size, which is prime
        n += 1
    return n


def _h(name: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=salt).digest(),
                          "little")


def build(names: Sequence[str], size: int) -> list[int]:
    """The table: ``size`` entries, each an index into ``names``.

    ``size`` must be prime (or 1) so every skip walks all slots. Names must be unique.
    """
    n = len(names)
    if n == 0 or size == 0:
        return []
    if len(set(names)) != n:
        raise ValueError("machine names must be unique")
    if size == 1:
        return [0]
    if not is_prime(size):
        raise ValueError(f"table size {size} is not prime")
    offsets = [_h(name, b"ep-maglev-off") % size for name in names]
    skips = [_h(name, b"ep-maglev-skip") % (size - 1) + 1 for name in names]
    nexts = [0] * n
    table = [-1] * size
    filled = 0
    # Each round gives every machine one slot; a machine's walk visits each slot at
    # most once (size prime), so the loop ends after at most size * n probes.
    while filled < size:
        for i in range(n):
            slot = (offsets[i] + nexts[i] * skips[i]) % size
            while table[slot] >= 0:
                nexts[i] += 1
                slot = (offsets[i] + nexts[i] * skips[i]) % size
            table[slot] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                break
    return table
