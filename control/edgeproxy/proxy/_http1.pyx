# cython: language_level=3
"""The compiled HTTP/1 core: the byte work of one request on its common path.

- ``parse_head``: a client's request head, with every strictness rule of
  ``framing.reference_parse_head`` (its pure-Python twin, kept as the readable
  specification; ``tests/unit`` hold the two equal on generated heads).
- ``forward_head``: the head a machine receives (``headers.forward_request_headers``
  then ``machines.serialize_head``, in one pass and one allocation).
- ``response_head``: a machine's response head split and checked
  (``responses.reference_response_head`` is its twin).
- ``client_head``: the head a client receives (``headers.client_response_headers``,
  ``frontend_h1.response_framing`` and ``frontend_h1.head_bytes`` in one pass).

Python keeps every decision that is policy (routing, admission, retries); this
module only turns bytes into checked fields and fields into bytes. The limits it
enforces are defined here once and imported by the Python twins.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

from http import HTTPStatus

from edgeproxy.proxy.messages import (
    END,
    NEED_DATA,
    Data,
    HttpError,
    RequestHead,
    ResponseError,
    ResponseHead,
)

# -- limits (one definition; framing.py and responses.py import them) --------------
# A request line longer than this is 414; a request head (line + fields) longer, 431.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
MAX_CONTENT_LENGTH_DIGITS = 18
# A machine's response head longer than this is a bad response (502).
MAX_RESPONSE_HEAD = 64 * 1024
# A chunk-size line, and a trailer section, longer than these are bad responses.
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 64 * 1024
# No machine sends a chunk of 2^62 bytes; a size above is garbage (and would not fit).
MAX_CHUNK_SIZE = (1 << 62) - 1
# Interim responses allowed before the final one: a machine must not be able to keep
# a request (and the client) busy with 1xx forever. More is a bad response (502).
MAX_INFORMATIONAL = 8
# ``trailers`` when a response had none: shared, so the common case allocates nothing.
NO_TRAILERS = ()

cdef Py_ssize_t _MAX_REQUEST_LINE = MAX_REQUEST_LINE
cdef Py_ssize_t _MAX_HEADERS = MAX_HEADERS
cdef Py_ssize_t _MAX_CL_DIGITS = MAX_CONTENT_LENGTH_DIGITS


class UnsendableRequest(Exception):
    """A request that cannot be written as HTTP/1.1 without changing its meaning
    (a CR, LF or NUL would split the head; a space would split the request line)."""


# -- character classes (RFC 9110 5.6.2 tchar; 5.5 field-value bytes) -----------------
cdef unsigned char TCHAR[256]
cdef unsigned char TARGET[256]  # VCHAR / obs-text: no SP, no CTL
cdef unsigned char FVALUE[256]  # HTAB, SP, VCHAR, obs-text: no other CTL, no DEL


cdef void _init_classes():
    cdef int c
    cdef bytes extra = b"!#$%&'*+-.^_`|~"
    for c in range(256):
        TCHAR[c] = 1 if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else 0
        TARGET[c] = 1 if (0x21 <= c <= 0x7E or c >= 0x80) else 0
        FVALUE[c] = 1 if (c == 9 or 0x20 <= c <= 0x7E or c >= 0x80) else 0
    for c in extra:
        TCHAR[c] = 1


_init_classes()

cdef bytes V10 = b"1.0"
cdef bytes V11 = b"1.1"
cdef bytes M_GET = b"GET"
cdef bytes M_HEAD = b"HEAD"
cdef bytes M_POST = b"POST"
# Names that are seen on almost every request: one shared object each, so later
# comparisons against the same constants are identity checks.
cdef dict _COMMON_NAMES = {
    n: n
    for n in (
        b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language",
        b"connection", b"content-length", b"content-type", b"cookie", b"referer",
        b"x-forwarded-for", b"via", b"cache-control", b"authorization", b"origin",
        b"server", b"date", b"transfer-encoding", b"etag", b"last-modified",
        b"location", b"set-cookie", b"vary", b"content-encoding", b"expires",
    )
}


cdef inline bint _is_token(const unsigned char* p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    if n == 0:
        return False
    for i in range(n):
        if not TCHAR[p[i]]:
            return False
    return True


cdef inline bint _name_is(const unsigned char* p, Py_ssize_t n, const char* lit,
                          Py_ssize_t litn) noexcept:
    return n == litn and memcmp(p, lit, n) == 0


cdef bytes _lower(const unsigned char* p, Py_ssize_t n):
    """A lower-cased copy of a token (ASCII only: tokens have no other letters).

    Lowered in a buffer of our own before the bytes object exists: CPython hands
    out one shared object for every 1-byte bytes value, so writing into a fresh
    bytes object in place would change b"X" everywhere in the process."""
    cdef unsigned char small[256]
    cdef unsigned char* q = small
    cdef Py_ssize_t i
    cdef bytes out
    if n > 256:
        q = <unsigned char*>malloc(n)
        if q == NULL:
            raise MemoryError()
    try:
        for i in range(n):
            q[i] = p[i] + 32 if 65 <= p[i] <= 90 else p[i]
        out = PyBytes_FromStringAndSize(<const char*>q, n)
    finally:
        if q != small:
            free(q)
    cached = _COMMON_NAMES.get(out)
    return <bytes>cached if cached is not None else out


cdef list _comma_items(list values):
    """RFC 9110 5.6.1 lists as ``framing._comma_list`` reads them: every item,
    empty ones included, stripped of SP/HTAB and lower-cased."""
    cdef list items = []
    for value in values:
        for item in (<bytes>value).split(b","):
            items.append(item.strip(b" \t").lower())
    return items


# -- request heads ---------------------------------------------------------------------
def parse_head(bytes block not None):
    """A whole request head (request line and fields, without the blank line),
    validated and with its framing decided; HttpError for anything malformed."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(block)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(block)
    cdef Py_ssize_t i, line_end, start, end, colon, vs, ve, nlines
    cdef bint bare_lf = False, bare_cr = False
    cdef unsigned char c
    # Every CR and every LF must belong to a CRLF.
    nlines = 1
    for i in range(n):
        c = b[i]
        if c == 10:
            if i == 0 or b[i - 1] != 13:
                bare_lf = True
        elif c == 13:
            if i + 1 >= n or b[i + 1] != 10:
                bare_cr = True
            else:
                nlines += 1
    if bare_lf:
        raise HttpError(400, "bare LF line ending")
    if bare_cr:
        raise HttpError(400, "bare CR")
    # The request line.
    line_end = 0
    while line_end < n and b[line_end] != 13:
        line_end += 1
    if line_end > _MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    method, target, version = _request_line(b, line_end)
    if nlines - 1 > _MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    # The field lines.
    cdef list headers = []
    cdef int hosts = 0
    cdef list lengths = None
    cdef list codings = None
    cdef list connection = None
    expect = None
    start = line_end + 2
    while start <= n and line_end < n:
        end = start
        while end < n and b[end] != 13:
            end += 1
        colon = start
        while colon < end and b[colon] != 58:  # ':'
            colon += 1
        vs = colon + 1
        ve = end
        while vs < ve and (b[vs] == 32 or b[vs] == 9):
            vs += 1
        while ve > vs and (b[ve - 1] == 32 or b[ve - 1] == 9):
            ve -= 1
        if colon == end or not _is_token(b + start, colon - start):
            if start < end and (b[start] == 32 or b[start] == 9):
                raise HttpError(400, "obs-fold header continuation")
            raise HttpError(400, "bad header name")
        for i in range(vs, ve):
            if not FVALUE[b[i]]:
                raise HttpError(400, "bad header value")
        name = _lower(b + start, colon - start)
        value = PyBytes_FromStringAndSize(<const char*>b + vs, ve - vs)
        headers.append((name, value))
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if lengths is None:
                lengths = []
            lengths.append(value)
        elif name == b"transfer-encoding":
            if codings is None:
                codings = []
            codings.append(value)
        elif name == b"connection":
            if connection is None:
                connection = []
            connection.append(value)
        elif name == b"expect" and expect is None:
            expect = value
        line_end = end
        start = end + 2
    return _framed(method, target, version, headers, hosts, lengths, codings, connection,
                   expect)


cdef tuple _request_line(const unsigned char* b, Py_ssize_t n):
    cdef Py_ssize_t i, sp1 = -1, sp2 = -1, spaces = 0
    for i in range(n):
        if b[i] == 32:
            spaces += 1
            if sp1 < 0:
                sp1 = i
            elif sp2 < 0:
                sp2 = i
    if spaces != 2:
        raise HttpError(400, "malformed request line")
    if not _is_token(b, sp1):
        raise HttpError(400, "bad method")
    cdef Py_ssize_t tn = sp2 - sp1 - 1
    if tn == 0:
        raise HttpError(400, "bad request target")
    for i in range(sp1 + 1, sp2):
        if not TARGET[b[i]]:
            raise HttpError(400, "bad request target")
    cdef const unsigned char* v = b + sp2 + 1
    cdef Py_ssize_t vn = n - sp2 - 1
    if (vn != 8 or memcmp(v, b"HTTP/", 5) != 0 or not (48 <= v[5] <= 57) or v[6] != 46
            or not (48 <= v[7] <= 57)):
        raise HttpError(400, "bad HTTP version")
    if v[5] != 49:
        raise HttpError(505, "HTTP version not supported")
    version = V10 if v[7] == 48 else V11
    if _name_is(b, sp1, b"GET", 3):
        method = M_GET
    elif _name_is(b, sp1, b"HEAD", 4):
        method = M_HEAD
    elif _name_is(b, sp1, b"POST", 4):
        method = M_POST
    else:
        if _name_is(b, sp1, b"CONNECT", 7):
            raise HttpError(405, "CONNECT not supported")
        method = PyBytes_FromStringAndSize(<const char*>b, sp1)
    cdef const unsigned char* t = b + sp1 + 1
    if not (t[0] == 47  # '/'
            or (tn >= 7 and memcmp(t, b"http://", 7) == 0)
            or (tn >= 8 and memcmp(t, b"https://", 8) == 0)
            or (tn == 1 and t[0] == 42 and method == b"OPTIONS")):
        raise HttpError(400, "bad request target form")
    target = PyBytes_FromStringAndSize(<const char*>t, tn)
    return method, target, version


cdef object _framed(bytes method, bytes target, bytes version, list headers, int hosts,
                    list lengths, list codings, list connection, object expect):
    """``framing.interpret_framing``: body framing decided, every ambiguous shape
    (the smuggling defences) refused."""
    cdef bint v10 = version is V10
    if not v10 and hosts != 1:
        raise HttpError(400, "exactly one Host header required")
    if hosts > 1:
        raise HttpError(400, "duplicate Host header")
    if codings is not None and lengths is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    cdef bint chunked = False
    content_length = None
    if codings is not None:
        if v10:
            raise HttpError(400, "Transfer-Encoding in HTTP/1.0")
        if _comma_items(codings) != [b"chunked"]:
            raise HttpError(501, "unsupported Transfer-Encoding")
        chunked = True
    cdef const unsigned char* p
    cdef Py_ssize_t i, ln
    if lengths is not None:
        if len(lengths) != 1:
            raise HttpError(400, "duplicate Content-Length")
        value = <bytes>lengths[0]
        ln = PyBytes_GET_SIZE(value)
        p = <const unsigned char*>PyBytes_AS_STRING(value)
        if ln == 0 or ln > _MAX_CL_DIGITS:
            raise HttpError(400, "bad Content-Length")
        for i in range(ln):
            if not (48 <= p[i] <= 57):
                raise HttpError(400, "bad Content-Length")
        content_length = int(value)
    cdef bint keep_alive
    if connection is None:
        keep_alive = not v10
    else:
        tokens = _comma_items(connection)
        keep_alive = (b"keep-alive" in tokens) if v10 else (b"close" not in tokens)
    cdef bint expect_continue = expect is not None and expect.lower() == b"100-continue"
    return RequestHead(method, target, version, headers, content_length, chunked,
                       keep_alive, expect_continue)


# -- output buffer -----------------------------------------------------------------------
cdef struct Buf:
    char* data
    Py_ssize_t size
    Py_ssize_t cap
    bint heap
    bint bad  # a CR, LF or NUL arrived in a piece that must not carry one


cdef int _grow(Buf* buf, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = buf.cap * 2
    while cap < buf.size + need:
        cap *= 2
    cdef char* data
    if buf.heap:
        data = <char*>realloc(buf.data, cap)
    else:
        data = <char*>malloc(cap)
        if data != NULL:
            memcpy(data, buf.data, buf.size)
    if data == NULL:
        raise MemoryError()
    buf.data = data
    buf.cap = cap
    buf.heap = True
    return 0


cdef inline int _add(Buf* buf, const char* p, Py_ssize_t n) except -1:
    if buf.size + n > buf.cap:
        _grow(buf, n)
    memcpy(buf.data + buf.size, p, n)
    buf.size += n
    return 0


cdef inline int _add_checked(Buf* buf, bytes piece) except -1:
    """A piece from outside (a field, the target): CR, LF and NUL mark the buffer bad."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(piece)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(piece), i
    for i in range(n):
        if p[i] == 13 or p[i] == 10 or p[i] == 0:
            buf.bad = True
    return _add(buf, <const char*>p, n)


cdef inline int _add_field(Buf* buf, bytes name, bytes value) except -1:
    _add_checked(buf, name)
    _add(buf, b": ", 2)
    _add_checked(buf, value)
    return _add(buf, b"\r\n", 2)


cdef int _add_list(Buf* buf, bytes name, list prior, bytes last) except -1:
    """``name: prior[0], prior[1], ..., last``: a list field the proxy extends
    (X-Forwarded-For, Via) with the values the client sent first."""
    _add_checked(buf, name)
    _add(buf, b": ", 2)
    if prior is not None:
        for value in prior:
            _add_checked(buf, <bytes>value)
            _add(buf, b", ", 2)
    _add_checked(buf, last)
    return _add(buf, b"\r\n", 2)


cdef bytes _take(Buf* buf):
    out = PyBytes_FromStringAndSize(buf.data, buf.size)
    if buf.heap:
        free(buf.data)
        buf.heap = False
    return out


# -- header rules --------------------------------------------------------------------------
cdef inline bint _hop_by_hop(bytes name) noexcept:
    """RFC 9110 7.6.1 hop-by-hop fields, and the legacy ones (``headers.HOP_BY_HOP``)."""
    cdef const char* p = PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    if n == 2:
        return memcmp(p, b"te", 2) == 0
    if n == 7:
        return memcmp(p, b"trailer", 7) == 0 or memcmp(p, b"upgrade", 7) == 0
    if n == 10:
        return memcmp(p, b"connection", 10) == 0 or memcmp(p, b"keep-alive", 10) == 0
    if n == 14:
        return memcmp(p, b"http2-settings", 14) == 0
    if n == 16:
        return memcmp(p, b"proxy-connection", 16) == 0
    if n == 17:
        return memcmp(p, b"transfer-encoding", 17) == 0
    if n == 18:
        return memcmp(p, b"proxy-authenticate", 18) == 0
    if n == 19:
        return memcmp(p, b"proxy-authorization", 19) == 0
    return False


cdef inline bint _own(bytes name) noexcept:
    """In our namespace (``headers.OWN_PREFIX``): a client may not send it."""
    return PyBytes_GET_SIZE(name) >= 10 and memcmp(PyBytes_AS_STRING(name), b"edgeproxy-", 10) == 0


cdef inline bint _directive(bytes name) noexcept:
    """A machine's field meant for the proxy (``headers._PROXY_DIRECTIVES``)."""
    if not _own(name):
        return False
    cdef const char* p = PyBytes_AS_STRING(name) + 10
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name) - 10
    return ((n == 6 and memcmp(p, b"replay", 6) == 0)
            or (n == 10 and memcmp(p, b"request-id", 10) == 0)
            or (n == 14 and memcmp(p, b"upstream-error", 14) == 0)
            or (n == 6 and memcmp(p, b"target", 6) == 0)
            or (n == 3 and memcmp(p, b"app", 3) == 0))


cdef set _named_by_connection(list headers):
    """The field names a Connection header lists (``headers._connection_tokens``);
    None when there is no Connection header (the common case)."""
    cdef set named = None
    for field in headers:
        if (<tuple>field)[0] == b"connection":
            for token in (<bytes>(<tuple>field)[1]).split(b","):
                token = token.strip(b" \t")
                # A token of other whitespace only (VT, FF, CR, LF) names nothing.
                if token and token.strip():
                    if named is None:
                        named = set()
                    named.add(token.lower())
    return named


def forward_head(head, bytes ip not None, bytes scheme not None, bytes port not None,
                 bytes protocol not None, bytes region not None, bytes request_id not None,
                 long long content_length=-1):
    """The request head bytes a machine on this host receives for ``head``: Host
    first, hop-by-hop and our own namespace stripped, X-Forwarded-*, Via, client IP,
    edge region and request id added, then ``content-length`` when the request
    carries a body of that many bytes (``content_length >= 0``), as
    ``machines.serialize_head`` frames one. UnsendableRequest if a piece would split
    the head."""
    cdef list headers = head.headers
    cdef bytes method = head.method
    cdef bytes target = head.target
    cdef char stack[4096]
    cdef Buf buf
    buf.data = stack
    buf.size = 0
    buf.cap = sizeof(stack)
    buf.heap = False
    buf.bad = False
    cdef set named = _named_by_connection(headers)
    cdef list prior_xff = None
    cdef list prior_via = None
    cdef Py_ssize_t i, count = PyList_GET_SIZE(headers)
    cdef tuple field
    cdef bytes name, value
    try:
        _add_checked(&buf, method)
        _add(&buf, b" ", 1)
        _add_checked(&buf, target)
        _add(&buf, b" HTTP/1.1\r\n", 11)
        for i in range(count):
            field = <tuple>PyList_GET_ITEM(headers, i)
            if field[0] == b"host":
                _add_field(&buf, b"host", <bytes>field[1])
                break
        for i in range(count):
            field = <tuple>PyList_GET_ITEM(headers, i)
            name = <bytes>PyTuple_GET_ITEM(field, 0)
            if name == b"host" or _hop_by_hop(name) or _own(name):
                continue
            if named is not None and name in named:
                continue
            value = <bytes>PyTuple_GET_ITEM(field, 1)
            if name == b"x-forwarded-for":
                if prior_xff is None:
                    prior_xff = []
                prior_xff.append(value)
            elif name == b"via":
                if prior_via is None:
                    prior_via = []
                prior_via.append(value)
            elif (name != b"x-forwarded-proto" and name != b"x-forwarded-port"
                    and name != b"expect" and name != b"content-length"):
                # 100-continue is answered here; a body is framed by the edge itself
                # (headers.forward_request_headers says why).
                _add_field(&buf, name, value)
        _add_list(&buf, b"x-forwarded-for", prior_xff, ip)
        _add_field(&buf, b"x-forwarded-proto", scheme)
        _add_field(&buf, b"x-forwarded-port", port)
        _add_list(&buf, b"via", prior_via, protocol + b" edgeproxy")
        _add_field(&buf, b"edgeproxy-client-ip", ip)
        _add_field(&buf, b"edgeproxy-edge-region", region)
        _add_field(&buf, b"edgeproxy-request-id", request_id)
        if content_length >= 0:
            length = b"content-length: %d\r\n" % content_length
            _add(&buf, PyBytes_AS_STRING(length), PyBytes_GET_SIZE(length))
        _add(&buf, b"\r\n", 2)
        if buf.bad:
            raise UnsendableRequest("CR, LF or NUL in the request line or a header field")
        if b" " in target or b" " in method:
            raise UnsendableRequest("space in the request line")
        return _take(&buf)
    finally:
        if buf.heap:
            free(buf.data)


# -- response heads --------------------------------------------------------------------
def response_head(bytes block not None):
    """A machine's response head (status line and fields, without the blank line):
    ``(ResponseHead, framing)`` where ``framing`` lists the Connection,
    Transfer-Encoding and Content-Length fields in order; ResponseError if the
    status line or any field line is malformed."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(block)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(block)
    cdef Py_ssize_t i, line_end
    line_end = 0
    while line_end < n and not (b[line_end] == 13 and line_end + 1 < n and b[line_end + 1] == 10):
        line_end += 1
    status, reason, version = _status_line(b, line_end, block)
    for i in range(n):
        if b[i] == 0:
            raise ResponseError("NUL in response head")
    cdef list headers = []
    cdef list framing = []
    if line_end < n:
        _field_section(b, line_end + 2, n, headers, framing, "response header section")
    return ResponseHead(status, reason, headers, version), framing


cdef int _field_section(const unsigned char* b, Py_ssize_t start, Py_ssize_t n, list headers,
                        list framing, str what) except -1:
    """The field lines of ``b[start:n]`` (CRLF between lines, none after the last)
    into ``headers`` as (lower-case name, value without surrounding OWS); the
    Connection, Transfer-Encoding and Content-Length ones into ``framing`` too
    (when given). ResponseError naming ``what`` if any line is not a whole field."""
    cdef Py_ssize_t end, colon, vs, ve
    while True:
        end = start
        while end < n and b[end] != 13 and b[end] != 10:
            end += 1
        if end < n and not (b[end] == 13 and end + 1 < n and b[end + 1] == 10):
            raise ResponseError(f"malformed {what}")
        colon = start
        while colon < end and b[colon] != 58:
            colon += 1
        if colon == end or not _is_token(b + start, colon - start):
            raise ResponseError(f"malformed {what}")
        vs = colon + 1
        while vs < end and (b[vs] == 32 or b[vs] == 9):
            vs += 1
        ve = end
        while ve > vs and (b[ve - 1] == 32 or b[ve - 1] == 9):
            ve -= 1
        name = _lower(b + start, colon - start)
        field = (name, PyBytes_FromStringAndSize(<const char*>b + vs, ve - vs))
        headers.append(field)
        if framing is not None and (name == b"connection" or name == b"transfer-encoding"
                                    or name == b"content-length"):
            framing.append(field)
        if end >= n:
            return 0
        start = end + 2


cdef tuple _status_line(const unsigned char* b, Py_ssize_t n, bytes block):
    """``HTTP/1.[01] SP 3DIGIT [SP reason]``; the reason may hold no CR or LF."""
    cdef Py_ssize_t i
    if (n < 12 or memcmp(b, b"HTTP/1.", 7) != 0 or not (b[7] == 48 or b[7] == 49)
            or b[8] != 32 or not (48 <= b[9] <= 57 and 48 <= b[10] <= 57 and 48 <= b[11] <= 57)
            or (n > 12 and b[12] != 32)):
        raise ResponseError(f"bad status line {block[:min(n, 80)]!r}")
    for i in range(12, n):
        if b[i] == 13 or b[i] == 10:
            raise ResponseError(f"bad status line {block[:min(n, 80)]!r}")
    status = (b[9] - 48) * 100 + (b[10] - 48) * 10 + (b[11] - 48)
    reason = PyBytes_FromStringAndSize(<const char*>b + 13, n - 13) if n > 12 else b""
    return status, reason, V10 if b[7] == 48 else V11


def client_head(response, request, bytes request_id not None, bint close=False,
                bint check_replay=True):
    """The final response head a client on HTTP/1.x receives, as
    ``(bytes, chunked, keep)``: the machine's fields without hop-by-hop fields and
    proxy directives, our request id, and framing for ``request`` (RFC 9112 6.3).
    None if the machine asked for a replay (``edgeproxy-replay``) and
    ``check_replay``: the caller decides, and asks again without the check if the
    directive is not one it follows."""
    cdef list headers = response.headers
    cdef int status = response.status
    cdef bytes reason = response.reason
    cdef set named = _named_by_connection(headers)
    cdef bint has_length = False
    cdef Py_ssize_t i, count = PyList_GET_SIZE(headers)
    cdef tuple field
    cdef bytes name
    cdef char stack[4096]
    cdef Buf buf
    if check_replay:
        for i in range(count):
            field = <tuple>PyList_GET_ITEM(headers, i)
            if <bytes>PyTuple_GET_ITEM(field, 0) == b"edgeproxy-replay":
                return None
    if not reason:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
    buf.data = stack
    buf.size = 0
    buf.cap = sizeof(stack)
    buf.heap = False
    buf.bad = False
    try:
        _add(&buf, b"HTTP/1.1 ", 9)
        status_text = b"%d " % status
        _add(&buf, PyBytes_AS_STRING(status_text), PyBytes_GET_SIZE(status_text))
        _add(&buf, PyBytes_AS_STRING(reason), PyBytes_GET_SIZE(reason))
        _add(&buf, b"\r\n", 2)
        for i in range(count):
            field = <tuple>PyList_GET_ITEM(headers, i)
            name = <bytes>PyTuple_GET_ITEM(field, 0)
            if _hop_by_hop(name) or _directive(name):
                continue
            if named is not None and name in named:
                continue
            if name == b"content-length":
                has_length = True
            _add_field(&buf, name, <bytes>PyTuple_GET_ITEM(field, 1))
        _add_field(&buf, b"edgeproxy-request-id", request_id)
        no_body = request.method == b"HEAD" or status == 204 or status == 304 or status < 200
        chunked = not no_body and not has_length and request.http_version == b"1.1"
        keep = request.keep_alive and not close and (no_body or has_length or chunked)
        if chunked:
            _add(&buf, b"transfer-encoding: chunked\r\n", 28)
        if not keep:
            _add(&buf, b"connection: close\r\n", 19)
        elif request.http_version == b"1.0":
            _add(&buf, b"connection: keep-alive\r\n", 24)
        _add(&buf, b"\r\n", 2)
        return _take(&buf), chunked, keep
    finally:
        if buf.heap:
            free(buf.data)


# -- response framing --------------------------------------------------------------------
# Parser states.
cdef enum:
    S_HEAD, S_LENGTH, S_CHUNK_SIZE, S_CHUNK_DATA, S_CHUNK_CRLF, S_TRAILERS, S_UNTIL_CLOSE, \
        S_DONE, S_END_PENDING


cdef list _tokens(list fields, bytes name):
    """The comma-separated tokens of every ``name`` field, lower-case, empties dropped."""
    cdef list tokens = []
    for k, v in fields:
        if k == name:
            for t in v.split(b","):
                t = t.strip(b" \t")
                if t:
                    tokens.append(t.lower())
    return tokens


cdef inline Py_ssize_t _find_crlf(const unsigned char* b, Py_ssize_t n, bint double) noexcept:
    """Index of the first CRLF (CRLFCRLF if ``double``) in ``b[:n]``, or -1."""
    cdef Py_ssize_t i
    cdef Py_ssize_t need = 4 if double else 2
    for i in range(n - need + 1):
        if b[i] == 13 and b[i + 1] == 10 and (not double or (b[i + 2] == 13 and b[i + 3] == 10)):
            return i
    return -1


cdef class ResponseParser:
    """A machine's responses on one connection, framed exactly as RFC 9112 6.3 says
    (HEAD, 1xx, 204 and 304 carry no body; chunked; Content-Length; else until the
    machine closes). Feed bytes, take events: ResponseHead (1xx first, at most
    ``MAX_INFORMATIONAL``), Data*, END; ResponseError for anything malformed.
    ``start(method)`` before each request's response; ``keep_alive`` tells whether
    the connection may carry another; ``trailers`` holds a chunked body's trailer
    fields (names lower-case) once END was returned. ``responses.ReferenceParser``
    is the readable twin; tests hold the two equal on generated streams."""

    def __init__(self):
        self.buffer = bytearray()
        self.state = S_DONE
        self.remaining = 0
        self.method = b"GET"
        self.informational = 0
        self.keep_alive = True
        self.eof = False
        self.trailers = NO_TRAILERS

    cpdef start(self, bytes method):
        self.state = S_HEAD
        self.method = method
        self.informational = 0
        self.keep_alive = True
        self.trailers = NO_TRAILERS

    @property
    def done(self):
        return self.state == S_DONE

    cpdef feed(self, bytes data):
        if data:
            self.buffer += data
        else:
            self.eof = True

    cpdef next_event(self):
        cdef int state = self.state
        if state == S_HEAD:
            return self._read_head()
        if state == S_LENGTH:
            return self._read_length()
        if state == S_UNTIL_CLOSE:
            if self.buffer:
                chunk = bytes(self.buffer)
                self.buffer.clear()
                return Data(chunk)
            if self.eof:
                self.state = S_DONE
                return END
            return NEED_DATA
        if state == S_END_PENDING:
            self.state = S_DONE
            return END
        if S_CHUNK_SIZE <= state <= S_TRAILERS:
            event = self._read_chunked()
            if event is NEED_DATA and self.eof:
                raise ResponseError("machine closed inside a chunked body")
            return event
        return NEED_DATA

    cdef object _read_head(self):
        cdef bytearray buf = self.buffer
        cdef Py_ssize_t n = len(buf)
        cdef Py_ssize_t end = _find_crlf(<const unsigned char*>PyByteArray_AS_STRING(buf), n, True)
        if end < 0:
            if n > MAX_RESPONSE_HEAD:
                raise ResponseError("response head too large")
            if self.eof:
                raise ResponseError("machine closed before the response head")
            return NEED_DATA
        if end + 4 > MAX_RESPONSE_HEAD:
            raise ResponseError("response head too large")
        block = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), end)
        del buf[: end + 4]
        head, framing = response_head(block)
        cdef int status = head.status
        cdef list connection = _tokens(framing, b"connection") if framing else []
        if head.http_version == V10:
            self.keep_alive = b"keep-alive" in connection
        else:
            self.keep_alive = b"close" not in connection
        if status < 200:
            if status == 101:
                self.state = S_DONE  # the connection is a tunnel now
                self.keep_alive = False
            else:  # other 1xx: the final response follows; stay in S_HEAD
                self.informational += 1
                if self.informational > MAX_INFORMATIONAL:
                    raise ResponseError("too many interim (1xx) responses from machine")
            return head
        if self.method == M_HEAD or status == 204 or status == 304:
            self.state = S_END_PENDING
            return head
        cdef list codings = []
        cdef list lengths = []
        for name, value in framing:
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings = _tokens(framing, b"transfer-encoding")
        if codings:
            if codings != [b"chunked"]:
                raise ResponseError("unsupported Transfer-Encoding from machine")
            if lengths:
                self.keep_alive = False  # RFC 9112 6.3: TE wins, then close
            self.state = S_CHUNK_SIZE
        elif lengths:
            self.remaining = _content_length(lengths)
            self.state = S_LENGTH
        else:
            self.state = S_UNTIL_CLOSE
            self.keep_alive = False
        return head

    cdef object _read_length(self):
        cdef long long remaining = self.remaining
        if remaining == 0:
            self.state = S_DONE
            return END
        cdef bytearray buf = self.buffer
        if not buf:
            if self.eof:
                raise ResponseError("machine closed inside the body")
            return NEED_DATA
        chunk = self._take(remaining)
        self.remaining = remaining - len(chunk)
        return Data(chunk)

    cdef bytes _take(self, long long most):
        """Up to ``most`` bytes off the front of the buffer."""
        cdef bytearray buf = self.buffer
        cdef Py_ssize_t n = len(buf)
        if n <= most:
            chunk = bytes(buf)
            # clear(), not del buf[:]: a deleted prefix only moves the bytearray's
            # start, and the next feed then copies into a new block every time
            # (a 100 MB body went 3.4x slower).
            buf.clear()
        else:
            chunk = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), <Py_ssize_t>most)
            del buf[:most]
        return chunk

    cdef object _read_chunked(self):
        cdef bytearray buf = self.buffer
        cdef Py_ssize_t end
        cdef long long size
        while True:
            if self.state == S_CHUNK_SIZE:
                end = _find_crlf(<const unsigned char*>PyByteArray_AS_STRING(buf), len(buf), False)
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise ResponseError("bad chunk size line from machine")
                    return NEED_DATA
                size = _chunk_size(<const unsigned char*>PyByteArray_AS_STRING(buf), end)
                del buf[: end + 2]
                if size == 0:
                    self.state = S_TRAILERS
                else:
                    self.remaining = size
                    self.state = S_CHUNK_DATA
            elif self.state == S_CHUNK_DATA:
                if not buf:
                    return NEED_DATA
                chunk = self._take(self.remaining)
                self.remaining -= len(chunk)
                if self.remaining == 0:
                    self.state = S_CHUNK_CRLF
                return Data(chunk)
            elif self.state == S_CHUNK_CRLF:
                if len(buf) < 2:
                    return NEED_DATA
                if buf[0] != 13 or buf[1] != 10:
                    raise ResponseError("chunk not followed by CRLF")
                del buf[:2]
                self.state = S_CHUNK_SIZE
            else:  # the trailer section: kept in ``trailers`` for the caller
                if len(buf) >= 2 and buf[0] == 13 and buf[1] == 10:
                    del buf[:2]
                    self.state = S_DONE
                    return END
                end = _find_crlf(<const unsigned char*>PyByteArray_AS_STRING(buf), len(buf), True)
                if end < 0:
                    if len(buf) > MAX_TRAILERS:
                        raise ResponseError("trailers too large")
                    return NEED_DATA
                if end + 4 > MAX_TRAILERS:
                    raise ResponseError("trailers too large")
                block = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), end)
                del buf[: end + 4]
                if b"\0" in block:
                    raise ResponseError("NUL in trailers")
                trailers = []
                _field_section(<const unsigned char*>PyBytes_AS_STRING(block), 0, end, trailers,
                               None, "trailer section")
                self.trailers = trailers
                self.state = S_DONE
                return END


cdef long long _content_length(list lengths) except -1:
    """One Content-Length from the fields' values: every comma-separated item the
    same 1-18 digits (RFC 9110 8.6), else ResponseError."""
    cdef bytes value
    if len(lengths) == 1 and b"," not in lengths[0]:
        value = lengths[0].strip(b" \t")  # the usual one value
    else:
        values = {item.strip(b" \t") for v in lengths for item in v.split(b",")}
        if len(values) != 1:
            raise ResponseError("conflicting Content-Length from machine")
        value = values.pop()
    cdef Py_ssize_t i, n = len(value)
    if n == 0 or n > 18:
        raise ResponseError("bad Content-Length from machine")
    cdef long long total = 0
    for i in range(n):
        if not 48 <= value[i] <= 57:
            raise ResponseError("bad Content-Length from machine")
        total = total * 10 + (value[i] - 48)
    return total


cdef long long _chunk_size(const unsigned char* b, Py_ssize_t n) except -1:
    """``1*16HEXDIG [ BWS ] [ ";" ext ]`` (the line without CRLF): the size; the
    extension may hold anything but CR and LF (it is dropped)."""
    cdef Py_ssize_t i = 0
    cdef unsigned long long size = 0  # 16 hex digits fit; the bound below keeps it signed
    cdef unsigned char c
    while i < n and i < 17:
        c = b[i]
        if 48 <= c <= 57:
            size = size * 16 + (c - 48)
        elif 97 <= c <= 102:
            size = size * 16 + (c - 87)
        elif 65 <= c <= 70:
            size = size * 16 + (c - 55)
        else:
            break
        i += 1
    if i == 0 or i > 16 or size > MAX_CHUNK_SIZE:
        raise ResponseError("bad chunk size from machine")
    while i < n and (b[i] == 32 or b[i] == 9):
        i += 1
    if i < n and b[i] != 59:  # ";"
        raise ResponseError("bad chunk size from machine")
    while i < n:
        if b[i] == 13 or b[i] == 10:
            raise ResponseError("bad chunk size from machine")
        i += 1
    return <long long>size
