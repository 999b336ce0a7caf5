"""The Predict widget's field-of-view job (:func:`fov_job`, run in a worker thread: no Qt, no layers)
and what it needs of the viewer (:func:`region_on_screen`): the region on screen is predicted with a
margin around it at the level closest to the model's resolution, through a tile-caching
:class:`~napari_genselfdiff.slide.fov.FieldOfViewPredictor` kept between views; the objects the
view's border cuts are found whole (:mod:`napari_genselfdiff.slide.fov`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..core.errors import GenSelfDiffWarning
from ..core.inference import PredictorCache
from ..core.progress import in_background
from .geometry import Bounds, Region, at_model_level, grid_of, view_of, visible_region
from .models import fmt_mpp
from .slide_layer import downsamples_of
from .whole_slide import load_predictor, stain_normalizer

# ---------------------------------------------------------------------------------------------
# layers as the jobs need them


def region_on_screen(viewer, layer) -> Region:
    """(level, y, x, h, w): the part of ``layer`` on screen, in pixels of the level napari shows."""
    level = layer.data_level if layer.multiscale else 0
    shape = (layer.data[level] if layer.multiscale else layer.data).shape[:2]
    return visible_region(view_of(viewer), grid_of(layer), level, downsamples_of(layer)[level], shape, layer.name)


# ---------------------------------------------------------------------------------------------
# jobs (run in a worker thread; no Qt, no layers)

@dataclass
class FovKey:
    """What a field-of-view predictor (and its tile cache) is valid for."""

    model: Any  # the predictor cache's key: model path, device, weights' mtime
    source_id: int  # id of the layer's level-0 array (the cached slide keeps it alive)
    tile: int
    overlap: int
    stain: bool = False  # tiles stain-normalised (core/stain.py)


@dataclass
class FovResult:
    """What :func:`fov_job` returns: the region predicted, its probabilities and objects, and
    the layers' data prepared in the worker (so the GUI thread only hands arrays to napari)."""

    predictor: PredictorCache
    fov: tuple[FovKey, Any]  # (key, FieldOfViewPredictor), kept for the next view
    region: Region  # at the level the model ran on
    downsample: float  # of that level
    probs: np.ndarray
    instances: np.ndarray  # int32, as the labels layer shows it
    foreground: np.ndarray  # 1 - background probability, float32, as the probability layer shows it
    objects: int  # the largest object id
    mpp: float | None = None  # microns per pixel of that level (None: unknown)
    semantic: np.ndarray | None = None  # the class map, for models of more than one object class
    no_glands: str | None = None  # why a glands result does not look like glands (then no layer is added)
    model_values: dict = field(default_factory=dict)  # the model's own post-processing options
    view: Bounds | None = None  # the view itself (y, x, h, w) inside ``region``, which has a margin around it


def resolution_of(slide, level: int) -> str:
    """How a person reads the resolution of ``level``: '1.00 um/px (~10x)', not 'level 1'."""
    mpp = slide.level_mpp(level)
    return fmt_mpp(mpp) if mpp else f"level {level} (pixel size unknown)"


def shows_classes(predictor) -> bool:
    """Whether a model's class map is worth a layer of its own (more than one object class)."""
    return predictor.task not in ("glands", "nuclei") and len(predictor.class_names) > 2


#: A field of view showing the whole image and needing more tiles than this gets a warning.
WHOLE_VIEW_TILES = 16


def fov_job(model: str, device: str, cache: PredictorCache | None, slide, source_id: int, region: Region,
            tile: int, overlap: int, fov: tuple[FovKey, Any] | None, precision: str = "auto",
            overrides: dict | None = None, stain: bool = False) -> Iterator[Any]:
    """Predict the visible region; returns a :class:`FovResult`.

    Yields the tiler's progress after every model call (so Cancel stops within about half a
    second, and the panel shows tiles, speed and ETA), and warns when the view is the whole image.
    The FOV predictor (and its tile cache) is kept while the model, the image and the tiling are
    the same. ``overrides``: post-processing values to use instead of the model's (the live
    Objects controls, :mod:`.objects`). ``stain``: the tiles' stain normalised to the model's
    training stain (core/stain.py; the image's statistics taken once, as a whole-slide run does).
    """
    from ..core.eval.postprocess import options_for, postprocess
    from ..core.stain import with_stain
    from ..slide.fov import FieldOfViewPredictor, objects_in_view, view_margin, with_margin

    cache, overlap = yield from load_predictor(model, device, cache, tile, overlap, precision)
    predictor = cache.predictor
    key = FovKey(cache.key, source_id, tile, overlap, stain)
    if fov is None or fov[0] != key:
        run = with_stain(predictor, (yield from stain_normalizer(predictor, slide))) if stain else predictor
        fov = (key, FieldOfViewPredictor(run, slide, 0, tile, overlap, 256))
    region = at_model_level(region, slide.downsamples, [lv.shape for lv in slide.levels], slide.mpp, predictor.mpp)
    level, vy, vx, vh, vw = region
    shape = tuple(int(v) for v in slide.levels[level].shape[:2])
    # a margin around the view: the objects its border cuts are found whole (the view's own objects only)
    margin = view_margin(predictor.task, slide.level_mpp(level) or predictor.mpp)  # in the level's pixels
    (y, x, h, w), view = with_margin((vy, vx, vh, vw), margin, shape)
    todo = fov[1].uncached(level, y, x, h, w)
    if (vh, vw) == shape and todo > WHOLE_VIEW_TILES:
        warnings.warn(GenSelfDiffWarning(
            f"the view shows all of {slide.path.name} ({todo} tiles at level {level}): this takes as long as "
            "'Predict whole slide', which also saves the result and resumes; zoom in for a quick look"))
    scale = fov[1].scale(level)
    at_model = f", resampled to the model's {fmt_mpp(predictor.mpp)}" if scale.needed and predictor.mpp else ""
    yield f"predicting {vw}x{vh} pixels at {resolution_of(slide, level)}{at_model}…"
    probs = yield from fov[1].iter_region(level, y, x, h, w)
    model_values = options_for("nuclei" if predictor.task == "nuclei" else "glands",
                               getattr(predictor, "postprocess_options", None))
    # in the level's pixels where the level is resampled to the model's um/px (slide/rescale.py)
    level_values = scale.level_options({**model_values, **(overrides or {})})
    semantic, instances = yield from in_background(postprocess, probs, predictor.task, level_values,
                                                   status="finding objects…")
    instances = objects_in_view(instances.astype(np.int32, copy=False), view)
    region = (level, y, x, h, w)
    foreground = np.subtract(1.0, probs[0], dtype=np.float32)
    no_glands = None
    if predictor.task == "glands":
        from ..core.eval.glandular import check_glands, warn_no_glands

        iy, ix = view[:2]  # the view itself: the objects of the margin are not the view's
        inner = (slice(iy, iy + vh), slice(ix, ix + vw))
        check = check_glands(instances[inner], foreground[inner],
                             np.asarray(slide.levels[level][vy:vy + vh, vx:vx + vw]), slide.level_mpp(level))
        no_glands = warn_no_glands(check)
    return FovResult(cache, fov, region, slide.downsamples[level], probs, instances, foreground,
                     int(instances.max(initial=0)), mpp=slide.level_mpp(level),
                     semantic=semantic if shows_classes(predictor) else None, no_glands=no_glands,
                     model_values=model_values, view=view)
