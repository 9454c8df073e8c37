# The compiled HTTP/1 core's interface (control/edgeproxy/proxy/_http1.pyx).
from collections.abc import Sequence

from edgeproxy.proxy.messages import Data, EndOfMessage, NeedData, RequestHead, ResponseHead

MAX_REQUEST_LINE: int
MAX_HEAD: int
MAX_HEADERS: int
MAX_CONTENT_LENGTH_DIGITS: int
MAX_RESPONSE_HEAD: int

class UnsendableRequest(Exception): ...

def parse_head(block: bytes) -> RequestHead: ...
def forward_head(
    head: RequestHead,
    ip: bytes,
    scheme: bytes,
    port: bytes,
    protocol: bytes,
    region: bytes,
    request_id: bytes,
    content_length: int = -1,
) -> bytes: ...
def response_head(block: bytes) -> tuple[ResponseHead, list[tuple[bytes, bytes]]]: ...
def client_head(
    response: ResponseHead,
    request: RequestHead,
    request_id: bytes,
    close: bool = False,
    check_replay: bool = True,
) -> tuple[bytes, bool, bool] | None: ...

MAX_CHUNK_LINE: int
MAX_TRAILERS: int
MAX_CHUNK_SIZE: int
MAX_INFORMATIONAL: int
NO_TRAILERS: Sequence[tuple[bytes, bytes]]

class ResponseParser:
    buffer: bytearray
    eof: bool
    keep_alive: bool
    trailers: Sequence[tuple[bytes, bytes]]
    def start(self, method: bytes) -> None: ...
    @property
    def done(self) -> bool: ...
    def feed(self, data: bytes) -> None: ...
    def next_event(self) -> ResponseHead | Data | EndOfMessage | NeedData: ...
