"""Device choice: cuda, then mps, then cpu, and a sentence saying which and why."""
from __future__ import annotations

import os

import torch

from .allocator import _ALLOCATOR, KEEP_MB, tune_allocator  # noqa: F401  (re-exported)
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




def max_threads() -> int:
    """The most threads GENSELFDIFF_THREADS may ask for: eight per core (more only slows a CPU
    down, and a huge count crashes OpenMP before any work starts)."""
    return 8 * (os.cpu_count() or 1)


def threads_from_env(value: str | None) -> int | None:
    """GENSELFDIFF_THREADS as a number of threads: None when unset or empty; a whole number from
    1 to :func:`max_threads`, else a GenSelfDiffError naming the variable."""
    if value is None or not value.strip():
        return None
    limit = max_threads()
    if not value.strip().isdigit() or not 1 <= int(value) <= limit:
        raise GenSelfDiffError(f"GENSELFDIFF_THREADS must be a whole number from 1 to {limit} "
                               f"({os.cpu_count() or 1} cores here), got {value!r}")
    return int(value)
