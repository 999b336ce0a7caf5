"""napari writer: a Labels layer as GeoJSON objects (QuPath), in full-resolution slide pixels."""
from __future__ import annotations

from typing import Any

import numpy as np

from .formats import qupath


def label_grid(meta: dict[str, Any]) -> tuple[tuple[float, float], float]:
    """(offset, downsample) of the layer's pixel grid in full-resolution pixels.

    Layers made by the Predict widget say so in their metadata; for any other layer the grid is
    read from its scale and translate, taking world units as full-resolution pixels (a label
    pixel j of scale d is centred at translate + d*j, so its edge sits at translate + 0.5 - d/2);
    a layer in microns (or another length), e.g. one drawn over a slide shown in microns, has
    one label pixel per full-resolution pixel.
    """
    info = meta.get("metadata", {}).get("genselfdiff", {})
    if "downsample" in info:
        return tuple(info["offset"]), float(info["downsample"])
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), float)[-2:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), float)[-2:]
    if any(str(u) not in ("pixel", "") for u in tuple(meta.get("units") or ())[-2:]):
        return tuple(float(v) for v in translate / scale), 1.0
    d = float(scale.mean())
    return tuple((translate + 0.5 - d / 2) / d), d


def write_geojson(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write every object (label id > 0) of the layer as one GeoJSON feature; returns [path].

    napari's save dialog has asked before replacing a file, so an existing one is replaced, but
    only a GeoJSON export of ours (anything else is refused: formats.geojson.is_our_geojson)."""
    from .formats.geojson import export_label_array_chunked

    labels = data[0] if meta.get("multiscale") or isinstance(data, list) else data
    if labels.ndim != 2:
        raise ValueError(f"GeoJSON export needs a 2-D Labels layer, got shape {labels.shape}")
    offset, downsample = label_grid(meta)
    name = meta.get("name")  # QuPath class and object type follow the layer name (formats.qupath)
    mpp = meta.get("metadata", {}).get("genselfdiff", {}).get("mpp")  # the Predict widget's layers say it
    export_label_array_chunked(labels, path, offset=offset, downsample=downsample,
                               class_name=qupath.class_name(name), object_type=qupath.object_type(name),
                               force=True, mpp=mpp)
    return [path]
