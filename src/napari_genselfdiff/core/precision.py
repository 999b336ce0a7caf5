"""Numeric precision: fp32, or bf16 where the hardware computes it natively, and a sentence saying
which ran and why.

``auto`` picks bf16 on a CPU with native bf16 arithmetic (x86 ``avx512_bf16`` / ``amx_bf16``,
Arm ``bf16``), on CUDA GPUs that support it (fp16 autocast on older ones), and fp32 elsewhere: on
a CPU without it oneDNN emulates bf16, which is slower than fp32. ``bf16`` asks for it anyway (the
sentence then says it is emulated); ``fp32`` turns it off. Training always keeps fp32 master
weights and computes the loss in fp32 (autocast covers the network's forward pass only).
"""
from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
import sys
from typing import NamedTuple

import torch

from .errors import GenSelfDiffError

CHOICES = ("auto", "fp32", "bf16")
#: CPU feature flags (``/proc/cpuinfo``) that mean native bf16 arithmetic
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


class Precision(NamedTuple):
    """What runs: ``name`` is fp32, bf16 or fp16 (CUDA without bf16); ``why`` is one line."""

    name: str
    why: str

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]


def _cpuinfo_flags(text: str) -> set[str]:
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> tuple[bool, str]:
    """(True, flag) when this CPU computes bf16 natively, else (False, what it lacks)."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN"
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                found = _cpuinfo_flags(f.read()) & BF16_FLAGS
        except OSError:
            return False, "/proc/cpuinfo cannot be read"
        if found:
            return True, sorted(found)[0]
        return False, "this CPU has no avx512_bf16 / amx_bf16 / bf16"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                 text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        return (True, "FEAT_BF16") if out == "1" else (False, "this Apple CPU has no FEAT_BF16")
    return False, f"bf16 support is not detected on {sys.platform}"


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """``requested`` (auto / fp32 / bf16) on ``device`` -> what runs, with the reason."""
    requested = (requested or "auto").lower()
    if requested not in CHOICES:
        raise GenSelfDiffError(f"unknown precision {requested!r}: choose auto, fp32 or bf16")
    kind = torch.device(device).type
    if requested == "fp32":
        return Precision("fp32", "fp32 (as asked)")
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "bf16 autocast (this GPU supports it)")
        if requested == "bf16":
            raise GenSelfDiffError("precision bf16: this GPU does not support bf16; use auto (fp16) or fp32")
        return Precision("fp16", "fp16 autocast (this GPU has no bf16)")
    if kind == "cpu":
        native, what = cpu_bf16_native()
        if native:
            return Precision("bf16", f"bf16 (this CPU has {what})")
        if requested == "bf16":
            return Precision("bf16", f"bf16 as asked, emulated: {what}, so it is slower than fp32 here")
        return Precision("fp32", f"fp32 ({what})")
    if requested == "bf16":
        raise GenSelfDiffError(f"precision bf16 is not offered on {kind}; use auto or fp32")
    return Precision("fp32", f"fp32 (on {kind})")


def autocast(device: torch.device | str, precision: Precision | str | None):
    """The autocast context for ``precision`` on ``device`` (nothing for fp32)."""
    if precision is None:
        return contextlib.nullcontext()
    if not isinstance(precision, Precision):
        precision = Precision(precision, "")
    if precision.name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=precision.dtype)


def precision_of(cfg) -> str:
    """The precision a training config asks for: its ``precision``, fp32 where ``amp`` is off."""
    return cfg.precision if cfg.amp else "fp32"
