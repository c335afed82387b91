"""allocator.large_tensors_in_heap: large tensors reuse heap pages instead of faulting fresh mmap pages in."""

from __future__ import annotations

import ctypes
import resource

import pytest
import torch

from quantlm.gptq import allocator

glibc = pytest.mark.skipif(allocator._libc() is None, reason="glibc only (mallopt / malloc_trim)")


def _faults_of_fresh_tensors(n: int, nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(nbytes // 4, dtype=torch.float32)
        t.fill_(1.0)  # touch every page
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_bytes_while_alive(nbytes: int) -> int:
    """Bytes glibc serves by mmap while a tensor of ``nbytes`` is alive, minus before."""
    libc = allocator._libc()
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33: no mallinfo2")
    libc.mallinfo2.restype = _Mallinfo2
    before = libc.mallinfo2().hblkhd
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    during = libc.mallinfo2().hblkhd
    del t
    return during - before


@glibc
def test_large_tensors_reuse_heap_pages_inside():
    nbytes, n = 96 * 2**20, 6  # above glibc's largest mmap threshold (32 MB)
    pages = nbytes // 4096
    outside = _faults_of_fresh_tensors(n, nbytes)
    assert outside >= 0.9 * n * pages  # every tensor faults all its pages in again
    with allocator.large_tensors_in_heap() as active:
        assert active
        # the heap grows until glibc reuses freed chunks (it sorts them into its bins lazily): a few rounds
        inside = min(_faults_of_fresh_tensors(n, nbytes) for _ in range(8))
    assert inside <= 0.1 * n * pages  # freed tensors' pages are reused, not faulted in again
    allocator.release_free_memory()


@glibc
def test_heap_served_inside_mmap_served_outside_and_after():
    # sizes beyond any free heap chunk an earlier test left (the tensors are never touched: address space only)
    assert _mmapped_bytes_while_alive(2**30) >= 2**30
    with allocator.large_tensors_in_heap():
        with allocator.large_tensors_in_heap() as inner:
            assert inner
        assert _mmapped_bytes_while_alive(176 * 2**20) == 0  # still on after the inner exit
    assert _mmapped_bytes_while_alive(2 * 2**30) >= 2 * 2**30  # undone at the outermost exit
    allocator.release_free_memory()
