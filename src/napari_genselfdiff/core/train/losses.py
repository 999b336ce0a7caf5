"""Segmentation losses. Each takes logits (B, C, H, W) and integer targets (B, H, W).

The paper's fine-tuning loss is focal (gamma = 2) + structural similarity (beta = 0.1, C = 0.01),
weighted 1:1. :func:`build_loss` parses any weighted sum by name, e.g. ``"focal+ssl"`` or
``"0.5*dice+ce"``.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017): mean over pixels of -(1 - p_t)^gamma log p_t."""
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target.long()[:, None]).squeeze(1)
    return (-(1 - logp_t.exp()) ** gamma * logp_t).mean()


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target.long())


def ssl_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 0.1, C: float = 0.01) -> torch.Tensor:
    """Structural similarity loss (Zhao et al. 2019, "correlation maximized structural similarity").

    Per image and class channel, the structural difference between target y and prediction p is
    e = |(y - mu_y + C) / (sigma_y + C) - (p - mu_p + C) / (sigma_p + C)|. Pixels whose e exceeds
    beta * max(e) are the "hard" ones; the loss is the e-weighted binary cross-entropy averaged
    over them. e acts as a weight (no gradient flows through it), as in the reference.
    """
    p = logits.float().softmax(dim=1)
    y = _one_hot(target, logits.shape[1])
    dims = (2, 3)
    mu_y, sd_y = y.mean(dims, keepdim=True), y.std(dims, keepdim=True, unbiased=False)
    mu_p, sd_p = p.mean(dims, keepdim=True), p.std(dims, keepdim=True, unbiased=False)
    with torch.no_grad():
        e = ((y - mu_y + C) / (sd_y + C) - (p - mu_p + C) / (sd_p + C)).abs()
        e_max = e.flatten(1).max(dim=1).values[:, None, None, None]
        f = (e > beta * e_max).float()
    bce = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y, reduction="none")
    return (e * f * bce).sum() / f.sum().clamp(min=1.0)


def _soft_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft TP, FP, FN per class over the batch, foreground classes only (class 0 = background)."""
    p = logits.float().softmax(dim=1)
    y = _one_hot(target, logits.shape[1])
    dims = (0, 2, 3)
    tp = (p * y).sum(dims)
    fp = (p * (1 - y)).sum(dims)
    fn = ((1 - p) * y).sum(dims)
    return tp[1:], fp[1:], fn[1:]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, averaged over foreground classes."""
    tp, fp, fn = _soft_counts(logits, target)
    return 1 - ((2 * tp + smooth) / (2 * tp + fp + fn + smooth)).mean()


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                 smooth: float = 1.0) -> torch.Tensor:
    """1 - Tversky index (alpha weighs false positives, beta false negatives)."""
    tp, fp, fn = _soft_counts(logits, target)
    return 1 - ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def contact_pixels(target: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: where touching nuclei meet, for targets with a boundary class (class 2).

    A boundary pixel with no background among its 8 neighbours lies between two nuclei rather than
    between a nucleus and the background; those pixels and their foreground neighbours are the
    ones a merge of two nuclei gets wrong. Targets without class 2 have none."""
    t = target.long()[:, None]
    near_bg = F.max_pool2d((t == 0).float(), 3, stride=1, padding=1) > 0
    seam = (t == 2) & ~near_bg
    return ((F.max_pool2d(seam.float(), 3, stride=1, padding=1) > 0) & (t > 0))[:, 0]


def contact_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the :func:`contact_pixels` only (0 where a batch has none): the
    seams between touching nuclei weigh as much as all other pixels together, like the U-Net
    paper's separation weight map (Ronneberger et al. 2015), whatever their number."""
    where = contact_pixels(target)
    if not bool(where.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return ce[where].mean()


LOSSES: dict[str, LossFn] = {
    "focal": focal_loss,
    "ssl": ssl_loss,
    "ce": cross_entropy_loss,
    "dice": dice_loss,
    "tversky": tversky_loss,
    "contact": contact_loss,
}

_TERM = re.compile(r"^\s*(?:((?:\d+(?:\.\d*)?|\.\d+)(?:e-?\d+)?)\s*\*\s*)?([a-z]+)\s*$")  # 2*dice, 1e-3*ce


def parse_loss(spec: str) -> list[tuple[float, str]]:
    """``"focal+ssl"`` -> [(1.0, 'focal'), (1.0, 'ssl')]; ``"0.5*dice+ce"`` -> [(0.5, 'dice'), (1.0, 'ce')]."""
    terms = []
    for part in spec.lower().split("+"):
        m = _TERM.match(part)
        if not m or m.group(2) not in LOSSES:
            raise ValueError(f"cannot read loss term {part.strip()!r} in {spec!r}: "
                             f"use weighted sums of {', '.join(LOSSES)}, e.g. 'focal+ssl' or '0.5*dice+ce'")
        weight = float(m.group(1)) if m.group(1) else 1.0
        if not math.isfinite(weight) or weight < 0 or weight > 1e6:
            raise ValueError(f"loss term {part.strip()!r} in {spec!r}: a weight must be a finite number from 0 to 1e6")
        terms.append((weight, m.group(2)))
    if not any(w > 0 for w, _ in terms):
        raise ValueError(f"loss {spec!r} weighs every term 0: training would learn nothing; give one term a weight > 0")
    return terms


def distance_loss(logit: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a distance-map logit (B, H, W) against its target in [0, 1]
    (:func:`napari_genselfdiff.core.data.distance_target`), averaged over all pixels."""
    return F.binary_cross_entropy_with_logits(logit.float(), distance.float())


def build_loss(spec: str, num_classes: int | None = None) -> Callable[..., torch.Tensor]:
    """The weighted sum ``spec`` as ``loss(logits, target, distance=None)``. With ``num_classes``,
    the terms see the first ``num_classes`` channels only; a ``distance`` target adds
    :func:`distance_loss` on the channel after them (models that also learn a distance map)."""
    terms = parse_loss(spec)

    def loss(logits: torch.Tensor, target: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        classes = logits if num_classes is None else logits[:, :num_classes]
        total = sum(w * LOSSES[name](classes, target) for w, name in terms)
        if distance is not None:
            total = total + distance_loss(logits[:, classes.shape[1]], distance)
        return total

    loss.__doc__ = f"weighted loss {spec!r}"
    return loss
