"""Cancel inside a training step: a step of several seconds on the CPU need not run to its end
before a job stops (:class:`StopChecks`)."""
from __future__ import annotations

import contextlib

import torch

from ..progress import StopRequested, stop_event


class StopChecks:
    """Let a job's Cancel (:func:`...core.progress.stoppable` around the thread building the
    training) stop ``module``'s training step between layers: a forward pre-hook on each layer and
    a gradient hook on each parameter raise :class:`StopRequested` once the job's stop is set,
    while :meth:`armed` (a training step; never the checkpoint's BatchNorm passes or the saving).
    A CPU step of several seconds stops within a fraction of one. Nothing outside a job."""

    def __init__(self, module: torch.nn.Module):
        self.event, self.active = stop_event(), False
        if self.event is None:
            return
        for m in module.modules():
            if not any(True for _ in m.children()):
                m.register_forward_pre_hook(self._check)
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._check)

    def __deepcopy__(self, memo):  # a copy of the model (fused for validation) shares the one checker
        return self

    def _check(self, *_):
        if self.active and self.event.is_set():
            raise StopRequested()

    @contextlib.contextmanager
    def armed(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False
