"""An image layer as the :class:`~napari_genselfdiff.slide.reader.Slide` the prediction jobs read
(Predict's field of view and whole slide, Refine's suggestions and annotation): the very arrays
napari shows, its pyramid's downsamples, and its pixel size (attribute reads only, no napari import)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import DataError
from .geometry import GIVEN_MPP, layer_downsamples, stated_mpp


def downsamples_of(layer) -> list[float]:
    """How many level-0 pixels one pixel of each of ``layer``'s levels spans."""
    return layer_downsamples(layer.downsample_factors if layer.multiscale else None)


def layer_slide(layer, mpp: float | None = None):
    """The image layer as a :class:`~napari_genselfdiff.slide.reader.Slide` over the very arrays
    napari shows (so predictions line up with the display), named after its file if it has one.
    Its pixel size is the one read from the file (``layer.metadata["mpp"]``), else the layer's
    scale when it is in microns, else ``mpp`` (a widget's field), else the one given for the
    layer when it was asked (:mod:`.pixelsize`), else unknown."""
    import dask.array as da

    from ..slide.reader import Slide, coarsened_levels

    if not layer.rgb:
        raise DataError(f"layer {layer.name!r} is not an RGB image")
    levels = list(layer.data) if layer.multiscale else [layer.data]
    if levels[0].dtype != np.uint8:
        raise DataError(f"layer {layer.name!r}: expected RGB uint8 pixels, got {levels[0].dtype}")
    levels = [lv if isinstance(lv, da.Array) else da.from_array(lv, chunks=(1024, 1024, -1)) for lv in levels]
    downsamples = downsamples_of(layer)
    if len(levels) == 1:  # lazily coarsened levels, so a model trained at lower resolution can run
        levels = [levels[0]] + coarsened_levels(levels[0])
        downsamples = [2.0 ** i for i in range(len(levels))]
    path = layer.source.path or layer.metadata.get("path") or layer.name
    mpp = stated_mpp(layer) or mpp or layer.metadata.get(GIVEN_MPP) or None
    return Slide(path=Path(path), levels=levels, downsamples=downsamples, mpp=mpp)
