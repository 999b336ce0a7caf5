"""Device choice: cuda, then mps, then cpu, and a sentence saying which and why."""
from __future__ import annotations

import torch

from .errors import GenSelfDiffError

CHOICES = ("auto", "cuda", "mps", "cpu")


def available_devices() -> list[str]:
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def pick_device(name: str = "auto") -> tuple[torch.device, str]:
    """Resolve ``name`` (auto/cuda/mps/cpu or e.g. cuda:1) to a device and a one-line explanation."""
    name = (name or "auto").lower()
    found = available_devices()
    if name == "auto":
        dev = found[0]
        if dev == "cuda":
            why = f"using cuda ({torch.cuda.get_device_name(0)})"
        elif dev == "mps":
            why = "using mps (Apple GPU)"
        else:
            why = "using cpu (no CUDA or MPS GPU found)"
        return torch.device(dev), why
    base = name.split(":")[0]
    if base not in CHOICES:
        raise GenSelfDiffError(f"unknown device {name!r}: choose auto, cuda, mps or cpu")
    if base not in found:
        raise GenSelfDiffError(f"device {name!r} is not available here (found: {', '.join(found)})")
    return torch.device(name), f"using {name}"


def channels_last_for(device: torch.device | str) -> torch.memory_format:
    """The memory layout a convolutional network trains fastest in on ``device``: channels_last on
    the CPU (oneDNN) and CUDA (tensor cores), the default layout elsewhere (MPS)."""
    kind = torch.device(device).type
    return torch.channels_last if kind in ("cpu", "cuda") else torch.preserve_format


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
            if ((lib.mallopt(_M_MMAP_THRESHOLD, 256 << 20) or lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
                    and lib.mallopt(_M_TOP_PAD, 16 << 20)):
                libc = lib
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            libc = None
    _ALLOCATOR["libc"] = libc
    return libc
