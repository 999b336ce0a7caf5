"""Does tiling change the answer? Tiled prediction of an image against the same image in one piece.

Used by ``benchmarks/tiler.py`` (the report), ``benchmarks/train_defaults.py`` (the default overlap
of a bundled model: the smallest one at which tiling stays within tolerance) and the tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from napari_genselfdiff.core.eval.postprocess import postprocess
from napari_genselfdiff.core.inference import predict_image
from napari_genselfdiff.slide.fov import FieldOfViewPredictor
from napari_genselfdiff.slide.reader import Slide


@dataclass(frozen=True)
class TilingDifference:
    tile: int
    overlap: int
    max_abs: float  # max |p_tiled - p_whole| over every class and pixel
    mean_abs: float
    objects_whole: int
    objects_tiled: int

    @property
    def object_change(self) -> float:
        """Relative change in the number of objects (0.01 = 1 %)."""
        return abs(self.objects_tiled - self.objects_whole) / max(self.objects_whole, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "object_change": self.object_change}


def image_slide(image: np.ndarray, mpp: float | None = None, name: str = "image") -> Slide:
    """A one-level in-memory :class:`Slide` over an (H, W, 3) uint8 array."""
    return Slide(path=Path(name), levels=[da.from_array(np.asarray(image), chunks=(1024, 1024, 3))],
                 downsamples=[1.0], mpp=mpp)


def tiled_probabilities(predictor, image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """(C, H, W) probabilities of ``image`` predicted in ``tile``-pixel tiles (the tiler's grid,
    window and blending; no tissue skipping)."""
    fov = FieldOfViewPredictor(predictor, image_slide(image), level=0, tile=tile, overlap=overlap, tissue=False)
    h, w = image.shape[:2]
    return fov.predict_region(0, 0, 0, h, w)


def compare(predictor, image: np.ndarray, tile: int, overlap: int, whole: np.ndarray | None = None) -> TilingDifference:
    """Tiled (``tile``, ``overlap``) against untiled prediction of ``image`` at its own resolution."""
    if whole is None:
        whole = predict_image(predictor, image)
    tiled = tiled_probabilities(predictor, image, tile, overlap)
    diff = np.abs(tiled - whole)
    task = getattr(predictor, "task", "glands")
    options = getattr(predictor, "postprocess_options", None)
    _, inst_w = postprocess(whole, task, options)
    _, inst_t = postprocess(tiled, task, options)
    count = lambda lab: int(len(np.unique(lab[lab > 0])))  # noqa: E731
    return TilingDifference(tile, overlap, float(diff.max()), float(diff.mean()), count(inst_w), count(inst_t))
