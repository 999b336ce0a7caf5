"""What fine-tuning scores itself on while it trains: a small, fixed set of validation crops.

Scoring every validation image at full size after every few steps can cost more than the training
itself (17 GlaS images ~ 7 Mpx per pass). By default fine-tuning validates on at most
:data:`VAL_CROPS` crops of at most :data:`VAL_CROP` pixels, chosen once, deterministically, from
the validation images (:func:`validation_crops`); ``FinetuneConfig.val_crops = 0`` keeps whole
images. Scoring is a generator (:func:`iter_evaluate_dice`) that reports each crop, so the
training loop can show "validating 3/8", count it in the ETA and stop between crops.
"""
from __future__ import annotations

from typing import Generator, Sequence

import numpy as np

from ..data import LabeledImage
from ..inference import predict_image

#: Default number of validation crops, and their largest side in pixels.
VAL_CROPS = 8
VAL_CROP = 512
#: Candidate positions tried per crop (the most informative one is kept).
_CANDIDATES = 8


def validation_crops(items: Sequence[LabeledImage], n: int = VAL_CROPS, size: int = VAL_CROP,
                     seed: int = 0) -> list[LabeledImage]:
    """At most ``n`` crops of at most ``size`` x ``size`` pixels of ``items``; ``n <= 0``: the
    images themselves.

    The same arguments always give the same crops. The crops come from images spread evenly
    over ``items`` (several from one image when there are fewer images than crops); an image
    no larger than a crop is taken whole, once. Each crop's position is the one, of a few seeded
    candidates, whose foreground fraction is closest to one half, so a crop is rarely all
    background (where Dice says little). Crops are named ``<image>@y,x``.
    """
    items = list(items)
    if n <= 0 or not items:
        return items
    size = max(int(size), 1)
    picks = [int(i) for i in np.round(np.linspace(0, len(items) - 1, n))] if len(items) >= n else \
        [k % len(items) for k in range(n)]
    out: list[LabeledImage] = []
    whole: set[int] = set()
    for k, i in enumerate(picks):
        it = items[i]
        h, w = it.target.shape[:2]
        if h <= size and w <= size:
            if i not in whole:
                whole.add(i)
                out.append(it)
            continue
        ch, cw = min(h, size), min(w, size)
        rng = np.random.default_rng([seed, 15485863, k])
        fg = it.target > 0
        best, best_score = (0, 0), np.inf
        for _ in range(_CANDIDATES):
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            score = abs(float(fg[y:y + ch, x:x + cw].mean()) - 0.5)
            if score < best_score:
                best, best_score = (y, x), score
        y, x = best
        inst = it.instances[y:y + ch, x:x + cw] if it.instances is not None else None
        out.append(LabeledImage(f"{it.name}@{y},{x}", it.image[y:y + ch, x:x + cw], it.target[y:y + ch, x:x + cw],
                                inst))
    return out


def iter_evaluate_dice(predictor, items: Sequence[LabeledImage]) -> Generator[tuple[int, int], None, dict]:
    """Mean foreground Dice (class > 0) of ``predictor`` over ``items`` (images or crops, each
    predicted in one piece); yields (done, total) after each item and returns
    ``{"val_dice", "n_val"}``."""
    from ..eval.metrics import dice

    scores = []
    for k, it in enumerate(items, start=1):
        classes = predict_image(predictor, it.image)[:getattr(predictor, "num_classes", None)]  # not a distance map
        scores.append(dice(classes.argmax(0) > 0, it.target > 0))
        yield k, len(items)
    return {"val_dice": float(np.mean(scores)) if scores else float("nan"), "n_val": len(items)}


def describe(items: Sequence[LabeledImage], crops: Sequence[LabeledImage], n: int, size: int) -> str:
    """What a validation set is, for a message: "8 crop(s) of up to 512 px from 17 image(s)"."""
    if n <= 0:
        return f"{len(items)} whole image(s)"
    return f"{len(crops)} crop(s) of up to {size} px from {len(items)} image(s)"


def validations_left(step: int, total: int, val_every: int) -> int:
    """Validation passes of a run after ``step`` (at every multiple of ``val_every`` and at ``total``)."""
    if not val_every or step >= total:
        return 0
    return total // val_every - step // val_every + (total % val_every != 0)


def pass_cost(crops: Sequence[LabeledImage], batch_pixels: int, calibration_batches: int) -> float:
    """A validation pass in training steps of ``batch_pixels`` pixels (a forward pass costs about
    a third of a training step), BatchNorm calibration batches included: the ETA's guess until
    the first pass has been timed."""
    return (calibration_batches * batch_pixels + sum(it.target.size for it in crops)) / (3 * batch_pixels)


def evaluate_dice(predictor, items: Sequence[LabeledImage]) -> dict:
    """Mean foreground Dice (class > 0) of ``predictor`` over whole images (or crops), in one call."""
    from ..progress import run_to_end

    return run_to_end(iter_evaluate_dice(predictor, items))


def iter_tune_on(predictor, items: Sequence[LabeledImage], instances: dict | None, task: str,
                 mpp: float | None) -> Generator[tuple[str, int, int], None, tuple[dict, dict]]:
    """The object thresholds a model's probabilities on ``items`` score best with
    (:func:`..eval.tuning.tune_postprocess`; ``instances`` by image name are their true objects
    where known): yields ("predicting the validation images" | "choosing object thresholds", done,
    total); returns (options, report)."""
    from ..eval.tuning import instances_of_target, iter_tune_postprocess
    from ..progress import relay

    probs = []
    for i, it in enumerate(items, 1):
        probs.append(predict_image(predictor, it.image))
        yield "predicting the validation images", i, len(items)
    gts = [(instances or {}).get(it.name) for it in items]
    gts = [g if g is not None else instances_of_target(it.target, task) for g, it in zip(gts, items)]
    return (yield from relay(iter_tune_postprocess(task, probs, gts, mpp=mpp),
                             lambda kn: ("choosing object thresholds", *kn)))
