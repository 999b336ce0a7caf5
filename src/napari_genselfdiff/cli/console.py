"""The one terminal progress display: a tqdm bar driven by a generator of
:class:`~..core.progress.Progress` events (training, refining, suggesting, slide prediction).
The CLI commands and the benchmarks use it; the widgets have their own panel."""
from __future__ import annotations

import math
import sys
from typing import Iterable, Mapping

from ..core.progress import Progress


def progress_bar(events: Iterable[Progress], desc: str, *,
                 units: Mapping[str, str] | None = None) -> Progress | None:
    """Drive ``events`` to the end with a tqdm bar (silent when stderr is not a terminal);
    returns the last event (None when there was none).

    Without ``units`` one bar counts ``step`` of ``total`` in steps for the whole run. With
    ``units`` (stage -> unit, e.g. ``{"predict": "tile", "postprocess": "block"}``) each stage
    gets its own bar, named ``"<desc> <stage>"``. Event messages are printed above the bar. The
    bar shows the loss, learning rate, images/s and float metrics of training events, what a long
    step is doing (``activity``: "validating 3/8"), and the megapixels/s and skipped tiles of
    slide prediction. The run ends at the event with ``done``.
    The generator is always closed, so on Ctrl-C a training loop's ``finally`` saves its
    checkpoint and a slide prediction stops between tiles.
    """
    from tqdm import tqdm

    bar, last, stage = None, None, None
    try:
        for ev in events:
            last = ev
            if ev.message:
                (bar.write if bar is not None else print)(ev.message, file=sys.stderr)
            if bar is not None and ev.done:
                if units is None or ev.stage == stage:  # a slide prediction's final 'done' event counts nothing new
                    bar.update(ev.step - bar.n)
                break
            if bar is None or (units is not None and ev.stage != stage):
                if bar is not None:
                    bar.close()
                stage = ev.stage
                name = f"{desc} {ev.stage}" if units is not None else desc
                unit = units.get(ev.stage, "step") if units is not None else "step"
                bar = tqdm(total=ev.total, initial=ev.step, desc=name, unit=unit, dynamic_ncols=True, disable=None)
            bar.update(ev.step - bar.n)
            post = _postfix(ev)
            if post:
                bar.set_postfix(post, refresh=bool(ev.activity))  # a passing status shows at once
            if ev.done:
                break
    finally:
        if bar is not None:
            bar.close()
        close = getattr(events, "close", None)
        if close:
            close()  # on Ctrl-C this runs the loop's finally: the checkpoint is saved
    return last


def _postfix(ev: Progress) -> dict[str, str]:
    post = {"now": ev.activity} if ev.activity else {}
    if not math.isnan(ev.loss):
        post["loss"] = f"{ev.loss:.4f}"
    if ev.lr:
        post["lr"] = f"{ev.lr:.1e}"
    if ev.images_per_s:
        post["img/s"] = f"{ev.images_per_s:.1f}"
    if ev.metrics:
        post.update({k: f"{v:.3f}" for k, v in ev.metrics.items() if isinstance(v, float)})
    if ev.megapixels_per_s or ev.tiles_computed or ev.tiles_skipped:
        post["MP/s"] = f"{ev.megapixels_per_s:.2f}"
        post["skipped"] = str(ev.tiles_skipped)
    return post
