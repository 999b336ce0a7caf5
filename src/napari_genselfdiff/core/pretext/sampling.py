"""Generate tiles from a pretrained diffusion model: the sanity check of a pretraining run.

A model that learned the pretext produces tiles with H&E colours and tissue-like texture; one that
did not produces coloured noise. :func:`tile_grid` lays them out for a PNG or a napari layer.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..checkpoint import load_model
from ..device import pick_device
from ..errors import CheckpointError
from ..precision import autocast, resolve_precision
from .diffusion import Diffusion, ScheduleConfig


#: Fewer pretraining steps than this: generated tiles are expected to look like coloured noise. The
#: shipped backbone's (resources/models/pretrained/MODEL_CARD.md) drew coloured noise early and H&E
#: colour, texture and nucleus-sized blobs by about 6,600 steps.
SHORT_PRETRAINING = 2000


def samples_note(steps: int | None) -> str:
    """One sentence on what generated tiles of a pretraining of ``steps`` steps mean."""
    if isinstance(steps, int) and 0 <= steps < SHORT_PRETRAINING:
        return (f"after only {steps} steps the tiles may well be coloured noise: that is expected of a short "
                "pretraining, not a fault; H&E colour and texture come after thousands of steps (the shipped "
                "backbone: 6,613), so resume it to go on")
    return ("H&E-like colour and texture mean the pretext was learned; coloured noise means it needs more "
            "steps (resume it to go on)")


def generate_tiles(model_path: str | os.PathLike, n: int = 16, *, size: int | None = None, steps: int = 50,
                   sampler: str = "ddim", seed: int = 0, device: str = "auto") -> np.ndarray:
    """``n`` generated tiles, (n, size, size, 3) uint8, from a pretraining checkpoint."""
    dev, _ = pick_device(device)
    model, cfg = load_model(model_path, dev)
    if cfg.get("kind") != "pretrain":
        raise CheckpointError(f"{model_path}: sampling needs a pretraining (diffusion) checkpoint, "
                              f"this is a {cfg.get('kind')} model")
    if not isinstance(cfg.get("pretext", "diffusion"), str):
        raise CheckpointError(f"{model_path}: config.json's pretext {cfg['pretext']!r} is not a pretext's name (edited?)")
    if cfg.get("pretext", "diffusion") != "diffusion":
        raise CheckpointError(f"{model_path}: a {cfg['pretext']}-aware pretraining has no diffusion model to "
                              "sample; its check is core.train.pretext_nucleus.nucleus_samples "
                              "(genselfdiff sample does it)")
    size = size or int(cfg.get("patch_size", 64))
    m = model.config.multiple
    size = max(m, size - size % m)
    try:
        schedule = ScheduleConfig.from_dict(cfg.get("schedule", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{model_path}: config.json's {e} (edited?)") from None
    diffusion = Diffusion(schedule).to(dev)
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(seed)
    with autocast(dev, resolve_precision("auto", dev)):
        if sampler == "ddpm":
            x = diffusion.sample_ddpm(model, (n, 3, size, size), generator=gen, device=dev)
        elif sampler == "ddim":
            x = diffusion.sample_ddim(model, (n, 3, size, size), steps=steps, generator=gen, device=dev)
        else:
            raise ValueError(f"unknown sampler {sampler!r}: ddim or ddpm")
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def tile_grid(tiles: np.ndarray, cols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Lay (n, h, w, 3) tiles out in a grid with ``pad`` pixels of ``fill`` between them."""
    n, h, w, c = tiles.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=tiles.dtype)
    for i, tile in enumerate(tiles):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = tile
    return grid
