"""Run a model at the resolution it learned, whatever the resolution of the image it is given.

A model records the microns per pixel it was trained at (``config["mpp"]``; the bundled gland
model 1.24, the nuclei model 0.5). An image at another pixel size is resampled to the model's
pixel size, predicted there, and the result is brought back to the image's own pixel grid:
probabilities by bilinear interpolation, labels by nearest neighbour. Callers pass the image's
pixel size (read from the file, or ``--mpp``); ``None`` means unknown, and the model's own is
assumed (:func:`resolution_note` says so in one line).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# pixel sizes closer than this (relative) are treated as equal: no resampling for 2 % off
TOLERANCE = 0.05


@dataclass(frozen=True)
class Rescale:
    """How an image of ``shape`` at ``image_mpp`` maps to the model's grid at ``model_mpp``."""

    shape: tuple[int, int]
    image_mpp: float | None
    model_mpp: float | None

    @property
    def factor(self) -> float:
        """Model pixels per image pixel (0.5: the model sees the image at half size)."""
        if not self.image_mpp or not self.model_mpp:
            return 1.0
        f = self.image_mpp / self.model_mpp
        return 1.0 if abs(math.log(f)) < math.log1p(TOLERANCE) else f

    @property
    def needed(self) -> bool:
        return self.factor != 1.0

    @property
    def model_shape(self) -> tuple[int, int]:
        f = self.factor
        return (max(1, int(round(self.shape[0] * f))), max(1, int(round(self.shape[1] * f))))


def resolution_note(image_mpp: float | None, model_mpp: float | None, what: str = "the image") -> str | None:
    """One line for the user when the pixel size is unknown or the image is resampled; None when
    there is nothing to say."""
    if model_mpp is None:
        return None
    if image_mpp is None:
        return (f"{what}: pixel size unknown (no resolution in the file and no --mpp); assuming the "
                f"model's own {model_mpp:.3g} um/px")
    r = Rescale((1, 1), image_mpp, model_mpp)
    if r.needed:
        return f"{what}: {image_mpp:.3g} um/px, resampled x{r.factor:.3g} to the model's {model_mpp:.3g} um/px"
    return None


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H, W, 3) resampled to ``shape`` (anti-aliased when shrinking)."""
    from skimage.transform import resize

    if tuple(image.shape[:2]) == tuple(shape):
        return image
    shrink = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    out = resize(image, (*shape, image.shape[2]), order=1, mode="reflect", anti_aliasing=shrink,
                 preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_probabilities(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float probabilities -> (C, H, W), bilinear, renormalised to sum to 1."""
    from skimage.transform import resize

    if tuple(probs.shape[1:]) == tuple(shape):
        return probs
    out = resize(probs.astype(np.float32), (probs.shape[0], *shape), order=1, mode="edge",
                 anti_aliasing=False, preserve_range=True).astype(np.float32)
    out /= np.maximum(out.sum(0, keepdims=True), 1e-12)
    return out


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Integer labels resampled to ``shape`` by nearest neighbour (pixel-centre aligned)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    h, w = labels.shape
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[ys[:, None], xs[None, :]]


def segment_at_mpp(predictor, image: np.ndarray, image_mpp: float | None, postprocess,
                   predict_fn=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, Rescale]:
    """Probabilities, semantic labels and instances on ``image``'s own grid.

    Prediction *and* post-processing run at the model's resolution (object sizes, watershed
    distances and hole filling are tuned in model pixels); ``postprocess(probs) -> (semantic,
    instances)``. Probabilities come back bilinearly, labels by nearest neighbour.
    """
    if predict_fn is None:
        from .inference import predict_image as predict_fn
    r = Rescale(tuple(image.shape[:2]), image_mpp, getattr(predictor, "mpp", None))
    small = resize_image(image, r.model_shape) if r.needed else image
    probs = predict_fn(predictor, small)
    semantic, instances = postprocess(probs)
    if not r.needed:
        return probs, semantic, instances, r
    return (resize_probabilities(probs, r.shape), resize_labels(semantic, r.shape),
            resize_labels(instances, r.shape), r)
