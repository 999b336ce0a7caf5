"""The refine widget's suggestion state (``_widgets/refine/suggest.Suggestions``): which ranked
region is on screen and whether it was reviewed. Plain Python: no viewer."""
from __future__ import annotations

import pytest

import napari  # noqa: E402,F401  (declared: missing or broken is a failure, never a skip)

from napari_genselfdiff._widgets.refine.suggest import Suggestions  # noqa: E402


def test_suggestions_step_through_the_ranking():
    s = Suggestions()
    assert s.current is None and s.open_for("H&E") is None
    s.image = "H&E"
    s.show([{"bounds": [0, 0, 8, 8]}, {"bounds": [8, 8, 8, 8]}])
    assert s.index == 0 and s.current["bounds"] == [0, 0, 8, 8]
    assert s.open_for("H&E") is s.current and s.open_for("other image") is None
    s.reviewed = True  # accepted: still on screen, but no longer open for editing
    assert s.current is not None and s.open_for("H&E") is None
    s.next()
    assert not s.reviewed and s.current["bounds"] == [8, 8, 8, 8]
    s.next()
    assert s.current is None and s.index == 2  # all shown
    s.show([])  # a run that found none: nothing left (the box says so), unlike before any run
    assert s.index == 0 and s.current is None
    s.show([{"bounds": [1, 1, 1, 1]}])
    s.clear()
    assert s.regions == [] and s.index is None
