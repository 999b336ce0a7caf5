"""Whether one training step fits in memory, asked before the first one.

A batch of 1024 patches of 8192 px is within each flag's bounds and needs terabytes: without this
check it allocates until the kernel's out-of-memory killer ends the process (no line, maybe
another process with it). The activations a step keeps for its backward pass grow with the
pixels it trains on; they are measured through the real network, precision and frozen layers
included, on two small inputs (saved-tensor hooks count each stored tensor once), and scaled.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import GenSelfDiffError
from ..imagefile import available_memory
from ..precision import Precision, autocast


def step_bytes_per_pixel(model: torch.nn.Module, device: torch.device, precision: Precision,
                         timestep: bool) -> float:
    """Bytes one training step keeps per input pixel (activations saved for the backward pass;
    the weights and what does not grow with the input are left out)."""
    side = 2 * model.config.multiple
    sizes = (max(side, 16), 2 * max(side, 16))
    saved = []
    for s in sizes:
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
            return t

        x = torch.zeros(1, model.config.in_channels, s, s, device=device)
        t = torch.zeros(1, dtype=torch.long, device=device) if timestep else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, precision):
            out = model(x, t) if timestep else model(x)
        del out
        saved.append(sum(seen.values()))
    return max(saved[1] - saved[0], 0) / (sizes[1] ** 2 - sizes[0] ** 2)


def device_memory_free(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device`` (None: the device does not say, e.g. MPS)."""
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            return int(torch.cuda.mem_get_info(device)[0])
        return None
    return available_memory() if device.type == "cpu" else None


def check_step_fits(model: torch.nn.Module, device: torch.device, precision: Precision, batch: int, patch: int,
                    *, timestep: bool = False) -> None:
    """:class:`GenSelfDiffError` (one line) when a step of ``batch`` patches of ``patch`` px cannot
    fit in the memory free on ``device``; nothing when it can or the device does not say."""
    free = device_memory_free(device)
    if free is None:
        return
    was = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # BatchNorm's running statistics
    model.train()
    try:
        need = step_bytes_per_pixel(model, device, precision, timestep) * batch * patch * patch
    finally:
        model.train(was)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])  # the measurement leaves no trace in the model
    if need > free:
        raise GenSelfDiffError(f"one training step of {batch} patch(es) of {patch} px needs about "
                               f"{need / 2**30:.1f} GiB of memory, more than the {free / 2**30:.1f} GiB free on "
                               f"{device.type}; lower the batch size or the patch size")
