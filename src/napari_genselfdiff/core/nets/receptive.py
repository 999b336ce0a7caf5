"""How far a trained segmentation network looks: its effective receptive field, and the halo a
tiler needs so that tiling cannot change the answer.

For a tile-invariant network (``UNetConfig.tile_invariant``: frozen BatchNorm, no attention) the
output at a pixel depends only on a bounded square of input around it. Its *theoretical* radius is
large (every 3x3 convolution at 1/8 resolution adds 8 pixels), but the weights that matter sit near
the centre: the gradient of the output at a pixel with respect to the input (Luo et al. 2016,
"effective receptive field") falls off fast. :func:`effective_receptive_field` measures that
gradient on real tiles and reports the Chebyshev radius that holds all but ``1 - mass`` of it;
:func:`halo_for` turns the radius into the overlap a tiler should use.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data import to_model_input


@dataclass(frozen=True)
class ReceptiveField:
    theoretical: int  # Chebyshev radius beyond which the gradient is exactly 0
    radius: dict  # mass fraction (str) -> Chebyshev radius holding that fraction of |gradient|
    size: int  # side of the square input measured on

    def to_dict(self) -> dict:
        return asdict(self)


MASSES = (0.99, 0.999, 0.9999)


def _radius_holding(grad: np.ndarray, cy: int, cx: int, fraction: float) -> int:
    h, w = grad.shape
    yy, xx = np.mgrid[:h, :w]
    cheb = np.maximum(np.abs(yy - cy), np.abs(xx - cx)).ravel()
    order = np.argsort(cheb, kind="stable")
    mass = np.cumsum(grad.ravel()[order])
    total = mass[-1]
    if total <= 0:
        return 0
    idx = int(np.searchsorted(mass, fraction * total))
    return int(cheb[order][min(idx, len(order) - 1)])


def effective_receptive_field(model: torch.nn.Module, tiles: np.ndarray, *, points: int = 4,
                              seed: int = 0) -> ReceptiveField:
    """Gradient of the foreground probability at ``points`` random pixels near the centre of each
    (N, S, S, 3) uint8 tile (S a multiple of the model's), with respect to the input, in eval mode.
    """
    model = model.eval()
    dev = next(model.parameters()).device
    tiles = np.asarray(tiles)
    s = tiles.shape[1]
    rng = np.random.default_rng(seed)
    acc = np.zeros((s, s), np.float64)
    centre = s // 2
    for tile in tiles:
        x = torch.from_numpy(to_model_input(tile[None])).to(dev).requires_grad_(True)
        probs = model(x).float().softmax(dim=1)
        for _ in range(points):
            dy, dx = rng.integers(-8, 9, size=2)
            cy, cx = centre + int(dy), centre + int(dx)
            (g,) = torch.autograd.grad(probs[0, 1:, cy, cx].sum(), x, retain_graph=True)
            # shift so that every measured pixel lands on the centre before accumulating
            acc += np.roll(g.abs().sum(1)[0].cpu().numpy(), (centre - cy, centre - cx), axis=(0, 1))
    nz = np.argwhere(acc > 0)
    theoretical = int(np.max(np.abs(nz - centre))) if len(nz) else 0
    radius = {str(m): _radius_holding(acc, centre, centre, m) for m in MASSES}
    return ReceptiveField(theoretical=theoretical, radius=radius, size=s)


def halo_for(rf: ReceptiveField, multiple: int, mass: float = 0.999) -> int:
    """Overlap (in pixels, between neighbouring tiles) that keeps every pixel the tiler uses at
    least the ``mass`` radius away from its tile's edge: twice the radius, to the model's multiple."""
    r = rf.radius[str(mass)]
    return int(math.ceil(2 * r / multiple) * multiple)


def square_tiles(images, size: int) -> np.ndarray:
    """Centre crops of ``size`` x ``size`` from (H, W, 3) uint8 images, reflect-padded where an
    image is smaller (GlaS tiles at the gland model's resolution are ~390 x 260)."""
    out = []
    for img in images:
        img = np.asarray(img)
        ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
        if ph or pw:
            img = np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="symmetric")
        y0, x0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        out.append(img[y0:y0 + size, x0:x0 + size])
    return np.stack(out)


def measure(model: torch.nn.Module, images, *, size: int = 384, mass: float = 0.999) -> dict:
    """The effective receptive field of ``model`` on real ``images`` and the halo derived from it,
    as recorded in a checkpoint's ``config.json`` (``receptive_field``, ``halo``)."""
    mult = int(getattr(getattr(model, "config", None), "multiple", 1))
    size = int(math.ceil(size / mult) * mult)
    rf = effective_receptive_field(model, square_tiles(images, size))
    return {"receptive_field": rf.to_dict(), "halo": halo_for(rf, mult, mass), "halo_mass": mass}
