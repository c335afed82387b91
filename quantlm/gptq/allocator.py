"""glibc heap settings for the pipeline: where large tensors live, and handing free pages back.

Why: glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
unmaps it on free, so each such tensor faults all its pages in again, zeroed by the kernel. At the Spectra
recipe (batches of 8 x 2048 tokens) most block temporaries are larger than that (the 99M shape's MLP
activations: 84 MB): one 99M block spent 153 s of its 298 s in the kernel, 43M minor faults
(bench/quantize_memory.md, "Large tensors in the heap"). Inside :func:`large_tensors_in_heap` they come from
the heap and are reused: 2.8M faults, 21 s of system time, 206 s in all, the same codes. The memory plan
turns it on for such batches where memory is ample (``large_tensors_in_heap``: its peak then depends on the
order of allocations, ``memory.K_HEAP_FRAGMENTS``), together with a trim after each group, without which the
heap's holes between replay records added ~20% to the peak. Everything here is a no-op where
the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator

# glibc's largest mmap threshold (on 64-bit): larger allocations are always mmap-served outside the context.
MMAP_THRESHOLD_MAX = 32 * 2**20
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# Restored on exit. glibc's defaults adapt at run time (an mmap threshold that rises to the size of freed
# chunks, up to MMAP_THRESHOLD_MAX, with a trim threshold of twice that), which any mallopt call switches off
# for good; these are the values that adaptation reaches with tensors of 32 MB and more.
_AFTER = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: MMAP_THRESHOLD_MAX, _M_TRIM_THRESHOLD: 2 * MMAP_THRESHOLD_MAX}
# Inside: no mmap-served allocations, and the heap's free top is never trimmed by free() itself (only by an
# explicit release_free_memory, which the memory plan asks for when memory is tight).
_INSIDE = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}

_lock = threading.Lock()
_depth = [0]


@functools.cache
def _libc():
    """glibc's handle, or None (musl, macOS, Windows: their allocators are left alone)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(settings: dict[int, int]) -> bool:
    libc = _libc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in settings.items())


@contextlib.contextmanager
def large_tensors_in_heap() -> Iterator[bool]:
    """Serve large allocations from the heap and keep freed ones for reuse, for the duration (nests; the
    outermost exit restores). Yields whether the settings took effect (False where the C library is not
    glibc). Costs no memory by itself: a freed chunk is reused before the heap grows, and
    :func:`release_free_memory` still hands free pages back."""
    with _lock:
        _depth[0] += 1
        active = _mallopt(_INSIDE) if _depth[0] == 1 else _libc() is not None
    try:
        yield active
    finally:
        with _lock:
            _depth[0] -= 1
            if _depth[0] == 0:
                _mallopt(_AFTER)


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A block's temporaries freed between its long-lived results (codes, scales) stay resident otherwise,
    adding ~20% of a block's weights per block (measured on the 390M shape, bench/quantize_memory.md)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
