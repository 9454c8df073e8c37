"""edgeproxy: an edge proxy whose raw-TCP fast path runs in the kernel."""

__version__ = "0.1.0"
