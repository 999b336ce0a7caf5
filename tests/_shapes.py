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
