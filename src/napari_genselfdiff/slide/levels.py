"""The one rule choosing the pyramid level a model runs on: the level whose microns per pixel are
closest to the model's (on a log scale, so 0.5 is as far from 1.0 as 2.0 is)."""
from __future__ import annotations

import math
from typing import Sequence


def level_for_mpp(downsamples: Sequence[float], level0_mpp: float | None, model_mpp: float | None) -> int:
    """Index of the level (of a pyramid with ``downsamples``, level 0 at ``level0_mpp``) closest to
    ``model_mpp``; 0 when either mpp is unknown (or not positive). Ties go to the finer level."""
    if not level0_mpp or not model_mpp or level0_mpp <= 0 or model_mpp <= 0 or not downsamples:
        return 0
    dist = [abs(math.log(level0_mpp * d / model_mpp)) for d in downsamples]
    return min(range(len(dist)), key=dist.__getitem__)


def region_at_mpp(region: tuple[int, int, int, int, int], downsamples: Sequence[float],
                  level_shapes: Sequence[Sequence[int]], level0_mpp: float | None,
                  model_mpp: float | None) -> tuple[int, int, int, int, int]:
    """The view ``region`` = (level, y, x, h, w) in pixels of the level :func:`level_for_mpp`
    picks (a half-resolution gland model must not run on level 0), clipped to that level's
    ``level_shapes`` entry and at least one pixel; unchanged when either mpp is unknown."""
    level, y, x, h, w = region
    if not model_mpp or not level0_mpp:
        return region
    target = level_for_mpp(downsamples, level0_mpp, model_mpp)
    if target == level:
        return region
    f = downsamples[level] / downsamples[target]
    H, W = (int(s) for s in level_shapes[target][:2])  # noqa: N806
    y0, x0 = min(int(y * f), H - 1), min(int(x * f), W - 1)
    y1 = min(H, max(y0 + 1, math.ceil((y + h) * f)))
    x1 = min(W, max(x0 + 1, math.ceil((x + w) * f)))
    return target, y0, x0, y1 - y0, x1 - x0
