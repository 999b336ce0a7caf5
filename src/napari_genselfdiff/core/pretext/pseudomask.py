"""Pseudo masks for the nucleus-aware pretext: synthetic nucleus instance masks whose statistics
are measured on the unlabeled tiles themselves.

The nucleus-aware pretext (after Song et al., "Nucleus-aware self-supervised pretraining using
unpaired image-to-image translation for histopathology images", IEEE TMI, arXiv 2309.07394)
translates between H&E tiles and masks of nuclei that were never paired with them. Its masks must
look like the nuclei of *these* tiles (size, elongation, orientation, how many per area), but no
label may be used. So:

* :func:`measure_nuclei` finds rough nuclei on unlabeled tiles: the haematoxylin channel by colour
  deconvolution (``skimage.color.rgb2hed``), Otsu's threshold, small objects dropped, holes
  filled, touching nuclei split by the distance watershed of :func:`..data.split_touching`; then
  per nucleus its area, axis ratio and orientation (``skimage.measure.regionprops``) and per tile
  the count per area. The rough segmentation is only a source of statistics, never a target.
* :class:`NucleusStats` summarises them: log-normal area and axis ratio, an orientation
  histogram, and a gamma-Poisson count per tile (mean and spread of the density).
* :func:`draw_instances` draws a seeded instance mask: random ellipses from those distributions,
  placed uniformly, each allowed to overlap the earlier ones by at most ``max_overlap`` of its
  area (lightly touching, as real nuclei are), the earlier ones keeping their pixels.
* :func:`mask_image` turns instances into what the networks see (foreground, inner boundary and a
  per-nucleus normalised distance, in [-1, 1]); :func:`instance_target` into the class ids the
  segmentation loss takes (0 background, 1 nucleus, 2 boundary: the recipe of
  :func:`..data.mask_to_target` with a boundary class).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
from scipy import ndimage as ndi

from ..errors import DataError

ORIENTATION_BINS = 12  # over [-pi/2, pi/2), regionprops' convention
MIN_AREA = 8  # px: smaller haematoxylin specks are not nuclei


@dataclass(frozen=True)
class NucleusStats:
    """The distributions pseudo masks are drawn from (pixels at the training resolution)."""

    log_area_mean: float = math.log(80.0)
    log_area_std: float = 0.45
    log_ratio_mean: float = 0.35  # log(major / minor axis), >= 0
    log_ratio_std: float = 0.25
    orientation_hist: tuple[float, ...] = field(default_factory=lambda: (1.0 / ORIENTATION_BINS,) * ORIENTATION_BINS)
    density_mean: float = 10.0  # nuclei per 10,000 px
    density_std: float = 4.0
    n_nuclei: int = 0  # how many nuclei the statistics were measured on (0: the defaults)
    n_tiles: int = 0

    @property
    def mean_area(self) -> float:
        """The mean of the log-normal area distribution, px."""
        return math.exp(self.log_area_mean + self.log_area_std ** 2 / 2)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["orientation_hist"] = list(self.orientation_hist)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NucleusStats":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "orientation_hist" in known:
            known["orientation_hist"] = tuple(float(v) for v in known["orientation_hist"])
        return cls(**known)


# ---------------------------------------------------------------------------------------------
# measuring

def rough_nuclei(tile: np.ndarray) -> np.ndarray:
    """Rough nucleus instances of an RGB uint8 tile (int32 labels): haematoxylin by colour
    deconvolution, Otsu, specks dropped and holes filled, touching nuclei split by watershed."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from ..data import split_touching

    img = np.clip(np.asarray(tile, np.float32) / 255.0, 1e-3, 1.0)
    h = ndi.gaussian_filter(rgb2hed(img)[..., 0], 1.0)
    if float(h.max() - h.min()) < 1e-6:
        return np.zeros(h.shape, np.int32)
    fg = h > threshold_otsu(h)
    lab, _ = ndi.label(fg)
    fg = ndi.binary_fill_holes((lab > 0) & (np.bincount(lab.ravel())[lab] >= MIN_AREA))
    return split_touching(fg)


def measure_tile(tile: np.ndarray) -> dict:
    """The rough nuclei of one RGB uint8 tile: ``areas``, ``ratios`` (major / minor axis) and
    ``angles`` of the nuclei clear of the tile's edge, and ``density`` (every nucleus counted by
    its centre, per 10,000 px). Fragments and clumps (under 15 % or over 4 times the tile's
    upper-quartile area) are left out."""
    from skimage.measure import regionprops

    inst = rough_nuclei(tile)
    h, w = inst.shape
    props = [p for p in regionprops(inst) if p.area >= MIN_AREA]
    if props:
        q75 = float(np.percentile([p.area for p in props], 75))
        props = [p for p in props if 0.15 * q75 <= p.area <= 4 * q75]
    inner = [p for p in props if p.bbox[0] > 0 and p.bbox[1] > 0 and p.bbox[2] < h and p.bbox[3] < w
             and p.axis_minor_length > 0]
    return {"areas": [float(p.area) for p in inner],
            "ratios": [max(p.axis_major_length / p.axis_minor_length, 1.0) for p in inner],
            "angles": [float(p.orientation) for p in inner], "density": len(props) / (h * w) * 1e4}


def summarise(measured: Iterable[dict]) -> NucleusStats:
    """:class:`NucleusStats` of :func:`measure_tile` results: log-normal area and axis ratio with a
    robust centre and spread (median, scaled MAD: specks and clumps the rough segmentation lets
    through do not widen them), an add-one orientation histogram, the density's mean and spread."""
    measured = list(measured)
    areas = [a for m in measured for a in m["areas"]]
    if len(areas) < 5:
        raise DataError(f"found only {len(areas)} nucleus-like objects on {len(measured)} unlabeled tile(s): "
                        "the nucleus-aware pretext needs H&E tiles with nuclei (larger or more tiles)")
    la = np.log(areas)
    lr = np.log([r for m in measured for r in m["ratios"]])
    spread = [1.4826 * float(np.median(np.abs(v - np.median(v)))) for v in (la, lr)]
    angles = [a for m in measured for a in m["angles"]]
    hist, _ = np.histogram(angles, bins=ORIENTATION_BINS, range=(-np.pi / 2, np.pi / 2))
    hist = (hist + 1.0) / (hist.sum() + ORIENTATION_BINS)  # add-one: no orientation impossible
    dens = [m["density"] for m in measured]
    return NucleusStats(float(np.median(la)), spread[0], float(np.median(lr)), spread[1],
                        tuple(float(v) for v in hist), float(np.mean(dens)), float(np.std(dens)),
                        len(areas), len(measured))


def measure_nuclei(tiles: Iterable[np.ndarray]) -> NucleusStats:
    """:class:`NucleusStats` of the rough nuclei of ``tiles`` (RGB uint8, all at the training
    resolution): :func:`summarise` over :func:`measure_tile`."""
    return summarise(measure_tile(t) for t in tiles)


# ---------------------------------------------------------------------------------------------
# drawing

def _count(stats: NucleusStats, pixels: int, rng: np.random.Generator) -> int:
    """Nuclei in a tile of ``pixels``: gamma-Poisson with the measured mean and spread."""
    mean = max(stats.density_mean, 0.0) * pixels / 1e4
    if mean <= 0:
        return 0
    std = max(stats.density_std, 0.0) * pixels / 1e4
    extra = std ** 2 - mean  # the gamma carries the spread beyond Poisson's
    lam = rng.gamma(mean ** 2 / extra, extra / mean) if extra > 1e-9 else mean
    return int(rng.poisson(lam))


def draw_instances(stats: NucleusStats, size: int, rng: np.random.Generator, max_overlap: float = 0.1,
                   tries: int = 20) -> np.ndarray:
    """A ``size`` x ``size`` int32 instance mask of random elliptical nuclei drawn from ``stats``
    (ids 1..n in drawing order). Centres lie in the tile (a nucleus may run over its edge); a
    nucleus overlapping earlier ones by more than ``max_overlap`` of its pixels is redrawn
    elsewhere, up to ``tries`` times, then dropped."""
    from skimage.draw import ellipse

    inst = np.zeros((size, size), np.int32)
    hist = np.asarray(stats.orientation_hist, float)
    hist = hist / hist.sum()
    width = np.pi / len(hist)
    label = 0
    for _ in range(_count(stats, size * size, rng)):
        area = math.exp(rng.normal(stats.log_area_mean, stats.log_area_std))
        ratio = math.exp(abs(rng.normal(stats.log_ratio_mean, stats.log_ratio_std)))
        major = math.sqrt(area * ratio / math.pi)
        minor = max(math.sqrt(area / (ratio * math.pi)), 0.75)
        theta = -np.pi / 2 + (int(rng.choice(len(hist), p=hist)) + rng.random()) * width
        for _ in range(tries):
            r, c = rng.random(2) * size
            rr, cc = ellipse(r, c, major, minor, shape=inst.shape, rotation=theta)
            if rr.size == 0:
                continue
            taken = inst[rr, cc] > 0
            if taken.mean() <= max_overlap:
                label += 1
                inst[rr[~taken], cc[~taken]] = label
                break
    return inst


def mask_image(inst: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1]: foreground, inner boundary, and the distance to the nucleus'
    edge divided by that nucleus' largest (1 at its centre), of an instance mask."""
    from skimage.segmentation import find_boundaries

    inst = np.asarray(inst)
    fg = inst > 0
    boundary = find_boundaries(inst, mode="inner") & fg
    dist = ndi.distance_transform_edt(fg & ~boundary).astype(np.float32)
    if fg.any():
        ids = np.arange(int(inst.max()) + 1)
        peak = np.asarray(ndi.maximum(dist, inst, ids), np.float32)
        dist = np.where(fg, dist / np.maximum(peak[inst], 1.0), 0.0)
    return np.stack([fg, boundary, dist]).astype(np.float32) * 2 - 1


def instance_target(inst: np.ndarray) -> np.ndarray:
    """Class ids (uint8) of an instance mask: 0 background, 1 nucleus, 2 its inner boundary."""
    from skimage.segmentation import find_boundaries

    fg = np.asarray(inst) > 0
    target = fg.astype(np.uint8)
    target[find_boundaries(inst, mode="inner") & fg] = 2
    return target


def draw_batch(stats: NucleusStats, rng: np.random.Generator, batch: int, size: int
               ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``batch`` pseudo masks: mask images (B, 3, S, S) float32, class targets (B, S, S) int64,
    and the instance masks themselves."""
    insts = [draw_instances(stats, size, rng) for _ in range(batch)]
    images = np.stack([mask_image(i) for i in insts])
    targets = np.stack([instance_target(i) for i in insts]).astype(np.int64)
    return images, targets, insts


def render_mask(classes_or_image: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture of a mask for the sample grid: background black, nuclei light grey,
    boundaries orange. Takes class ids (H, W) or a mask image (3, H, W) in [-1, 1]."""
    a = np.asarray(classes_or_image)
    if a.ndim == 3:
        a = np.where(a[1] > 0, 2, np.where(a[0] > 0, 1, 0))
    palette = np.array([[0, 0, 0], [215, 215, 215], [255, 140, 0]], np.uint8)
    return palette[np.clip(a, 0, 2).astype(np.intp)]
