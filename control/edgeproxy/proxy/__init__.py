"""The HTTP slow path: edge and worker proxy with an HTTP/2 backhaul.

Sans-IO cores (``framing``, ``headers``, ``routes``, ``targeting``, ``admission``,
``bodies``) are plain functions and state machines; the asyncio shell
(``h2session``, ``machines``, ``backhaul``, ``frontend_h1``, ``frontend_h2``,
``forward``, ``server``) moves bytes; HTTP/2 itself is libnghttp2 behind the
sans-IO ``_nghttp2`` session. See docs/DESIGN.md, "HTTP slow path".
"""

from __future__ import annotations

import asyncio

from edgeproxy.proxy.backhaul import BackhaulHealth
from edgeproxy.proxy.server import HttpProxy, ProxySettings
from edgeproxy.proxy.stats import ProxySnapshot

__all__ = ["BackhaulHealth", "HttpProxy", "ProxySettings", "ProxySnapshot", "new_event_loop"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (it is a dependency), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
