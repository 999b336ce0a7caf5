"""The "does this look like glandular tissue?" check (:func:`..core.eval.glandular.check_glands`) of a
whole-slide glands prediction: its store's labels and probabilities and the slide's pixels, read at
a coarse level (at most ``max_side`` pixels a side), so it costs little on a slide of any size."""
from __future__ import annotations

import numpy as np

from ..core.eval.glandular import GlandsCheck, check_glands
from .reader import Slide
from .store import PredictionStore

#: The check reads the labels at the finest pyramid level with no side longer than this.
MAX_SIDE = 2048


def check_store_glands(store: PredictionStore, slide: Slide, name: str = "glands",
                       max_side: int = MAX_SIDE) -> GlandsCheck | None:
    """The glands check of the label set ``name`` of ``store`` (predicted from ``slide``); None when
    the store has no such label set."""
    if name not in store.label_names():
        return None
    levels = store.label_levels(name)
    k = next((i for i, lv in enumerate(levels) if max(lv.shape) <= max_side), len(levels) - 1)
    labels = np.asarray(levels[k])
    f = 2 ** k  # label level k spans 2**k stored pixels (PredictionStore.finish_labels)
    # the foreground (1 - background: the gland class, and the contour class of models that have
    # one), as the field-of-view check reads it
    prob = store.foreground()[::f, ::f][:labels.shape[0], :labels.shape[1]]
    want = store.downsample * f  # level-0 slide pixels per label pixel
    lv = max((i for i, d in enumerate(slide.downsamples) if d <= want + 1e-6), default=0)
    step = max(int(round(want / slide.downsamples[lv])), 1)
    image = np.asarray(slide.levels[lv][::step, ::step])
    mpp = store.mpp * f if store.mpp else None
    return check_glands(labels, prob, image, mpp)


def no_glands_line(store_path, slide_path, name: str = "glands") -> str | None:
    """The one warning line for a glands prediction that does not look like glandular tissue (the
    result is kept: a user who asked for glands gets them, and this line); None when it does, or
    when the store holds no finished ``name`` labels."""
    from .reader import open_slide

    store = PredictionStore.open(store_path)
    if not store.labels_complete(name):
        return None
    with open_slide(slide_path) as slide:
        check = check_store_glands(store, slide, name)
    if check is None or not check.no_glands:
        return None
    return f"warning: {slide_path}: no glands here? {check.reason}; the result is kept in {store_path}"
