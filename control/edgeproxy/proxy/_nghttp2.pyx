# cython: language_level=3
# distutils: libraries = nghttp2
"""A sans-IO HTTP/2 session over libnghttp2 (``nghttp2_session``), client or server.

Fed bytes (``receive(data)``, which returns a list of events) and asked for bytes
to send (``data_to_send()``). nghttp2's C callbacks are aggregated here so Python
sees one event per stream step, never one call per header field:

    (EV_REQUEST, stream_id, headers, end_stream)   server: a new stream's header list
    (EV_HEADERS, stream_id, headers, end_stream)   any other header list (response,
                                                   1xx, trailers)
    (EV_DATA, stream_id, data, end_stream)         one DATA frame's payload
    (EV_RESET, stream_id, error_code, 0)           the peer's RST_STREAM
    (EV_CLOSED, stream_id, error_code, 0)          nghttp2 closed the stream
    (EV_SETTINGS, 0, ack, 0)                       the peer's SETTINGS (or its ACK)
    (EV_PING_ACK, 0, opaque, 0)                    the answer to our PING
    (EV_GOAWAY, last_stream_id, error_code, 0)     the peer's GOAWAY
    (EV_WINDOW_UPDATE, stream_id, increment, 0)    the peer opened a window
    (EV_FATAL, 0, abuse_kind_or_None, error_code)  connection error: GOAWAY queued

Flow control. Inbound: HTTP messaging and automatic WINDOW_UPDATEs are off; the
connection window is credited as data arrives (once per ``receive``), a stream's
only when its consumer calls ``consume(stream_id, n)`` (nghttp2 batches the
WINDOW_UPDATE at half a window). Outbound: every stream that has a body gets a
data provider over its own buffer (``send_data``); nghttp2 pulls from it only
what the stream and connection windows allow, an empty buffer defers the stream
(``NGHTTP2_ERR_DEFERRED``) until more is written (``nghttp2_session_resume_data``).
``over(stream_id, limit)`` tells a writer to wait; ``drained()`` names the
streams whose buffers fell back to their limit since the last call.

Abuse bounds (counted by kind in ``abuse``; the connection gets GOAWAY
ENHANCE_YOUR_CALM): "rapid_reset" (the peer's RST_STREAMs beyond a token bucket,
server side), "continuation_flood" (a header block longer than a byte or frame
bound before END_HEADERS), "ping_flood", "settings_flood" (token buckets), and
"flood" (nghttp2's own: too many queued ACKs, empty DATA frames, ...).
"""

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE


cdef extern from "nghttp2/nghttp2.h":
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_option:
        pass
    ctypedef struct nghttp2_priority_spec:
        pass

    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags

    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags

    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        int cat

    ctypedef struct nghttp2_rst_stream:
        nghttp2_frame_hd hd
        uint32_t error_code

    ctypedef struct nghttp2_ping:
        nghttp2_frame_hd hd
        uint8_t opaque_data[8]

    ctypedef struct nghttp2_goaway:
        nghttp2_frame_hd hd
        int32_t last_stream_id
        uint32_t error_code

    ctypedef struct nghttp2_window_update:
        nghttp2_frame_hd hd
        int32_t window_size_increment

    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
        nghttp2_rst_stream rst_stream
        nghttp2_ping ping
        nghttp2_goaway goaway
        nghttp2_window_update window_update

    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value

    ctypedef union nghttp2_data_source:
        int fd
        void *ptr

    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
        uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept

    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback

    ctypedef int (*nghttp2_on_begin_frame_callback)(
        nghttp2_session *session, const nghttp2_frame_hd *hd, void *user_data) noexcept
    ctypedef int (*nghttp2_on_frame_recv_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept
    ctypedef int (*nghttp2_on_begin_headers_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept
    ctypedef int (*nghttp2_on_header_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
        void *user_data) noexcept
    ctypedef int (*nghttp2_on_data_chunk_recv_callback)(
        nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
        size_t len, void *user_data) noexcept
    ctypedef int (*nghttp2_on_stream_close_callback)(
        nghttp2_session *session, int32_t stream_id, uint32_t error_code,
        void *user_data) noexcept

    enum:
        NGHTTP2_DATA
        NGHTTP2_HEADERS
        NGHTTP2_PRIORITY
        NGHTTP2_RST_STREAM
        NGHTTP2_SETTINGS
        NGHTTP2_PUSH_PROMISE
        NGHTTP2_PING
        NGHTTP2_GOAWAY
        NGHTTP2_WINDOW_UPDATE
        NGHTTP2_CONTINUATION

    enum:
        NGHTTP2_FLAG_NONE
        NGHTTP2_FLAG_END_STREAM
        NGHTTP2_FLAG_END_HEADERS
        NGHTTP2_FLAG_ACK

    enum:
        NGHTTP2_HCAT_REQUEST

    enum:
        NGHTTP2_NV_FLAG_NONE

    enum:
        NGHTTP2_DATA_FLAG_NONE
        NGHTTP2_DATA_FLAG_EOF
        NGHTTP2_DATA_FLAG_NO_END_STREAM

    enum:
        NGHTTP2_SETTINGS_HEADER_TABLE_SIZE
        NGHTTP2_SETTINGS_ENABLE_PUSH
        NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        NGHTTP2_SETTINGS_MAX_FRAME_SIZE
        NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL

    enum:
        NGHTTP2_ERR_DEFERRED
        NGHTTP2_ERR_CALLBACK_FAILURE
        NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        NGHTTP2_ERR_FLOODED
        NGHTTP2_ERR_TOO_MANY_CONTINUATIONS

    enum:
        NGHTTP2_NO_ERROR
        NGHTTP2_PROTOCOL_ERROR
        NGHTTP2_ENHANCE_YOUR_CALM

    const char *nghttp2_strerror(int lib_error_code)

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks)
    void nghttp2_session_callbacks_set_on_begin_frame_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_begin_frame_callback cb)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_frame_recv_callback cb)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_begin_headers_callback cb)
    void nghttp2_session_callbacks_set_on_header_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_header_callback cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_data_chunk_recv_callback cb)
    void nghttp2_session_callbacks_set_on_stream_close_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback cb)

    int nghttp2_option_new(nghttp2_option **option_ptr)
    void nghttp2_option_del(nghttp2_option *option)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val)
    void nghttp2_option_set_no_http_messaging(nghttp2_option *option, int val)
    void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val)
    void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val)
    void nghttp2_option_set_stream_reset_rate_limit(
        nghttp2_option *option, uint64_t burst, uint64_t rate)
    void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val)
    void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *option, uint32_t val)
    void nghttp2_option_set_max_send_header_block_length(nghttp2_option *option, size_t val)

    int nghttp2_session_client_new2(
        nghttp2_session **session_ptr, const nghttp2_session_callbacks *callbacks,
        void *user_data, const nghttp2_option *option)
    int nghttp2_session_server_new2(
        nghttp2_session **session_ptr, const nghttp2_session_callbacks *callbacks,
        void *user_data, const nghttp2_option *option)
    void nghttp2_session_del(nghttp2_session *session)

    ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const uint8_t *data, size_t inlen)
    ssize_t nghttp2_session_mem_send(nghttp2_session *session, const uint8_t **data_ptr)
    int nghttp2_session_want_read(nghttp2_session *session)
    int nghttp2_session_want_write(nghttp2_session *session)
    int nghttp2_session_consume_connection(nghttp2_session *session, size_t size)
    int nghttp2_session_consume_stream(nghttp2_session *session, int32_t stream_id, size_t size)
    int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_set_local_window_size(
        nghttp2_session *session, uint8_t flags, int32_t stream_id, int32_t window_size)
    uint32_t nghttp2_session_get_remote_settings(nghttp2_session *session, int id)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session)
    int32_t nghttp2_session_get_stream_remote_window_size(
        nghttp2_session *session, int32_t stream_id)
    int32_t nghttp2_session_get_remote_window_size(nghttp2_session *session)
    int nghttp2_session_terminate_session(nghttp2_session *session, uint32_t error_code)

    int nghttp2_submit_settings(
        nghttp2_session *session, uint8_t flags, const nghttp2_settings_entry *iv, size_t niv)
    int32_t nghttp2_submit_request(
        nghttp2_session *session, const nghttp2_priority_spec *pri_spec, const nghttp2_nv *nva,
        size_t nvlen, const nghttp2_data_provider *data_prd, void *stream_user_data)
    int nghttp2_submit_response(
        nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen,
        const nghttp2_data_provider *data_prd)
    int32_t nghttp2_submit_headers(
        nghttp2_session *session, uint8_t flags, int32_t stream_id,
        const nghttp2_priority_spec *pri_spec, const nghttp2_nv *nva, size_t nvlen,
        void *stream_user_data)
    int nghttp2_submit_trailer(
        nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen)
    int nghttp2_submit_rst_stream(
        nghttp2_session *session, uint8_t flags, int32_t stream_id, uint32_t error_code)
    int nghttp2_submit_ping(nghttp2_session *session, uint8_t flags, const uint8_t *opaque_data)
    int nghttp2_submit_goaway(
        nghttp2_session *session, uint8_t flags, int32_t last_stream_id, uint32_t error_code,
        const uint8_t *opaque_data, size_t opaque_data_len)


EV_REQUEST = 1
EV_HEADERS = 2
EV_DATA = 3
EV_RESET = 4
EV_CLOSED = 5
EV_SETTINGS = 6
EV_PING_ACK = 7
EV_GOAWAY = 8
EV_WINDOW_UPDATE = 9
EV_FATAL = 10

# C-level copies for the callbacks (no module-dict look-ups there).
cdef enum:
    _EV_REQUEST = 1
    _EV_HEADERS = 2
    _EV_DATA = 3
    _EV_RESET = 4
    _EV_CLOSED = 5
    _EV_SETTINGS = 6
    _EV_PING_ACK = 7
    _EV_GOAWAY = 8
    _EV_WINDOW_UPDATE = 9
    _EV_FATAL = 10


class Error(Exception):
    """A call nghttp2 refused (the stream is gone, no stream id left, ...)."""

    def __init__(self, code: int, what: str = "") -> None:
        self.code = code
        super().__init__(f"{what}: {nghttp2_strerror(code).decode()} ({code})" if what else
                         f"{nghttp2_strerror(code).decode()} ({code})")


cdef inline double _now() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct _Bucket:
    double tokens
    double burst  # 0: unbounded
    double rate  # tokens per second
    double last


cdef inline void _bucket_init(_Bucket *b, double burst, double rate) noexcept:
    b.tokens = burst
    b.burst = burst
    b.rate = rate
    b.last = _now()


cdef inline bint _bucket_take(_Bucket *b) noexcept:
    """Take a token; False when none is left (the bound is exceeded)."""
    cdef double now
    if b.burst <= 0:
        return True
    now = _now()
    b.tokens += (now - b.last) * b.rate
    b.last = now
    if b.tokens > b.burst:
        b.tokens = b.burst
    if b.tokens < 1.0:
        return False
    b.tokens -= 1.0
    return True


cdef class _Out:
    """One stream's outbound body: buffered chunks nghttp2 pulls as windows allow."""

    cdef list chunks
    cdef Py_ssize_t index  # first chunk not yet fully taken
    cdef Py_ssize_t offset  # bytes taken of chunks[index]
    cdef Py_ssize_t pending
    cdef Py_ssize_t low  # wake the writer when pending falls to this
    cdef bint eof
    cdef bint deferred
    cdef bint waiting
    cdef object trailers

    def __cinit__(self) -> None:
        self.chunks = []
        self.trailers = None


cdef nghttp2_nv *_nva(list headers, size_t *count) except NULL:
    """An nghttp2_nv array pointing into ``headers``' bytes (nghttp2 copies them)."""
    cdef size_t n = len(headers)
    cdef nghttp2_nv *nva = <nghttp2_nv *>malloc((n if n else 1) * sizeof(nghttp2_nv))
    cdef size_t i = 0
    cdef bytes name, value
    if nva == NULL:
        raise MemoryError()
    try:
        for pair in headers:
            name, value = pair
            nva[i].name = <uint8_t *>PyBytes_AS_STRING(name)
            nva[i].namelen = PyBytes_GET_SIZE(name)
            nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
            nva[i].valuelen = PyBytes_GET_SIZE(value)
            nva[i].flags = NGHTTP2_NV_FLAG_NONE
            i += 1
    except BaseException:
        free(nva)
        raise
    count[0] = n
    return nva


# -- callbacks ----------------------------------------------------------------


cdef ssize_t _read_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length,
                        uint32_t *data_flags, nghttp2_data_source *source,
                        void *user_data) noexcept:
    cdef Session self = <Session>user_data
    cdef _Out out = <_Out>source.ptr
    cdef size_t n = 0
    cdef Py_ssize_t avail, take
    cdef bytes chunk
    cdef size_t nvlen
    cdef nghttp2_nv *nva
    cdef Py_ssize_t count = len(out.chunks)
    while n < length and out.index < count:
        chunk = <bytes>out.chunks[out.index]
        avail = PyBytes_GET_SIZE(chunk) - out.offset
        take = avail if <size_t>avail <= length - n else <Py_ssize_t>(length - n)
        memcpy(buf + n, PyBytes_AS_STRING(chunk) + out.offset, take)
        n += take
        out.offset += take
        if out.offset == PyBytes_GET_SIZE(chunk):
            out.index += 1
            out.offset = 0
    if out.index == count:
        del out.chunks[:]
        out.index = 0
    out.pending -= n
    if out.waiting and out.pending <= out.low:
        out.waiting = False
        self._drained.append(stream_id)
    if out.pending == 0:
        if out.eof:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
            if out.trailers is not None:
                data_flags[0] |= NGHTTP2_DATA_FLAG_NO_END_STREAM
                try:
                    nva = _nva(out.trailers, &nvlen)
                except BaseException:
                    return NGHTTP2_ERR_CALLBACK_FAILURE
                nghttp2_submit_trailer(s, stream_id, nva, nvlen)
                free(nva)
                out.trailers = None
        elif n == 0:
            out.deferred = True
            return NGHTTP2_ERR_DEFERRED
    return <ssize_t>n


cdef int _on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd,
                         void *user_data) noexcept:
    cdef Session self = <Session>user_data
    if hd.type == NGHTTP2_HEADERS or hd.type == NGHTTP2_PUSH_PROMISE:
        self._block_bytes = hd.length
        self._block_frames = 1
    elif hd.type == NGHTTP2_CONTINUATION:
        self._block_bytes += hd.length
        self._block_frames += 1
    else:
        return 0
    if self._block_bytes > self._max_block or self._block_frames > self._max_block_frames:
        self._abuse = "continuation_flood"
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame,
                           void *user_data) noexcept:
    cdef Session self = <Session>user_data
    self._headers = []
    self._list_size = 0
    return 0


cdef int _on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                    size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                    void *user_data) noexcept:
    cdef Session self = <Session>user_data
    self._list_size += namelen + valuelen + 32  # RFC 9113 6.5.2's accounting
    if self._list_size > self._max_list:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE  # that stream is reset, no other
    try:
        self._headers.append((PyBytes_FromStringAndSize(<char *>name, namelen),
                              PyBytes_FromStringAndSize(<char *>value, valuelen)))
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t stream_id,
                        const uint8_t *data, size_t length, void *user_data) noexcept:
    cdef Session self = <Session>user_data
    self._arrived += length
    try:
        self._data.append(PyBytes_FromStringAndSize(<char *>data, length))
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame,
                        void *user_data) noexcept:
    cdef Session self = <Session>user_data
    cdef uint8_t t = frame.hd.type
    cdef bint end = (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) != 0
    cdef list chunks
    try:
        if t == NGHTTP2_DATA:
            chunks = self._data
            if not chunks:
                data = b""
            elif len(chunks) == 1:
                data = chunks[0]
            else:
                data = b"".join(chunks)
            self._data = []
            self._events.append((_EV_DATA, frame.hd.stream_id, data, end))
        elif t == NGHTTP2_HEADERS:
            kind = _EV_REQUEST if frame.headers.cat == NGHTTP2_HCAT_REQUEST else _EV_HEADERS
            self._events.append((kind, frame.hd.stream_id, self._headers, end))
            self._headers = []
        elif t == NGHTTP2_RST_STREAM:
            if self._server and not _bucket_take(&self._resets):
                self._abuse = "rapid_reset"
                return NGHTTP2_ERR_CALLBACK_FAILURE
            self._events.append(
                (_EV_RESET, frame.hd.stream_id, frame.rst_stream.error_code, 0))
        elif t == NGHTTP2_SETTINGS:
            ack = (frame.hd.flags & NGHTTP2_FLAG_ACK) != 0
            if not ack and not _bucket_take(&self._settings):
                self._abuse = "settings_flood"
                return NGHTTP2_ERR_CALLBACK_FAILURE
            self._events.append((_EV_SETTINGS, 0, ack, 0))
        elif t == NGHTTP2_PING:
            if frame.hd.flags & NGHTTP2_FLAG_ACK:
                self._events.append(
                    (_EV_PING_ACK, 0,
                     PyBytes_FromStringAndSize(<char *>frame.ping.opaque_data, 8), 0))
            elif not _bucket_take(&self._pings):
                self._abuse = "ping_flood"
                return NGHTTP2_ERR_CALLBACK_FAILURE
        elif t == NGHTTP2_GOAWAY:
            self._events.append(
                (_EV_GOAWAY, frame.goaway.last_stream_id, frame.goaway.error_code, 0))
        elif t == NGHTTP2_WINDOW_UPDATE:
            self._events.append(
                (_EV_WINDOW_UPDATE, frame.hd.stream_id,
                 frame.window_update.window_size_increment, 0))
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_stream_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept:
    cdef Session self = <Session>user_data
    try:
        self._out.pop(stream_id, None)
        self._events.append((_EV_CLOSED, stream_id, error_code, 0))
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


# -- the session ----------------------------------------------------------------


cdef class Session:
    cdef nghttp2_session *_s
    cdef bint _server
    cdef list _events
    cdef list _headers
    cdef list _data
    cdef list _drained
    cdef dict _out
    cdef size_t _arrived
    cdef size_t _list_size
    cdef size_t _max_list
    cdef size_t _block_bytes
    cdef size_t _max_block
    cdef int _block_frames
    cdef int _max_block_frames
    cdef _Bucket _resets
    cdef _Bucket _pings
    cdef _Bucket _settings
    cdef object _abuse
    cdef char *_buf
    cdef size_t _cap

    def __cinit__(
        self,
        bint client_side,
        *,
        int stream_window=65535,
        int connection_window=65535,
        int max_concurrent_streams=100,
        int max_frame_size=16384,
        bint enable_connect_protocol=False,
        int max_header_list=65536,
        int max_header_block=65536,
        int max_header_frames=16,
        double reset_burst=0,
        double reset_rate=0,
        double ping_burst=0,
        double ping_rate=0,
        double settings_burst=0,
        double settings_rate=0,
        int max_outbound_ack=1000,
    ) -> None:
        cdef nghttp2_session_callbacks *cbs
        cdef nghttp2_option *opt
        cdef nghttp2_settings_entry iv[6]
        cdef int rv, niv
        self._events = []
        self._headers = []
        self._data = []
        self._drained = []
        self._out = {}
        self._abuse = None
        self._server = not client_side
        self._max_list = max_header_list
        self._max_block = max_header_block
        self._max_block_frames = max_header_frames
        _bucket_init(&self._resets, reset_burst, reset_rate)
        _bucket_init(&self._pings, ping_burst, ping_rate)
        _bucket_init(&self._settings, settings_burst, settings_rate)
        self._cap = 64 * 1024
        self._buf = <char *>malloc(self._cap)
        if self._buf == NULL:
            raise MemoryError()

        if nghttp2_session_callbacks_new(&cbs) != 0:
            raise MemoryError()
        nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, _on_begin_frame)
        nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, _on_begin_headers)
        nghttp2_session_callbacks_set_on_header_callback(cbs, _on_header)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, _on_data_chunk)
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, _on_frame_recv)
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, _on_stream_close)
        if nghttp2_option_new(&opt) != 0:
            nghttp2_session_callbacks_del(cbs)
            raise MemoryError()
        nghttp2_option_set_no_auto_window_update(opt, 1)
        # Requests are checked per stream above us (RFC 9113 8.1.1: a malformed
        # request is a stream error answered 400); nghttp2's messaging checks would
        # reset the stream instead, so they are off.
        nghttp2_option_set_no_http_messaging(opt, 1)
        nghttp2_option_set_max_outbound_ack(opt, max_outbound_ack)
        nghttp2_option_set_max_settings(opt, 32)
        # Our own bounds above decide (counted, ENHANCE_YOUR_CALM); nghttp2's
        # are set out of their way.
        nghttp2_option_set_stream_reset_rate_limit(opt, 1 << 62, 1 << 62)
        nghttp2_option_set_max_continuations(opt, 1 << 20)
        nghttp2_option_set_peer_max_concurrent_streams(opt, 100)
        # What we send may be as large as what we accept (nghttp2's default: 64 KiB).
        nghttp2_option_set_max_send_header_block_length(opt, max(max_header_block, 65536))
        if client_side:
            rv = nghttp2_session_client_new2(&self._s, cbs, <void *>self, opt)
        else:
            rv = nghttp2_session_server_new2(&self._s, cbs, <void *>self, opt)
        nghttp2_option_del(opt)
        nghttp2_session_callbacks_del(cbs)
        if rv != 0:
            raise Error(rv, "session")

        iv[0].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        iv[0].value = stream_window
        iv[1].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        iv[1].value = max_concurrent_streams
        iv[2].settings_id = NGHTTP2_SETTINGS_MAX_FRAME_SIZE
        iv[2].value = max_frame_size
        iv[3].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        iv[3].value = max_header_list
        niv = 4
        if client_side:
            iv[niv].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
            iv[niv].value = 0
            niv += 1
        elif enable_connect_protocol:
            iv[niv].settings_id = NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL
            iv[niv].value = 1
            niv += 1
        rv = nghttp2_submit_settings(self._s, NGHTTP2_FLAG_NONE, iv, niv)
        if rv != 0:
            raise Error(rv, "settings")
        if connection_window > 65535:
            rv = nghttp2_session_set_local_window_size(
                self._s, NGHTTP2_FLAG_NONE, 0, connection_window)
            if rv != 0:
                raise Error(rv, "connection window")

    def __dealloc__(self) -> None:
        if self._s != NULL:
            nghttp2_session_del(self._s)
            self._s = NULL
        if self._buf != NULL:
            free(self._buf)
            self._buf = NULL

    @property
    def abuse(self):
        """The abuse bound the peer broke (its kind), or None."""
        return self._abuse

    # -- input -------------------------------------------------------------------
    def receive(self, bytes data):
        """Process bytes from the peer; the events they made, in order."""
        cdef ssize_t rv
        cdef list events
        cdef uint32_t code
        self._events = events = []
        rv = nghttp2_session_mem_recv(
            self._s, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if self._arrived:
            # The connection window is credited on arrival (one call per read).
            nghttp2_session_consume_connection(self._s, self._arrived)
            self._arrived = 0
        if rv < 0:
            if self._abuse is None:
                if rv == NGHTTP2_ERR_FLOODED:
                    self._abuse = "flood"
                elif rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS:
                    self._abuse = "continuation_flood"
            code = NGHTTP2_ENHANCE_YOUR_CALM if self._abuse is not None else NGHTTP2_PROTOCOL_ERROR
            nghttp2_session_terminate_session(self._s, code)
            events.append((_EV_FATAL, 0, self._abuse, code))
        self._events = []
        return events

    # -- output ------------------------------------------------------------------
    def data_to_send(self):
        """Every frame nghttp2 has ready, as one bytes object (b"" if none)."""
        cdef const uint8_t *chunk
        cdef ssize_t n
        cdef size_t used = 0
        cdef char *grown
        while True:
            n = nghttp2_session_mem_send(self._s, &chunk)
            if n <= 0:
                break
            if used + n > self._cap:
                while used + n > self._cap:
                    self._cap *= 2
                grown = <char *>realloc(self._buf, self._cap)
                if grown == NULL:
                    raise MemoryError()
                self._buf = grown
            memcpy(self._buf + used, chunk, n)
            used += n
        if used == 0:
            return b""
        return PyBytes_FromStringAndSize(self._buf, used)

    def drained(self):
        """Streams whose buffers fell to their writer's limit since the last call."""
        cdef list out = self._drained
        if out:
            self._drained = []
        return out

    def want_read(self):
        return nghttp2_session_want_read(self._s) != 0

    def want_write(self):
        return nghttp2_session_want_write(self._s) != 0

    def finished(self):
        """Nothing more to read or write: the connection can close."""
        return (nghttp2_session_want_read(self._s) == 0
                and nghttp2_session_want_write(self._s) == 0)

    # -- streams -----------------------------------------------------------------
    cdef _Out _provider(self, nghttp2_data_provider *prd):
        cdef _Out out = _Out()
        prd.source.ptr = <void *>out
        prd.read_callback = _read_body
        return out

    def submit_request(self, list headers, bint end_stream):
        """Client: open a stream; its id. Without ``end_stream`` the body follows
        through ``send_data``."""
        cdef size_t n
        cdef nghttp2_nv *nva = _nva(headers, &n)
        cdef nghttp2_data_provider prd
        cdef _Out out = None
        cdef int32_t rv
        if not end_stream:
            out = self._provider(&prd)
        rv = nghttp2_submit_request(self._s, NULL, nva, n, NULL if end_stream else &prd, NULL)
        free(nva)
        if rv < 0:
            raise Error(rv, "request")
        if out is not None:
            self._out[rv] = out
        return rv

    def submit_response(self, int32_t stream_id, list headers, bint end_stream):
        """Server: the final response head."""
        cdef size_t n
        cdef nghttp2_nv *nva = _nva(headers, &n)
        cdef nghttp2_data_provider prd
        cdef _Out out = None
        cdef int rv
        if not end_stream:
            out = self._provider(&prd)
        rv = nghttp2_submit_response(self._s, stream_id, nva, n, NULL if end_stream else &prd)
        free(nva)
        if rv < 0:
            raise Error(rv, "response")
        if out is not None:
            self._out[stream_id] = out

    def submit_headers(self, int32_t stream_id, list headers, bint end_stream):
        """A HEADERS frame with no body to follow it here: an interim (1xx) response,
        or trailers on a stream that has no buffered body."""
        cdef size_t n
        cdef nghttp2_nv *nva = _nva(headers, &n)
        cdef int32_t rv = nghttp2_submit_headers(
            self._s, NGHTTP2_FLAG_END_STREAM if end_stream else NGHTTP2_FLAG_NONE,
            stream_id, NULL, nva, n, NULL)
        free(nva)
        if rv < 0:
            raise Error(rv, "headers")

    def submit_trailers(self, int32_t stream_id, list headers):
        """Trailing HEADERS (END_STREAM) after whatever body is still buffered."""
        cdef _Out out = self._out.get(stream_id)
        if out is None or out.eof:
            raise Error(-510, "trailers")  # NGHTTP2_ERR_STREAM_CLOSED
        out.trailers = headers
        out.eof = True
        self._resume(stream_id, out)

    cdef int _resume(self, int32_t stream_id, _Out out) except -1:
        if out.deferred:
            out.deferred = False
            nghttp2_session_resume_data(self._s, stream_id)
        return 0

    def send_data(self, int32_t stream_id, bytes data, bint end_stream=False):
        """Buffer ``data`` for the stream (``end_stream``: then END_STREAM); the
        bytes it now has buffered."""
        cdef _Out out = self._out.get(stream_id)
        if out is None or out.eof:
            raise Error(-510, "data")
        if PyBytes_GET_SIZE(data):
            out.chunks.append(data)
            out.pending += PyBytes_GET_SIZE(data)
        if end_stream:
            out.eof = True
        self._resume(stream_id, out)
        return out.pending

    def over(self, int32_t stream_id, Py_ssize_t limit):
        """Whether the stream has more than ``limit`` bytes buffered; if so it is
        named by ``drained()`` once it is back at ``limit``."""
        cdef _Out out = self._out.get(stream_id)
        if out is None or out.pending <= limit:
            return False
        out.waiting = True
        out.low = limit
        return True

    def pending(self, int32_t stream_id):
        cdef _Out out = self._out.get(stream_id)
        return 0 if out is None else out.pending

    def consume(self, int32_t stream_id, size_t size):
        """The stream's consumer read ``size`` bytes: credit its window (nghttp2
        sends WINDOW_UPDATE once half a window is consumed). Whether frames wait."""
        nghttp2_session_consume_stream(self._s, stream_id, size)
        return nghttp2_session_want_write(self._s) != 0

    def reset(self, int32_t stream_id, uint32_t error_code):
        cdef int rv = nghttp2_submit_rst_stream(self._s, NGHTTP2_FLAG_NONE, stream_id, error_code)
        if rv < 0:
            raise Error(rv, "reset")

    def remote_window(self, int32_t stream_id):
        """What the peer lets us send now on the stream (and the connection)."""
        cdef int32_t w = nghttp2_session_get_stream_remote_window_size(self._s, stream_id)
        cdef int32_t c = nghttp2_session_get_remote_window_size(self._s)
        return max(0, min(w, c))

    def remote_max_streams(self):
        return nghttp2_session_get_remote_settings(
            self._s, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)

    def remote_connect_protocol(self):
        return nghttp2_session_get_remote_settings(
            self._s, NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL) != 0

    # -- connection --------------------------------------------------------------
    def ping(self, bytes opaque):
        if PyBytes_GET_SIZE(opaque) != 8:
            raise ValueError("PING opaque data is 8 bytes")
        cdef int rv = nghttp2_submit_ping(
            self._s, NGHTTP2_FLAG_NONE, <const uint8_t *>PyBytes_AS_STRING(opaque))
        if rv < 0:
            raise Error(rv, "ping")

    def goaway(self, uint32_t error_code=0):
        """GOAWAY naming the last stream we processed; streams below it finish."""
        cdef int rv = nghttp2_submit_goaway(
            self._s, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(self._s),
            error_code, NULL, 0)
        if rv < 0:
            raise Error(rv, "goaway")

    def terminate(self, uint32_t error_code):
        """GOAWAY, then nothing more is read or written once it is sent."""
        nghttp2_session_terminate_session(self._s, error_code)
