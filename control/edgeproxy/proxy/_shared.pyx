# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Per-machine in-flight counts in memory every HTTP process of a host shares.

The segment is a file (a memfd the daemon creates, passed to its children) laid
out as a header and an open-addressing table of fixed-size rows:

    header (64 bytes): magic u64, rows u32, processes u32, stride u32, pad
    row (stride bytes): key u64 | total i64 | count[processes] i32 (padded to 8)

``key`` is a 64-bit FNV-1a hash of the machine id (0 = empty row; a hash of 0
is stored as 1). A row is claimed by compare-and-swap on its key and never
freed, so a row index, once found, stays valid for the segment's life (callers
cache it). ``total`` is the host-wide in-flight count of the machine;
``count[p]`` what process ``p`` holds of it, so the supervisor can give back a
crashed process's slots (``reap``).

Every update is a GCC ``__atomic`` builtin. ``try_acquire`` is a CAS loop that
increments ``total`` only while it is below the limit, so the limit holds
exactly across processes; then the process's own count is incremented. Release
does the reverse order (own count, then total): a process that dies between the
two steps leaves ``total`` one too high (a slot lost until the segment is
rebuilt), never one too low, so a crash can only make the limit stricter.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

import mmap as _mmap
import os as _os

cdef extern from *:
    """
    #define EP_LOAD64(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define EP_LOAD32(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define EP_CAS64(p, expected, desired) \
        __atomic_compare_exchange_n((p), (expected), (desired), 0, \
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
    #define EP_CASU64(p, expected, desired) \
        __atomic_compare_exchange_n((p), (expected), (desired), 0, \
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
    #define EP_ADD64(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
    #define EP_ADD32(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
    #define EP_XCHG32(p, v) __atomic_exchange_n((p), (v), __ATOMIC_ACQ_REL)
    """
    int64_t EP_LOAD64(int64_t *p) nogil
    uint64_t EP_LOADU64 "EP_LOAD64"(uint64_t *p) nogil
    int32_t EP_LOAD32(int32_t *p) nogil
    bint EP_CAS64(int64_t *p, int64_t *expected, int64_t desired) nogil
    bint EP_CASU64(uint64_t *p, uint64_t *expected, uint64_t desired) nogil
    int64_t EP_ADD64(int64_t *p, int64_t v) nogil
    int32_t EP_ADD32(int32_t *p, int32_t v) nogil
    int32_t EP_XCHG32(int32_t *p, int32_t v) nogil

cdef enum:
    HEADER = 64
    MAX_PROBE = 64  # rows looked at before a key counts as "no room"
cdef uint64_t MAGIC = 0x31544547445542EE  # "edge budget" v1
cdef uint64_t FNV_OFFSET = 14695981039346656037ULL
cdef uint64_t FNV_PRIME = 1099511628211ULL

cpdef uint64_t key_of(str name):
    """The row key of a machine id: 64-bit FNV-1a of its UTF-8, never 0."""
    cdef bytes data = name.encode()
    cdef const uint8_t[:] view = data
    cdef uint64_t h = FNV_OFFSET
    cdef Py_ssize_t i
    for i in range(view.shape[0]):
        h = (h ^ view[i]) * FNV_PRIME
    return h if h != 0 else 1


def segment_size(int rows, int processes):
    """Bytes of a segment with ``rows`` rows (a power of two) for ``processes``."""
    return HEADER + <Py_ssize_t>rows * _stride(processes)


cdef inline uint32_t _stride(int processes):
    return <uint32_t>((16 + 4 * processes + 7) // 8 * 8)


cdef class SharedBudgets:
    """One process's handle on the segment: it writes column ``process``."""

    cdef object _map
    cdef uint8_t *_base
    cdef uint32_t _rows
    cdef uint32_t _mask
    cdef uint32_t _stride
    cdef readonly int processes
    cdef readonly int process
    cdef readonly int fd

    def __cinit__(self, int fd, int process, Py_ssize_t size=0):
        # size: for fds whose fstat has none (a BPF_F_MMAPABLE array map)
        size = size or _os.fstat(fd).st_size
        if size < HEADER:
            raise ValueError("not a budget segment: too small")
        self._map = _mmap.mmap(fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
        cdef uint8_t[::1] view = self._map
        self._base = &view[0]
        cdef uint64_t *magic = <uint64_t *>self._base
        if magic[0] != MAGIC:
            raise ValueError("not a budget segment: bad magic")
        self._rows = (<uint32_t *>(self._base + 8))[0]
        self.processes = <int>(<uint32_t *>(self._base + 12))[0]
        self._stride = (<uint32_t *>(self._base + 16))[0]
        if size < HEADER + <Py_ssize_t>self._rows * self._stride:
            raise ValueError("budget segment truncated")
        if not 0 <= process < self.processes:
            raise ValueError(f"process {process} outside 0..{self.processes - 1}")
        self._mask = self._rows - 1
        self.process = process
        self.fd = fd

    @staticmethod
    def create(int rows, int processes, str name="edgeproxy-budgets"):
        """A new zeroed segment in a memfd (inheritable, so children can be given
        its fd); the handle writes column 0."""
        if rows < 2 or rows & (rows - 1):
            raise ValueError("rows must be a power of two >= 2")
        if not 1 <= processes <= 1024:
            raise ValueError("processes must be 1..1024")
        fd = _os.memfd_create(name)  # close-on-exec: children get it by pass_fds
        try:
            _os.ftruncate(fd, segment_size(rows, processes))
            header = bytearray(HEADER)
            header[0:8] = int(MAGIC).to_bytes(8, "little")
            header[8:12] = rows.to_bytes(4, "little")
            header[12:16] = processes.to_bytes(4, "little")
            header[16:20] = int(_stride(processes)).to_bytes(4, "little")
            _os.pwrite(fd, bytes(header), 0)
            return SharedBudgets(fd, 0)
        except BaseException:
            _os.close(fd)
            raise

    def close(self):
        """Unmap (the fd stays open: the caller owns it)."""
        if self._map is not None:
            self._base = NULL
            self._map.close()
            self._map = None

    @property
    def rows(self):
        return self._rows

    cdef inline uint8_t *_row(self, Py_ssize_t row) noexcept nogil:
        return self._base + HEADER + row * self._stride

    cdef Py_ssize_t _probe(self, uint64_t key, bint insert) noexcept nogil:
        cdef uint32_t i = <uint32_t>(key ^ (key >> 32)) & self._mask
        cdef int n
        cdef uint64_t seen, expected
        cdef uint64_t *slot
        for n in range(MAX_PROBE):
            slot = <uint64_t *>self._row(i)
            seen = EP_LOADU64(slot)
            if seen == key:
                return i
            if seen == 0:
                if not insert:
                    return -1
                expected = 0
                if EP_CASU64(slot, &expected, key) or expected == key:
                    return i
            i = (i + 1) & self._mask
        return -1

    cpdef Py_ssize_t row(self, str machine_id):
        """The row of a machine (claimed on first use); -1 when the table has no
        room near its hash (callers then count locally)."""
        if self._base == NULL:
            raise ValueError("closed")
        return self._probe(key_of(machine_id), True)

    cpdef Py_ssize_t find(self, str machine_id):
        """The row of a machine, or -1 if no process ever counted it (debug reads)."""
        if self._base == NULL:
            raise ValueError("closed")
        return self._probe(key_of(machine_id), False)

    cpdef int64_t total(self, Py_ssize_t row):
        """Host-wide in-flight count of a row."""
        return EP_LOAD64(<int64_t *>(self._row(row) + 8))

    cpdef bint try_acquire(self, Py_ssize_t row, int64_t limit):
        """Take a slot if the host-wide count is below ``limit``."""
        cdef uint8_t *r = self._row(row)
        cdef int64_t *total = <int64_t *>(r + 8)
        cdef int64_t seen = EP_LOAD64(total)
        while seen < limit:
            if EP_CAS64(total, &seen, seen + 1):
                EP_ADD32(<int32_t *>(r + 16) + self.process, 1)
                return True
        return False

    cpdef void acquire(self, Py_ssize_t row):
        """Take a slot regardless of any limit (a grant already decided)."""
        cdef uint8_t *r = self._row(row)
        EP_ADD64(<int64_t *>(r + 8), 1)
        EP_ADD32(<int32_t *>(r + 16) + self.process, 1)

    cpdef void release(self, Py_ssize_t row):
        """Give back one slot this process holds on the row."""
        cdef uint8_t *r = self._row(row)
        EP_ADD32(<int32_t *>(r + 16) + self.process, -1)
        EP_ADD64(<int64_t *>(r + 8), -1)

    def counts(self, Py_ssize_t row):
        """Per-process counts of a row (index = process)."""
        cdef int32_t *c = <int32_t *>(self._row(row) + 16)
        return [EP_LOAD32(c + p) for p in range(self.processes)]

    def reap(self, int process):
        """Give back every slot ``process`` held (it died): called by the supervisor
        before it starts the replacement. Returns the slots given back."""
        if not 0 <= process < self.processes:
            raise ValueError("no such process")
        cdef Py_ssize_t i
        cdef uint8_t *r
        cdef int32_t held
        cdef int64_t freed = 0
        with nogil:
            for i in range(self._rows):
                r = self._row(i)
                if EP_LOADU64(<uint64_t *>r) == 0:
                    continue
                held = EP_XCHG32(<int32_t *>(r + 16) + process, 0)
                if held:
                    EP_ADD64(<int64_t *>(r + 8), -held)
                    freed += held
        return freed

    def used_rows(self):
        """Rows claimed so far (a linear scan: for metrics and tests)."""
        cdef Py_ssize_t i, n = 0
        for i in range(self._rows):
            if EP_LOADU64(<uint64_t *>self._row(i)) != 0:
                n += 1
        return n
