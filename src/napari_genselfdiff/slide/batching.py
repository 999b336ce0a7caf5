"""How many tiles go to the model in one call (:class:`BatchSizer`), shared by the whole-slide run
(:mod:`.tiler`) and the napari field of view (:mod:`.fov`)."""
from __future__ import annotations

import time
from typing import Callable


class BatchSizer:
    """How many tiles go to the model in one call: at most ``batch``, fewer while one call would
    take longer than ``target_s`` seconds. A job yields (and so can be cancelled) between calls,
    so this bounds how long Cancel waits whatever the batch setting: a CPU ends up at one tile per
    call, a GPU at the full batch. Tiles are predicted independently, so the size never changes
    the answer. The first call takes one tile; after each call the size becomes the number of
    tiles that fit in ``target_s`` at the measured speed (at most twice the last size).
    ``target_s=None`` keeps the size at ``batch``. ``clock`` is for tests."""

    def __init__(self, batch: int, target_s: float | None = 0.5, clock: Callable[[], float] = time.perf_counter):
        self.batch, self.target_s, self.clock = max(int(batch), 1), target_s, clock
        self.size = 1 if target_s else self.batch

    def record(self, tiles: int, seconds: float) -> None:
        """A call of ``tiles`` tiles took ``seconds``."""
        if not self.target_s or tiles < 1:
            return
        fit = int(self.target_s * tiles / seconds) if seconds > 0 else self.batch
        self.size = max(1, min(self.batch, fit, 2 * tiles))
