"""An overlay picture: object outlines drawn over the image, for a person to look at (PNG)."""
from __future__ import annotations

import numpy as np

from . import qupath


def overlay(image: np.ndarray, labels: dict[str, np.ndarray]) -> np.ndarray:
    """The image with each label set's object outlines drawn in its colour
    (:data:`~napari_genselfdiff.formats.qupath.COLOURS`; yellow for other names)."""
    from skimage.segmentation import find_boundaries

    out = image.copy()
    for name, lab in labels.items():
        out[find_boundaries(lab, mode="inner")] = qupath.colour(name)
    return out
