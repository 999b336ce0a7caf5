"""Training on several processes (one per GPU) with torch DistributedDataParallel.

``torchrun --nproc-per-node N --no-python genselfdiff pretrain ...`` (or ``finetune``) starts N
copies of the command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. The training
generators call :func:`join`: without ``WORLD_SIZE`` (or with 1) it returns None and the
single-process path runs exactly as before. Under torchrun it joins the process group once per
process (NCCL on GPUs, gloo on CPUs), takes ``cuda:LOCAL_RANK`` where there are GPUs, and returns
a :class:`Group`, through which the training loop

- splits the global batch: ``--batch`` is what all processes together see in one step, each
  draws ``batch / N`` patches from its own seeded stream (seed, step, rank); a batch that does
  not divide is refused before anything starts;
- trains through a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper, which averages
  the gradients before the optimizer step, so every rank holds the same weights, optimizer
  state and EMA;
- averages the loss over the ranks (what is shown, and the divergence check, so every rank
  stops together);
- broadcasts rank 0's frozen BatchNorm statistics after each calibration (every rank calibrates
  on the same seeded batches; the broadcast makes the tensors identical bit for bit);
- lets rank 0 alone write checkpoints, the others waiting for its word (a failed save fails
  every rank);
- after an error or a cancel, makes no collective call any more (:meth:`Group.abandon`): a rank
  must not wait for one that has gone, so rank 0's saving ``finally`` cannot hang.

Resuming: every rank reads the same checkpoint. The CLI prints, and shows progress, on rank 0
only (:func:`is_main_process`) and leaves the group at the end (:func:`shutdown`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError, GenSelfDiffError

#: the torchrun variables read here
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().isdigit():
        raise GenSelfDiffError(f"{name}={value!r}: a training process started by torchrun needs RANK, WORLD_SIZE "
                               "and LOCAL_RANK as whole numbers (start it with torchrun --nproc-per-node N)")
    return int(value)


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment; None outside torchrun (no
    ``WORLD_SIZE``) or with a single process."""
    if not (os.environ.get("WORLD_SIZE") or "").strip():
        return None
    world = _env_int("WORLD_SIZE")
    if world <= 1:
        return None
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank >= world:
        raise GenSelfDiffError(f"RANK={rank} is not below WORLD_SIZE={world}")
    return rank, world, local


def is_main_process() -> bool:
    """Whether this process prints and writes: always outside torchrun, rank 0 under it."""
    try:
        where = launched()
    except GenSelfDiffError:  # the training call itself reports the bad environment
        return True
    return where is None or where[0] == 0


def local_batch(batch: int, world: int) -> int:
    """Each process's share of the global ``batch``; refuses one that does not divide."""
    if batch % world:
        lower, upper = batch - batch % world, batch + world - batch % world
        fit = f"{lower} or {upper}" if lower else f"{upper}"
        raise DataError(f"batch {batch} (--batch, the global batch of all {world} training processes together) "
                        f"is not divisible by {world}: each process takes batch / {world}; use {fit}")
    return batch // world


def pick_device(name: str, local_rank: int) -> tuple[torch.device, str]:
    """The device of the process with ``local_rank`` on its node: ``cuda:LOCAL_RANK`` where there
    are GPUs (``auto`` or ``cuda``), else the CPU (``auto`` on a machine without CUDA, or ``cpu``)."""
    name = (name or "auto").lower()
    if name not in ("auto", "cuda", "cpu"):
        raise GenSelfDiffError(f"device {name!r} under torchrun: give --device auto, cuda or cpu (each process "
                               "takes the GPU numbered by its LOCAL_RANK)")
    if name != "cpu" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise GenSelfDiffError(f"LOCAL_RANK {local_rank} but this node has {n} GPU(s): start at most {n} "
                                   "processes per node (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), f"cuda:{local_rank} ({torch.cuda.get_device_name(local_rank)})"
    if name == "cuda":
        raise GenSelfDiffError("device 'cuda' is not available here (found: cpu)")
    return torch.device("cpu"), "cpu"


@dataclass
class Group:
    """This process's place in the training run (see the module docstring)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    why: str = ""
    live: bool = True  # False after abandon(): no more collective calls

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch: int) -> int:
        return local_batch(batch, self.world)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (already on this rank's device) in DistributedDataParallel; construction
        broadcasts rank 0's weights, so every rank starts from the same ones."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of a (scalar) tensor over the ranks, the same on every rank."""
        value = value.detach().float().clone()
        if self.live:
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank."""
        if self.live:
            for buf in module.buffers():
                torch.distributed.broadcast(buf, 0)

    def save(self, write: Callable[[], Path], path: str | os.PathLike) -> Path:
        """``write()`` on rank 0 only; every rank returns once it is done, and fails if it failed."""
        if not self.live:
            return write() if self.main else Path(path)
        result, error = Path(path), None
        if self.main:
            try:
                result = write()
            except Exception as e:  # told to the other ranks first, then raised here
                error = e
            except BaseException:  # Ctrl-C, a closed generator: the others may be gone too
                self.abandon()
                raise
        flag = torch.tensor([0 if error is not None else 1], device=self.device)
        torch.distributed.broadcast(flag, 0)
        if error is not None:
            raise error
        if not int(flag.item()):
            raise GenSelfDiffError(f"{path}: rank 0 could not save the checkpoint (its error is in its output)")
        return result

    def abandon(self) -> None:
        """Stop every collective call: what runs now (a saving ``finally``) runs alone."""
        self.live = False


# the training loop's calls: each takes the group, None for a single process (then they do what
# one process does, and import nothing more)

def place(device: str, batch: int) -> tuple[torch.device, str, Group | None]:
    """(device, the sentence saying which and why, group): ``device.pick_device`` outside
    torchrun, else this rank's device and :class:`Group` (:func:`join`)."""
    group = join(device, batch)
    if group is None:
        from ..device import pick_device
        return (*pick_device(device), None)
    return group.device, group.why, group


def wrap(group: Group | None, model: torch.nn.Module) -> torch.nn.Module:
    """What the training forward runs: ``model``, or under torchrun ``model`` in DDP."""
    return model if group is None else group.wrap(model)


def share(group: Group | None, batch: int) -> int:
    """The patches this process draws per step of a global ``batch``."""
    return batch if group is None else group.local_batch(batch)


def step_rngs(seed: int, step: int, rank: int, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
    """The random streams of one rank at one step: seeded by (seed, step, rank), so ranks draw
    different patches and a resumed run the same ones."""
    key = np.random.SeedSequence([seed, step, rank])
    g = torch.Generator(device=device)
    g.manual_seed(int(key.generate_state(1, np.uint64)[0]) % (2**63))
    return np.random.default_rng(key), g


def mean(group: Group | None, value: torch.Tensor) -> torch.Tensor:
    return value.detach() if group is None else group.mean(value)


def sync_buffers(group: Group | None, module: torch.nn.Module) -> None:
    if group is not None:
        group.sync_buffers(module)


def save(group: Group | None, path: Path, model: torch.nn.Module, config: dict, state: dict) -> Path:
    """:func:`..checkpoint.save_checkpoint`; under torchrun on rank 0 only, the others waiting for it."""
    from .. import checkpoint

    def write() -> Path:
        return checkpoint.save_checkpoint(path, model, config, state)
    return write() if group is None else group.save(write, path)


def abandon(group: Group | None) -> None:
    if group is not None:
        group.abandon()


def provenance(group: Group | None, device: torch.device) -> dict:
    """What a checkpoint's ``training`` records about where it was trained."""
    if group is None:
        return {"device": str(device)}
    return {"device": str(device), "processes": group.world, "backend": group.backend}


def join(device: str, batch: int) -> Group | None:
    """None outside torchrun; else this process's :class:`Group`, joining the process group
    (env:// rendezvous, the variables torchrun sets) on the first call. The batch and the device
    are checked before joining, so a bad value fails at once on every rank."""
    where = launched()
    if where is None:
        return None
    rank, world, local = where
    local_batch(batch, world)
    dev, what = pick_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist = torch.distributed
    if not dist.is_available():
        raise GenSelfDiffError("this torch build has no torch.distributed: it cannot train on several processes")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenSelfDiffError(f"could not join the {world} training processes ({first}); start them with "
                                   "torchrun --nproc-per-node N") from None
        _cancel_on_sigterm()
    elif dist.get_backend() != backend:
        raise GenSelfDiffError(f"this process already joined a {dist.get_backend()} group; {what} needs {backend}")
    why = (f"using {what}, process {rank + 1} of {world} ({backend}); the batch of {batch} is "
           f"{batch // world} per process")
    return Group(rank, world, local, dev, backend, why)


def _cancel_on_sigterm() -> None:
    """torchrun stops its processes (on Ctrl-C, or when one fails) with SIGTERM, which would end
    Python at once: make it a Ctrl-C instead, so the training loop's ``finally`` saves."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def cancel(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, cancel)


def shutdown() -> None:
    """Leave the process group if this process joined one (safe to call when it did not)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
