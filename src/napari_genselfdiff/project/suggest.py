"""Uncertainty sampling: which region of a slide should the pathologist correct next?

Candidates are a grid of squares at one pyramid level; glass, regions outside a tissue mask and
regions already reviewed or accepted are skipped; the rest are scored by the mean normalised
entropy of the model's class probabilities (optionally averaged over flips, with their
disagreement), most unsure first. :func:`iter_suggest_regions` is a generator of
:class:`~..core.progress.Progress` events (a GUI shows progress and cancels between batches) that
returns the ranking; :func:`suggest_regions` is its blocking form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.errors import DataError
from ..core.inference import predict_padded_batch
from ..core.progress import Progress, run_to_end
from ..core.resolution import Rescale, resize_image
from ..slide.tissue import is_background
from .files import ProjectFolder

Cell = tuple[int, int, int, int]  # (y, x, h, w) at the scored level


@dataclass(frozen=True)
class ScoredCell:
    """One scored candidate: its cell at the scored level, the mean normalised entropy of the
    (flip-averaged) probabilities, and the flips' disagreement (0 without flips)."""

    cell: Cell
    score: float
    disagreement: float


def suggest_regions(project: ProjectFolder, predictor: Callable[[np.ndarray], np.ndarray], slide_or_image: Any,
                    **kwargs: Any) -> list[dict]:
    """The blocking form of :func:`iter_suggest_regions` (same arguments, same result)."""
    return run_to_end(iter_suggest_regions(project, predictor, slide_or_image, **kwargs))


def iter_suggest_regions(project: ProjectFolder, predictor: Callable[[np.ndarray], np.ndarray], slide_or_image: Any, *,
                         region_size: int = 512, level: int = 0, top_k: int = 5, exclude_reviewed: bool = True,
                         tissue_mask: np.ndarray | None = None, slide_id: str | None = None,
                         flips: bool = False, max_candidates: int = 64,
                         batch: int = 8) -> Iterator[Progress]:
    """Rank tissue regions by how unsure the model is about them (most unsure first), as a
    generator: it yields a ``Progress("suggest", scored, candidates)`` after each batch (so a
    GUI can show progress and cancel between batches: closing it stops the scoring) and
    *returns* the ranked list (``result = yield from ...``).

    ``predictor`` maps a (B, H, W, 3) uint8 batch to (B, C, H, W) softmax probabilities (a
    ``TorchPredictor`` or any function doing the same; objects with ``tile_multiple`` get
    reflect-padded input). ``slide_or_image`` is a slide id of ``project``, an (H, W, 3)
    array (level 0 only) or an object with ``read_region(level, y, x, h, w)`` and ``shape``
    (and optionally ``levels``/``downsamples``, like ``slide.reader.Slide``). For arrays and
    objects, give ``slide_id`` to skip that slide's reviewed and accepted regions.

    Candidates are a grid of ``region_size`` squares at ``level``; background (mean grey >
    220 or mean saturation < 0.05, or less than a quarter inside ``tissue_mask``, a boolean
    image covering the whole slide at any resolution) and regions at least half covered by a
    reviewed or accepted region are skipped; at most ``max_candidates`` are scored, a
    deterministic subsample. The score is the mean normalised entropy (0..1) of the class
    probabilities; with ``flips`` they are averaged over horizontal and vertical flips and
    ``disagreement`` (the entropy of the mean minus the mean entropy) is reported too.
    Returns up to ``top_k`` dicts: ``bounds`` (level-0 y, x, h, w), ``level``, ``score``,
    ``disagreement``.
    """
    if region_size < 1 or top_k < 1 or max_candidates < 1:
        raise DataError("region_size, top_k and max_candidates must be >= 1")
    opened = None
    if isinstance(slide_or_image, str):
        slide_id = slide_or_image
        from ..slide.reader import open_slide
        opened = slide_or_image = open_slide(project.slide(slide_id)["path"])
    elif slide_id is not None:
        project.slide(slide_id)
    try:
        view = _LevelView(slide_or_image, level)
        cells = view.grid(region_size)
        if tissue_mask is not None:
            cells = [c for c in cells if _mask_fraction(tissue_mask, view, c) >= 0.25]
        else:
            thumb = view.thumbnail()
            if thumb is not None:
                cells = [c for c in cells if not is_background(_thumb_window(thumb, view, c))]
        if exclude_reviewed and slide_id is not None:
            done = project.reviewed(slide_id) + [r["bounds"] for r in project.regions(slide_id)]
            cells = [c for c in cells if not _mostly_covered(view.full_res(c), done)]
        if len(cells) > max_candidates:
            pick = np.sort(np.random.default_rng(0).choice(len(cells), max_candidates, replace=False))
            cells = [cells[i] for i in pick]
        scored = yield from _score_cells(predictor, view, cells, tissue_mask is None, flips, batch)
    finally:
        if opened is not None:
            opened.close()
    scored.sort(key=lambda s: (-s.score, s.cell[0], s.cell[1]))
    return [{"bounds": list(view.full_res(s.cell)), "level": level, "score": s.score,
             "disagreement": s.disagreement} for s in scored[:top_k]]


class _LevelView:
    """One pyramid level of an array or slide-like object, with level-0 coordinate mapping."""

    def __init__(self, source: Any, level: int):
        self.source, self.level = source, level
        if isinstance(source, np.ndarray):
            if source.ndim != 3 or source.shape[2] != 3:
                raise DataError(f"image must be (H, W, 3) RGB, got shape {source.shape}")
            if level != 0:
                raise DataError("an in-memory image has only level 0")
            self.height, self.width, self.downsample = source.shape[0], source.shape[1], 1.0
        elif hasattr(source, "read_region") and hasattr(source, "shape"):
            levels = getattr(source, "levels", None)
            if levels is not None:
                if not 0 <= level < len(levels):
                    raise DataError(f"level {level} does not exist (the slide has {len(levels)} levels)")
                self.height, self.width = (int(v) for v in levels[level].shape[:2])
                downs = getattr(source, "downsamples", None)
                self.downsample = float(downs[level]) if downs is not None else source.shape[0] / self.height
            elif level != 0:
                raise DataError("this slide object has no 'levels', so only level 0 can be used")
            else:
                self.height, self.width, self.downsample = int(source.shape[0]), int(source.shape[1]), 1.0
        else:
            raise DataError(f"cannot read regions from a {type(source).__name__}: give an (H, W, 3) array "
                            "or an object with read_region(level, y, x, h, w) and shape")
        level_mpp = getattr(source, "level_mpp", None)
        self.mpp = level_mpp(level) if callable(level_mpp) else None  # None: unknown

    def grid(self, size: int) -> list[Cell]:
        """Non-overlapping squares covering the level (the last row/column shifted to fit)."""
        h, w = min(size, self.height), min(size, self.width)
        ys = list(range(0, self.height - h + 1, h))
        xs = list(range(0, self.width - w + 1, w))
        if ys[-1] + h < self.height:
            ys.append(self.height - h)
        if xs[-1] + w < self.width:
            xs.append(self.width - w)
        return [(y, x, h, w) for y in ys for x in xs]

    def read(self, cell: Cell) -> np.ndarray:
        y, x, h, w = cell
        if isinstance(self.source, np.ndarray):
            return np.ascontiguousarray(self.source[y:y + h, x:x + w])
        return np.asarray(self.source.read_region(self.level, y, x, h, w))[..., :3]

    def thumbnail(self, max_side: int = 2048) -> np.ndarray | None:
        """A small image of the whole level for a cheap background pre-filter, when one is at hand
        (arrays: strided view; pyramids: their coarsest level, if small)."""
        if isinstance(self.source, np.ndarray):
            step = max(1, math.ceil(max(self.height, self.width) / max_side))
            return self.source[::step, ::step]
        levels = getattr(self.source, "levels", None)
        if levels is None or len(levels) < 2:
            return None
        last = len(levels) - 1
        h, w = (int(v) for v in levels[last].shape[:2])
        if max(h, w) > max_side:
            return None
        return np.asarray(self.source.read_region(last, 0, 0, h, w))

    def full_res(self, cell: Cell) -> Cell:
        d = self.downsample
        return tuple(int(round(v * d)) for v in cell)  # type: ignore[return-value]


def _window(shape: tuple[int, int], view: _LevelView, cell: Cell) -> tuple[slice, slice]:
    """The part of an image of ``shape`` (covering the whole level) under ``cell``."""
    sy, sx = shape[0] / view.height, shape[1] / view.width
    y, x, h, w = cell
    y0, x0 = int(y * sy), int(x * sx)
    return slice(y0, max(y0 + 1, int(math.ceil((y + h) * sy)))), slice(x0, max(x0 + 1, int(math.ceil((x + w) * sx))))


def _thumb_window(thumb: np.ndarray, view: _LevelView, cell: Cell) -> np.ndarray:
    return thumb[_window(thumb.shape[:2], view, cell)]


def _mask_fraction(mask: np.ndarray, view: _LevelView, cell: Cell) -> float:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"tissue_mask must be a 2-D boolean image, got shape {mask.shape}")
    return float(np.mean(mask[_window(mask.shape, view, cell)] > 0))


def _mostly_covered(box: Sequence[int], others: Sequence[Sequence[int]], fraction: float = 0.5) -> bool:
    y, x, h, w = box
    for oy, ox, oh, ow in others:
        iy = max(0, min(y + h, oy + oh) - max(y, oy))
        ix = max(0, min(x + w, ox + ow) - max(x, ox))
        if iy * ix >= fraction * h * w:
            return True
    return False


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Per-image mean entropy over (B, C, H, W) probabilities, normalised by log C to [0, 1]."""
    c = probs.shape[1]
    p = np.clip(probs, 1e-8, 1.0)
    ent = -(p * np.log(p)).sum(axis=1) / math.log(c) if c > 1 else np.zeros(p.shape[:1] + p.shape[2:])
    return ent.reshape(len(probs), -1).mean(axis=1)


def _score_cells(predictor, view: _LevelView, cells: Sequence[Cell], colour_test: bool, flips: bool,
                 batch: int) -> Iterator[Progress]:
    """Yield a Progress per batch; return a :class:`ScoredCell` for each tissue cell among ``cells``."""
    classes = getattr(predictor, "num_classes", None)  # the class probabilities, not a distance map
    model_mpp = getattr(predictor, "mpp", None)

    def predicted(batch_tiles: np.ndarray) -> np.ndarray:
        r = Rescale(batch_tiles.shape[1:3], view.mpp, model_mpp)
        if r.needed:  # a level at another um/px: scored at the model's (the mean entropy needs no way back)
            batch_tiles = np.stack([resize_image(t, r.model_shape) for t in batch_tiles])
        return predict_padded_batch(predictor, batch_tiles)[:, :classes]

    out: list[ScoredCell] = []
    for i in range(0, len(cells), batch):
        yield Progress("suggest", i, len(cells), message=f"scored {i} of {len(cells)} candidate regions")
        group, tiles = [], []
        for cell in cells[i:i + batch]:
            tile = view.read(cell)
            if colour_test and is_background(tile):
                continue
            group.append(cell)
            tiles.append(tile)
        if not tiles:
            continue
        tiles = np.stack(tiles)
        views = [predicted(tiles)]
        if flips:
            views.append(predicted(np.ascontiguousarray(tiles[:, :, ::-1]))[..., ::-1])
            views.append(predicted(np.ascontiguousarray(tiles[:, ::-1]))[:, :, ::-1])
        total = _entropy(np.mean(views, axis=0))
        expected = np.mean([_entropy(v) for v in views], axis=0)
        out += [ScoredCell(c, float(t), float(max(t - e, 0.0))) for c, t, e in zip(group, total, expected)]
    yield Progress("suggest", len(cells), len(cells), message=f"scored {len(cells)} candidate regions", done=True)
    return out
