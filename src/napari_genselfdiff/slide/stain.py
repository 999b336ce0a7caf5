"""A slide's stain statistics for :mod:`..core.stain`, taken once before a run from the level the
model reads: the whole level when it is small (an image), else windows spread over its tissue."""
from __future__ import annotations

import numpy as np

from napari_genselfdiff.core.stain import LabStats, StainNormalizer, lab_stats, model_targets, normalizer_for
from napari_genselfdiff.slide.reader import Slide
from napari_genselfdiff.slide.tiler import resolve_level
from napari_genselfdiff.slide.tissue import detect_tissue

#: A level of at most this many pixels is read whole.
WHOLE_LEVEL_PIXELS = 16_000_000
#: Otherwise at most this many windows of :data:`WINDOW` pixels, evenly spread over the tissue.
WINDOWS, WINDOW = 48, 256


def slide_stats(slide: Slide, level: int) -> LabStats:
    """Lab statistics of the tissue of ``slide``'s ``level``."""
    arr = slide.levels[level]
    h, w = int(arr.shape[0]), int(arr.shape[1])
    what = f"{slide.path}, level {level}"
    if h * w <= WHOLE_LEVEL_PIXELS:
        return lab_stats([np.asarray(arr[:, :])[..., :3]], what)
    mask = detect_tissue(slide)
    ys, xs = np.nonzero(mask.mask)
    if len(ys) == 0:  # no tissue found: the level's middle
        ys, xs = np.array([mask.mask.shape[0] // 2]), np.array([mask.mask.shape[1] // 2])
    pick = np.unique(np.linspace(0, len(ys) - 1, min(WINDOWS, len(ys))).round().astype(int))
    scale = mask.downsample / slide.downsamples[level]  # mask pixel -> level pixels
    windows = []
    for i in pick:
        cy, cx = int((ys[i] + 0.5) * scale), int((xs[i] + 0.5) * scale)
        y0, x0 = min(max(0, cy - WINDOW // 2), max(0, h - WINDOW)), min(max(0, cx - WINDOW // 2), max(0, w - WINDOW))
        windows.append(np.asarray(arr[y0:y0 + WINDOW, x0:x0 + WINDOW])[..., :3])
    return lab_stats(windows, what)


def slide_normalizer(slide: Slide, predictor, level: int | str = "auto") -> StainNormalizer:
    """The normaliser from the level of ``slide`` that ``predictor`` reads (``level``: a pyramid
    level, or 'auto' as the tiler resolves it) to the nearest stain the predictor's model records."""
    targets = model_targets(predictor.config, f"{getattr(predictor, 'source', 'the model')}/config.json")
    return normalizer_for(slide_stats(slide, resolve_level(slide, level, predictor)), targets)
