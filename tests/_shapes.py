"""Synthetic shapes the tests share (imported by name: pytest puts this folder on the path)."""
import numpy as np


def discs(shape, centres, r) -> np.ndarray:
    """Instance labels 1..N of discs of radius ``r`` at ``centres``; a later disc overwrites an
    earlier one where they overlap."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return lab


def he_blobs(seed, h=64, w=64, n_blobs=3):
    """A synthetic H&E-ish region whose labels are dark blobs with instance ids 1..n."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.int32)
    for i in range(1, n_blobs + 1):
        cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
        yy, xx = np.ogrid[:h, :w]
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = i
    image = np.stack([np.full((h, w), 230), np.full((h, w), 170), np.full((h, w), 210)], -1).astype(np.int32)
    image[labels > 0] = (120, 50, 150)
    image += rng.integers(-15, 15, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels
