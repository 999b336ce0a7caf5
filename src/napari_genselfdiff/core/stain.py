"""Stain normalisation at inference, an option (``--stain-normalize``, the Predict widget's check box):
an image's tissue colours moved to the stain of the model's training images before the model sees them.

Reinhard et al. (2001) in CIE Lab, as is usual for H&E: each tissue pixel's L, a and b are standardised
by the image's tissue mean and spread and given the training set's. Glass (:func:`tissue_pixels`) is
left as it is. Once the image's statistics are known the change is a function of the pixel alone, so
tiling still cannot change the answer; the statistics come from the whole image, or from a sample of a
slide's level taken once before the run (:mod:`..slide.stain`), and a slide's store records them.

A model records its training images' statistics in its config.json (``stain_targets``: one entry per
training set, e.g. MoNuSeg and CoNSeP for the nuclei model); an image is moved to the nearest of them.
Why an option and not the default (benchmarks/RESULTS.md, "Stain normalisation at inference"): it
pays when the stain differs from the training set's (a nuclei model trained on one of MoNuSeg and
CoNSeP, scored on the other: AJI +0.035 / +0.038 on the validation splits, +0.08 / +0.22 on the test
splits), and costs 0.01-0.08 AJI on images like the training ones (the shipped nuclei model on
CoNSeP's test tiles: -0.08), whose differences in colour are partly differences in what they show.

Pure numpy and scikit-image.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .eval.glandular import tissue_pixels

#: Statistics are taken over at most this many tissue pixels (an even stride over the rest).
MAX_PIXELS = 2_000_000
#: Fewer tissue pixels than this (an image of glass) leave nothing to normalise by.
MIN_PIXELS = 1_000


@dataclass(frozen=True)
class LabStats:
    """Mean and standard deviation of L, a and b over tissue pixels."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"lab_mean": [round(float(v), 4) for v in self.mean], "lab_std": [round(float(v), 4) for v in self.std]}

    @classmethod
    def from_dict(cls, d: object, source: str = "config.json") -> "LabStats":
        """Read what :meth:`to_dict` wrote; a value someone edited into something else is a DataError."""
        try:
            mean = tuple(float(v) for v in d["lab_mean"])  # type: ignore[index]
            std = tuple(float(v) for v in d["lab_std"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise DataError(f"{source}: a stain target needs 'lab_mean' and 'lab_std', three numbers each") from None
        if len(mean) != 3 or len(std) != 3 or not all(np.isfinite(mean + std)) or min(std) <= 0:
            raise DataError(f"{source}: a stain target's 'lab_mean' and 'lab_std' must be three finite numbers "
                            "each, the spreads above 0")
        return cls(mean, std)  # type: ignore[arg-type]

    def distance(self, other: "LabStats") -> float:
        return float(np.linalg.norm(np.r_[np.subtract(self.mean, other.mean), np.subtract(self.std, other.std)]))


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb)[..., :3])


def lab_stats(images: Iterable[np.ndarray], what: str = "the image") -> LabStats:
    """The tissue pixels' Lab statistics over ``images`` (uint8 RGB), each image weighted by its
    tissue; at most :data:`MAX_PIXELS` pixels are converted (an even stride)."""
    picked = []
    for im in images:
        im = np.asarray(im)[..., :3]
        px = im[tissue_pixels(im)]
        picked.append(px)
    px = np.concatenate(picked) if picked else np.zeros((0, 3), np.uint8)
    if len(px) < MIN_PIXELS:
        raise DataError(f"{what}: too little tissue to normalise its stain by ({len(px)} pixels)")
    px = px[:: max(1, len(px) // MAX_PIXELS)]
    lab = _lab(px[None])[0]
    return LabStats(tuple(lab.mean(0).tolist()), tuple(np.maximum(lab.std(0), 1e-3).tolist()))


@dataclass(frozen=True)
class StainNormalizer:
    """Moves pixels of an image with ``source`` statistics to ``target`` (named ``target_name``)."""

    source: LabStats
    target: LabStats
    target_name: str

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` (..., H, W, 3) uint8 -> the same shape, uint8; glass pixels unchanged."""
        from skimage.color import lab2rgb

        rgb = np.asarray(rgb)
        flat = rgb.reshape(-1, rgb.shape[-1])[:, :3]
        keep = tissue_pixels(flat[None])[0]
        out = flat.copy()
        if keep.any():
            lab = _lab(flat[keep][None])[0]
            lab = (lab - self.source.mean) / np.asarray(self.source.std) * self.target.std + self.target.mean
            with warnings.catch_warnings():  # colours moved out of the sRGB gamut are clipped, as said there
                warnings.filterwarnings("ignore", message="Conversion from CIE-LAB", category=UserWarning)
                rgb_out = lab2rgb(lab[None])[0]
            out[keep] = np.clip(rgb_out * 255 + 0.5, 0, 255).astype(np.uint8)
        if rgb.shape[-1] != 3:  # an alpha channel or the like is kept
            out = np.concatenate([out, rgb.reshape(-1, rgb.shape[-1])[:, 3:]], axis=1)
        return out.reshape(rgb.shape).astype(np.uint8, copy=False)

    def to_dict(self) -> dict:
        return {"method": "reinhard-lab", "source": self.source.to_dict(), "target": self.target.to_dict(),
                "target_name": self.target_name}

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "settings") -> "StainNormalizer":
        if not isinstance(d, Mapping) or d.get("method") != "reinhard-lab":
            raise DataError(f"{source}: 'stain' must be a normalisation this version wrote (method 'reinhard-lab')")
        return cls(LabStats.from_dict(d.get("source"), source), LabStats.from_dict(d.get("target"), source),
                   str(d.get("target_name", "")))


def training_stain(items) -> dict:
    """What a fine-tuning records in config.json: ``{"training": stats}`` of its images' tissue, or
    nothing when they hold too little tissue to say (synthetic images)."""
    try:
        return {"training": lab_stats([it.image for it in items], "the training images").to_dict()}
    except DataError:
        return {}


def model_targets(config: Mapping, source: str = "config.json") -> dict[str, LabStats]:
    """The stain targets a model's config records; a DataError when it has none."""
    raw = config.get("stain_targets")
    if not raw:
        raise DataError(f"{source}: this model records no stain of its training images, so it cannot normalise "
                        "stain (models fine-tuned by this version do; run without --stain-normalize)")
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: 'stain_targets' must map a training set's name to its stain")
    return {str(k): LabStats.from_dict(v, source) for k, v in raw.items()}


def normalizer_for(stats: LabStats, targets: Mapping[str, LabStats]) -> StainNormalizer:
    """The normaliser from ``stats`` to the nearest of ``targets``."""
    name = min(targets, key=lambda k: stats.distance(targets[k]))
    return StainNormalizer(stats, targets[name], name)


class StainedPredictor:
    """A predictor whose tiles are stain-normalised first; every other attribute is the wrapped one's.
    A new wrapper per run (or per task on a cluster), so one loaded model serves slides of any stain."""

    def __init__(self, predictor, normalizer: StainNormalizer):
        self.predictor = predictor
        self.normalizer = normalizer

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.predictor(self.normalizer(tiles))

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)


def with_stain(predictor, stain: Mapping | StainNormalizer | None, source: str = "settings"):
    """``predictor`` itself, or wrapped in :class:`StainedPredictor` when ``stain`` says so."""
    if stain is None:
        return predictor
    norm = stain if isinstance(stain, StainNormalizer) else StainNormalizer.from_dict(stain, source)
    return StainedPredictor(predictor, norm)
