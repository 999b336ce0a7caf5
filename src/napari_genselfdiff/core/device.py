"""Device choice: cuda, then mps, then cpu, and a sentence saying which and why."""
from __future__ import annotations

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


