"""Sample data for napari's File > Open Sample menu: the bundled H&E image."""
from __future__ import annotations

import numpy as np

SAMPLE_NAME = "H&E skin (CMU-1 crop; nuclei model — no glands here)"  # says what the bundled models are for on it


def sample_he() -> list[tuple]:
    """A 1024 x 768 crop of the OpenSlide CMU-1 skin slide (H&E), with the microns per pixel its
    file records (about 0.5) in the layer metadata and as its scale (in microns)."""
    from ._widgets.geometry import slide_scale
    from .bundled import sample_image_path
    from .slide.reader import open_slide

    with open_slide(sample_image_path()) as slide:
        image, mpp = np.asarray(slide.levels[0]), slide.mpp
    return [(image, {"name": SAMPLE_NAME, "rgb": True, "metadata": {"mpp": mpp}, **slide_scale(mpp)}, "image")]
