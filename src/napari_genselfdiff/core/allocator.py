"""glibc's allocator, tuned for what a process runs (Linux / glibc only; no torch here, so the
torch-free whole-slide post-processing uses it too).

Training and prediction keep freed activations in the process (:func:`tune_allocator`); the
blockwise post-processing of a slide, which allocates and frees arrays of tens of MB per block
and no tensors, hands them back at once (:func:`large_arrays_mapped`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

_ALLOCATOR: dict = {"keep_mb": 0}  # "libc": glibc once its mmap threshold is fixed, or None
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters

#: Freed memory a process keeps for reuse (glibc's trim threshold), by what it runs: a training
#: step frees and reallocates all its activations (hundreds of MB) every step; a prediction
#: process holds long-lived blocks between its tiles, where a large reserve only adds to the peak
#: RSS (the 16384^2 nuclei slide: 1.9 GB with 1 GB kept, benchmarks/RESULTS.md, session 9).
KEEP_MB = {"train": 1024, "predict": 64}


def tune_allocator(keep_mb: int = KEEP_MB["train"]) -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the OS after every
    step (Linux / glibc only; ``GENSELFDIFF_MALLOC=default`` leaves glibc as is).

    glibc returns large freed blocks to the kernel at once, so each training step or tile maps
    its activations afresh and the kernel zeroes every page again: on the 2-core machine 140,000
    page faults and a third of the step time for a step of 4 patches of 256 px, and a 768-px
    tile's forward pass 250,000 faults. With a fixed mmap threshold (256 MB, or 32 MB where glibc
    allows no more: tile and step activations come from the heap) and a trim threshold of
    ``keep_mb`` (the largest asked for in this process) the same step faults 3,000 times and runs
    1.2-2x faster, a tile none (benchmarks/speed.py --ceiling, ``allocator``). The cost: up to
    ``keep_mb`` of freed memory stays with the process. Returns whether the allocator is tuned."""
    libc = _glibc()
    if libc is None:
        return False
    if keep_mb > _ALLOCATOR["keep_mb"]:  # only ever keep more: whoever asked for more still runs
        libc.mallopt(_M_TRIM_THRESHOLD, keep_mb << 20)
        _ALLOCATOR["keep_mb"] = keep_mb
    return True


def _glibc():
    """glibc with tile and step activations served from its heap (a fixed mmap threshold: 256 MB
    keeps even a 1024-px tile's 67 MB; older glibc refuses more than 32 MB), set up once per
    process; None on other platforms, with another C library, or under ``GENSELFDIFF_MALLOC=default``."""
    if "libc" in _ALLOCATOR:
        return _ALLOCATOR["libc"]
    import ctypes
    import ctypes.util
    import os
    import sys

    libc = None
    if sys.platform.startswith("linux") and os.environ.get("GENSELFDIFF_MALLOC", "").lower() != "default":
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mmap_mb = next((mb for mb in (256, 32) if lib.mallopt(_M_MMAP_THRESHOLD, mb << 20)), 0)
            if mmap_mb and lib.mallopt(_M_TOP_PAD, 16 << 20):
                libc, _ALLOCATOR["mmap_mb"] = lib, mmap_mb
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            libc = None
    _ALLOCATOR["libc"] = libc
    return libc


#: glibc's mmap threshold while :func:`large_arrays_mapped` is in force: arrays of this size and
#: more come from their own mapping and go back to the kernel when freed.
MAPPED_MB = 8


@contextlib.contextmanager
def large_arrays_mapped() -> Iterator[None]:
    """While in force, arrays of :data:`MAPPED_MB` or more are mapped for themselves and unmapped
    when freed, in a process whose allocator :func:`tune_allocator` tuned (nothing changes otherwise).

    The tuned heap serves arrays up to 256 MB from its free space; the blockwise labelling of a
    slide frees a block's dozen arrays of 10-50 MB in an order that leaves that space in pieces too
    small for the next block's, so the heap grew: on the 16384^2 nuclei slide 700-800 MB of it
    sat free, and the labelling's peak RSS (1.46 GB) was above the prediction's (1.09 GB). Mapped,
    24 of its blocks peak at 0.95 GB instead of 1.32 GB for 5 % more time (benchmarks/RESULTS.md,
    session 10)."""
    libc = _ALLOCATOR.get("libc")
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MAPPED_MB << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR["mmap_mb"] << 20)
