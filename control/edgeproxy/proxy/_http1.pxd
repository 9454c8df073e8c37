# The compiled HTTP/1 core's C-level interface, for the compiled lane (_lane.pyx).

cdef class ResponseParser:
    cdef public bytearray buffer
    cdef public bint eof
    cdef public bint keep_alive
    cdef public object trailers
    cdef int state
    cdef int informational
    cdef long long remaining
    cdef bytes method

    cpdef start(self, bytes method)
    cpdef feed(self, bytes data)
    cpdef next_event(self)
    cdef object _read_head(self)
    cdef object _read_length(self)
    cdef bytes _take(self, long long most)
    cdef object _read_chunked(self)
