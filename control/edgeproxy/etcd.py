"""A small etcd v3 client over etcd's JSON gateway, standard library only.

etcd serves its gRPC API as JSON on the client port (``/v3/kv/range``,
``/v3/kv/txn``, ``/v3/watch``; keys and values base64, 64-bit integers as strings).
Talking to it with ``http.client`` and a socket avoids a gRPC dependency and the
third-party etcd clients, whose release cadence and protobuf pins have broken
installs before; we need five calls.

Unary calls fail over: each tries the members in turn, starting with the one that
answered last, and moves on when a member does not answer or says it cannot serve
(no leader, leader changed: HTTP 5xx). A refusal that another member would repeat
(HTTP 4xx: too many operations, compacted revision) is raised at once.

A watch is one long-lived HTTP/1.1 response, chunked, one JSON message per line.
``WatchStream`` reads it from a raw socket rather than ``http.client``: reads need a
timeout (so the watcher can check liveness and stop), and a file object over a
socket is unusable after a timeout, while our own buffer is not.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

DEFAULT_PORT = 2379
DEFAULT_TIMEOUT = 2.0  # seconds per unary call and per connect: a member slower than this is down
MAX_HEADER_BYTES = 64 * 1024  # a watch response's headers; the gateway sends a few hundred bytes
MAX_LINE_BYTES = 256 * 1024 * 1024  # one watch message: etcd's own request limit is far below


class EtcdError(Exception):
    """etcd refused a request, or answered something we do not understand."""


class EtcdUnavailable(EtcdError):
    """No member could serve the request."""


class Compacted(EtcdError):
    """A watch asked for history that compaction removed; re-read the whole range."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``127.0.0.1:2379`` or ``http://127.0.0.1:2379``; TLS is not supported."""
    url = urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"etcd endpoint {text!r}: expected host:port or http://host:port")
    return Endpoint(url.hostname, url.port or DEFAULT_PORT)


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Event:
    type: Literal["put", "delete"]
    key: bytes
    value: bytes  # empty for a delete
    mod_revision: int


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) else b""


def _int(value: object) -> int:
    """The gateway writes int64 as a JSON string and leaves zero values out."""
    return int(value) if isinstance(value, str | int) else 0


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def header_revision(reply: Mapping[str, object]) -> int:
    header = reply.get("header")
    return _int(header.get("revision")) if isinstance(header, dict) else 0


def _key_value(raw: object) -> KeyValue:
    if not isinstance(raw, dict):
        raise EtcdError(f"unexpected key-value {raw!r}")
    return KeyValue(_unb64(raw.get("key")), _unb64(raw.get("value")), _int(raw.get("mod_revision")))


def parse_events(result: Mapping[str, object]) -> list[Event]:
    events: list[Event] = []
    raw_events = result.get("events", [])
    if not isinstance(raw_events, list):
        raise EtcdError(f"unexpected watch events {raw_events!r}")
    for raw in raw_events:
        if not isinstance(raw, dict):
            raise EtcdError(f"unexpected watch event {raw!r}")
        kv = _key_value(raw.get("kv"))
        kind: Literal["put", "delete"] = "delete" if raw.get("type") == "DELETE" else "put"
        events.append(Event(kind, kv.key, kv.value, kv.mod_revision))
    return events


class EtcdClient:
    """Unary calls with failover across members. Thread-safe enough: no shared socket."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = tuple(parse_endpoint(e) for e in endpoints)
        self.timeout = timeout
        self._preferred = 0  # index of the member that answered last

    def call(self, path: str, body: Mapping[str, object]) -> dict[str, object]:
        """POST ``body`` to ``/v3/<path>`` on the first member that can serve it."""
        failures: list[str] = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._preferred + step) % count
            endpoint = self.endpoints[index]
            try:
                reply = self.call_one(endpoint, path, body)
            except EtcdUnavailable as err:
                failures.append(f"{endpoint}: {err}")
                continue
            self._preferred = index
            return reply
        raise EtcdUnavailable(f"no etcd member could serve {path}: " + "; ".join(failures))

    def call_one(
        self, endpoint: Endpoint, path: str, body: Mapping[str, object]
    ) -> dict[str, object]:
        """One member only: ``EtcdUnavailable`` when it cannot serve, else ``EtcdError``."""
        conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout)
        try:
            conn.request(
                "POST", f"/v3/{path}", json.dumps(body), {"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            status, payload = response.status, response.read()
        except (OSError, http.client.HTTPException) as err:
            raise EtcdUnavailable(f"{type(err).__name__}: {err}") from err
        finally:
            conn.close()
        try:
            reply = json.loads(payload)
        except ValueError as err:
            raise EtcdUnavailable(f"HTTP {status}, not JSON: {payload[:200]!r}") from err
        if not isinstance(reply, dict):
            raise EtcdError(f"HTTP {status}: unexpected reply {reply!r}")
        if status == 200:
            return reply
        message = f"HTTP {status}: {reply.get('message') or reply.get('error') or reply}"
        if status >= 500:  # no leader, leader changed, timeout: another member may do
            raise EtcdUnavailable(message)
        raise EtcdError(message)

    def range_prefix(
        self, prefix: bytes, *, endpoint: Endpoint | None = None, count_only: bool = False
    ) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` (linearizable) and the store revision it was read at."""
        body: dict[str, object] = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
        if count_only:
            body["count_only"] = True
        reply = (
            self.call("kv/range", body)
            if endpoint is None
            else self.call_one(endpoint, "kv/range", body)
        )
        kvs = reply.get("kvs", [])
        if not isinstance(kvs, list):
            raise EtcdError(f"unexpected range reply {reply!r}")
        return header_revision(reply), [_key_value(kv) for kv in kvs]

    def txn(self, puts: Mapping[bytes, bytes], deletes: Sequence[bytes] = ()) -> int:
        """Apply puts and single-key deletes atomically; returns the new revision.

        etcd caps operations per transaction (``--max-txn-ops``, 128 by default).
        """
        ops: list[dict[str, object]] = [
            {"request_put": {"key": b64(key), "value": b64(value)}} for key, value in puts.items()
        ]
        ops += [{"request_delete_range": {"key": b64(key)}} for key in deletes]
        return header_revision(self.call("kv/txn", {"success": ops}))

    def put(self, key: bytes, value: bytes) -> int:
        return header_revision(self.call("kv/put", {"key": b64(key), "value": b64(value)}))

    def delete(self, key: bytes) -> int:
        return header_revision(self.call("kv/deleterange", {"key": b64(key)}))

    def compact(self, revision: int) -> None:
        self.call("kv/compaction", {"revision": str(revision), "physical": True})


class WatchStream:
    """One open watch on one member: ``read`` returns the next message's ``result``."""

    def __init__(
        self,
        endpoint: Endpoint,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self._raw = bytearray()  # bytes from the socket, not yet de-chunked
        self._lines = bytearray()  # de-chunked payload, not yet split into messages
        self._chunk_left = 0  # payload bytes left in the current chunk
        self._state: Literal["size", "data", "crlf"] = "size"
        self._sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        try:
            self._start(key, range_end, start_revision, timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, key: bytes, range_end: bytes, start_revision: int, timeout: float) -> None:
        create = {
            "create_request": {
                "key": b64(key),
                "range_end": b64(range_end),
                "start_revision": str(start_revision),
            }
        }
        body = json.dumps(create).encode()
        head = (
            f"POST /v3/watch HTTP/1.1\r\nHost: {self.endpoint}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self._sock.sendall(head + body)
        headers = self._read_headers(timeout)
        status_line, _, rest = headers.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[1] != b"200":
            raise EtcdUnavailable(f"watch refused: {status_line.decode(errors='replace')}")
        if b"transfer-encoding: chunked" not in rest.lower():
            raise EtcdError("watch reply is not chunked")

    def _read_headers(self, timeout: float) -> bytes:
        self._sock.settimeout(timeout)
        while (end := self._raw.find(b"\r\n\r\n")) < 0:
            if len(self._raw) > MAX_HEADER_BYTES:
                raise EtcdError("watch reply headers too long")
            self._receive()
        headers = bytes(self._raw[:end])
        del self._raw[: end + 4]
        return headers

    def _receive(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise EtcdUnavailable("the member closed the watch")
        self._raw += data

    def read(self, wait: float) -> dict[str, object] | None:
        """The next watch message, or None when none arrives within ``wait`` seconds.

        Raises ``EtcdUnavailable`` when the connection breaks, ``Compacted`` when the
        start revision is gone, ``EtcdError`` when etcd cancels the watch otherwise.
        """
        while (message := self._next_message()) is None:
            self._sock.settimeout(wait)
            try:
                self._receive()
            except TimeoutError:
                return None
            except OSError as err:
                raise EtcdUnavailable(f"watch connection lost: {err}") from err
            self._dechunk()
        return message

    def _next_message(self) -> dict[str, object] | None:
        end = self._lines.find(b"\n")
        if end < 0:
            if len(self._lines) > MAX_LINE_BYTES:
                raise EtcdError("watch message too long")
            return None
        line = bytes(self._lines[:end])
        del self._lines[: end + 1]
        try:
            message = json.loads(line)
        except ValueError as err:
            raise EtcdError(f"watch message is not JSON: {line[:200]!r}") from err
        if not isinstance(message, dict):
            raise EtcdError(f"unexpected watch message {message!r}")
        result = message.get("result")
        if not isinstance(result, dict):
            raise EtcdUnavailable(f"watch failed: {message.get('error', message)}")
        if result.get("canceled"):
            compacted = _int(result.get("compact_revision"))
            if compacted:
                raise Compacted(compacted)
            raise EtcdUnavailable(f"watch canceled: {result.get('cancel_reason', 'no reason')}")
        return result

    def _dechunk(self) -> None:
        """Move whole and partial chunk payloads from ``_raw`` to ``_lines``."""
        while self._raw:
            if self._state == "size":
                end = self._raw.find(b"\r\n")
                if end < 0:
                    return
                size_text = bytes(self._raw[:end]).split(b";")[0].strip()
                del self._raw[: end + 2]
                try:
                    self._chunk_left = int(size_text, 16)
                except ValueError as err:
                    raise EtcdError(f"bad chunk size {size_text!r}") from err
                if self._chunk_left == 0:
                    raise EtcdUnavailable("the member ended the watch")
                self._state = "data"
            elif self._state == "data":
                take = min(self._chunk_left, len(self._raw))
                self._lines += self._raw[:take]
                del self._raw[:take]
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._state = "crlf"
            else:
                if len(self._raw) < 2:
                    return
                del self._raw[:2]
                self._state = "size"

    def close(self) -> None:
        """Also unblocks a ``read`` in another thread."""
        with contextlib.suppress(OSError):  # never connected, or already gone
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
