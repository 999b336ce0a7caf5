"""Sample data for napari's File > Open Sample menu: the bundled H&E image."""
from __future__ import annotations

SAMPLE_NAME = "H&E skin (CMU-1 crop)"
SAMPLE_MPP = 0.499  # 20x Aperio scan, see resources/SAMPLE_LICENSE.md


def sample_he() -> list[tuple]:
    """A 1024 x 768 crop of the OpenSlide CMU-1 skin slide (H&E, ~0.5 micron per pixel)."""
    from .core.data import read_image
    from .models import sample_image_path

    image = read_image(sample_image_path())
    return [(image, {"name": SAMPLE_NAME, "rgb": True, "metadata": {"mpp": SAMPLE_MPP}}, "image")]
