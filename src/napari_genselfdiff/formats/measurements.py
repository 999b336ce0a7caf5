"""Per-object measurements a pathologist expects (as QuPath gives them), in microns where the pixel
size is known: the table shown on a result layer (its ``features``), saved as CSV, and the same
shape numbers in the GeoJSON export's ``measurements``.

Columns (QuPath's names, units in the name; ``px`` instead of ``µm`` when the pixel size is unknown):

- ``Object ID``; ``Centroid X µm`` / ``Centroid Y µm`` (in the measured array's own grid);
- ``Area µm^2`` (pixel count), ``Perimeter µm`` (scikit-image's estimate of the boundary's length,
  not the pixel staircase), ``Circularity`` (4 pi area / perimeter^2, 1 for a disc), ``Eccentricity``
  and ``Solidity`` (area / convex area) of the pixel mask;
- with the RGB image: ``Hematoxylin OD mean`` and ``Eosin OD mean``, the mean optical density of
  each stain after colour deconvolution (scikit-image ``rgb2hed``, Ruifrok and Johnston's vectors);
- with the model's probability: ``Probability mean``.

:func:`region_summary` counts objects in a drawn region: objects per mm^2 and the area fraction.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Sequence

import numpy as np

from ..core.atomic import atomic_open, check_target
from ..core.errors import DataError

SHAPE = ("Area", "Perimeter", "Circularity", "Eccentricity", "Solidity")


def unit_names(mpp: float | None) -> tuple[str, str]:
    """(length unit, area unit) in column names: µm with a pixel size, px without."""
    return ("µm", "µm^2") if mpp else ("px", "px^2")


def _check(labels: np.ndarray, mpp: float | None, *others: tuple[str, np.ndarray | None]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 2-D integer array, got {labels.ndim}-D {labels.dtype}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise DataError(f"pixel size must be a finite number > 0 µm, got {mpp}")
    for name, arr in others:
        if arr is not None and np.asarray(arr).shape[:2] != labels.shape:
            raise DataError(f"{name} is {np.asarray(arr).shape[:2]}, the labels {labels.shape}: not the same pixels")
    return labels


def measure_objects(labels: np.ndarray, *, image: np.ndarray | None = None, probability: np.ndarray | None = None,
                    mpp: float | None = None) -> dict[str, np.ndarray]:
    """One row per object id > 0 of ``labels`` (columns as in the module docstring), in id order.

    ``image``: the RGB pixels the labels cover (uint8, same height and width); ``probability``:
    the model's foreground probability there (float in [0, 1], or uint8 0..255); ``mpp``: microns
    per pixel of this grid (None: lengths in pixels)."""
    from skimage.measure import regionprops_table

    labels = _check(labels, mpp, ("the image", image), ("the probability", probability))
    length, area = unit_names(mpp)
    s = mpp or 1.0
    channels = []
    if image is not None:
        from skimage.color import rgb2hed

        hed = rgb2hed(np.asarray(image)[..., :3])
        channels += [hed[..., 0], hed[..., 1]]
    if probability is not None:
        p = np.asarray(probability, dtype=np.float32)
        channels.append(p / 255.0 if np.asarray(probability).dtype == np.uint8 else p)
    props = ["label", "area", "perimeter", "eccentricity", "solidity", "centroid"]
    intensity = np.stack(channels, axis=-1) if channels else None
    if intensity is not None:
        props.append("intensity_mean")
    t = regionprops_table(labels, intensity_image=intensity, properties=props)
    px_area = t["area"].astype(np.float64)
    perim = t["perimeter"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(perim > 0, np.minimum(1.0, 4 * np.pi * px_area / perim ** 2), 1.0)
    out = {"Object ID": t["label"].astype(np.int64),
           f"Centroid X {length}": t["centroid-1"] * s, f"Centroid Y {length}": t["centroid-0"] * s,
           f"Area {area}": px_area * s * s, f"Perimeter {length}": perim * s,
           "Circularity": circ, "Eccentricity": t["eccentricity"], "Solidity": t["solidity"]}
    k = 0
    if image is not None:
        out["Hematoxylin OD mean"], out["Eosin OD mean"] = t["intensity_mean-0"], t["intensity_mean-1"]
        k = 2
    if probability is not None:
        out["Probability mean"] = t[f"intensity_mean-{k}"]  # a channel axis, even of one channel
    return out


def shape_of_one(mask: np.ndarray, mpp: float | None, downsample: float = 1.0) -> dict[str, float]:
    """The shape columns of one object given as a boolean mask (the GeoJSON export's), with
    ``downsample`` full-resolution pixels per mask pixel and ``mpp`` microns per full-resolution pixel."""
    table = measure_objects(np.asarray(mask, dtype=np.uint8), mpp=None)
    length, area = unit_names(mpp)
    s = (mpp or 1.0) * downsample
    return {f"Area {area}": float(table["Area px^2"][0]) * s * s, f"Perimeter {length}": float(table["Perimeter px"][0]) * s,
            "Circularity": float(table["Circularity"][0]), "Eccentricity": float(table["Eccentricity"][0]),
            "Solidity": float(table["Solidity"][0])}


def region_summary(labels: np.ndarray, region: np.ndarray | None = None, mpp: float | None = None) -> dict:
    """Counts in a drawn region (a boolean mask; None: the whole array): objects whose centroid pixel
    lies inside, their density (per mm^2 with a pixel size, else per megapixel) and the fraction of
    the region's area they cover."""
    labels = _check(labels, mpp, ("the region", region))
    region = np.ones(labels.shape, bool) if region is None else np.asarray(region, bool)
    n_px = int(region.sum())
    if n_px == 0:
        raise DataError("the region is empty: draw it over the image first")
    from skimage.measure import regionprops_table

    t = regionprops_table(labels, properties=["label", "centroid"])
    cy = np.clip(np.round(t["centroid-0"]).astype(int), 0, labels.shape[0] - 1)
    cx = np.clip(np.round(t["centroid-1"]).astype(int), 0, labels.shape[1] - 1)
    n = int(region[cy, cx].sum())
    covered = float(((labels > 0) & region).sum()) / n_px
    if mpp:
        mm2 = n_px * (mpp / 1000.0) ** 2
        return {"objects": n, "area mm^2": mm2, "objects per mm^2": n / mm2, "area fraction": covered}
    return {"objects": n, "area px^2": n_px, "objects per Mpx": n / (n_px / 1e6), "area fraction": covered}


def is_our_csv(path: str | os.PathLike) -> bool:
    """A measurements CSV we wrote: its header starts with our first column."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith("Object ID,")
    except (OSError, UnicodeDecodeError):
        return False


def write_csv(path: str | os.PathLike, table: dict[str, Sequence], *, force: bool = False,
              inputs: Sequence = ()) -> int:
    """``table`` (columns of equal length) as a CSV file, written atomically; returns the rows. An
    existing file is replaced only with ``force`` and only when it is a measurements CSV of ours."""
    check_target(path, kind="measurements CSV", force=force, ours=is_our_csv, inputs=inputs)
    cols = list(table)
    n = len(table[cols[0]]) if cols else 0
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i in range(n):
            w.writerow([_cell(table[c][i]) for c in cols])
    return n


def _cell(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.6g}"
