"""The export's peak memory at what its tensors need: every large tensor its own mapping (glibc).

glibc's malloc serves a request under its mmap threshold from the heap, and raises that threshold
(up to 32 MiB) each time a mapped block is freed. Tracing the 1.3B DiT step at 480x832 allocates
and frees hundreds of activations of [4680, 1536] float32 = 27.4 MiB each, interleaved with the
tracer's small, long-lived graph nodes: once the threshold has risen past their size, the freed
activations stay in the heap, pinned by those nodes, and the process grows with every layer
(``scripts/trace_memory.py``: the trace of a 3-layer step at the real width and 480x832 peaks at
2.70 GiB, against 1.62 GiB with a fixed threshold; the eager forward alone 1.98 GiB). A fixed
threshold of 64 KiB gives every tensor over it its own mapping, returned to the system when freed.

``unpooled_large_tensors`` sets it for the export (and returns the heap's free top, which would
otherwise serve large blocks first) and, after, sets glibc's initial 128 KiB again (without the
dynamic raise; mallopt cannot restore that). On a C library without ``mallopt`` (macOS, Windows)
it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
EXPORT_THRESHOLD = 64 << 10
GLIBC_INITIAL_THRESHOLD = 128 << 10

logger = logging.getLogger("rf_runtime")


def _libc():
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def set_mmap_threshold(size: int) -> bool:
    """Serve every new allocation of at least ``size`` bytes from its own mapping (glibc ``mallopt``)
    and keep at most twice that free at the heap's top (glibc's own ratio), returning the rest now:
    glibc maps a block only when the heap's top cannot serve it. False where the C library has no
    such setting."""
    libc = _libc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(size)):
        return False
    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2 * size))
    libc.malloc_trim(ctypes.c_size_t(0))
    return True


@contextlib.contextmanager
def unpooled_large_tensors():
    """Within: every new block of 64 KiB or more is mapped apart and unmapped when freed (blocks the
    heap already holds free are still reused first)."""
    if not set_mmap_threshold(EXPORT_THRESHOLD):
        logger.debug("no glibc mallopt: the export runs with the C library's own heap policy")
        yield
        return
    try:
        yield
    finally:
        set_mmap_threshold(GLIBC_INITIAL_THRESHOLD)
