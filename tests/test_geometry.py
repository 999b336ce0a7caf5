"""Pure geometry of the widgets (``_widgets/geometry.py``): which pixels the camera shows, where
a result computed on a pyramid level goes, reading labels under an image. Plain values only: no
viewer, no Qt."""
from __future__ import annotations

import numpy as np
import pytest

from napari_genselfdiff._widgets.geometry import (Grid, View, at_model_level, bounds_centre_world, box_overlap,
                                                  label_grid_over, layer_downsamples, placement, sample_labels,
                                                  view_bounds, visible_region, world_in_bounds, zoom_to_fit)
from napari_genselfdiff.core.errors import DataError

PLAIN = Grid()
SCALED = Grid(scale=(0.5, 0.5), translate=(10, 20))


def look_at(centre: tuple[float, float], zoom: float, canvas: tuple[int, int] = (400, 800)) -> View:
    """A known view: ``canvas`` (h, w) screen pixels, so the visible world extent is
    centre +- canvas / (2 * zoom)."""
    return View(centre, zoom, canvas)


# ---------------------------------------------------------------------------------------------
# what is on screen

def test_view_bounds_are_the_pixels_on_screen():
    """Canvas 400 x 800 at zoom 4 shows world y 50..150, x 100..300 around centre (100, 200).
    With scale 1, pixel j spans [j - 0.5, j + 0.5]: rows 50..150 (101), columns 100..300 (201).
    With scale 0.5 and translate (10, 20), world y 50..150 is data (80..280) -> rows 80..280."""
    view = look_at((100, 200), 4)
    assert view_bounds(view, PLAIN, (1000, 1000), cap=2048) == (50, 100, 101, 201)
    assert view_bounds(view, SCALED, (1000, 1000), cap=2048) == (80, 160, 201, 401)


def test_view_bounds_are_clamped_to_the_image_and_capped():
    shape = (3000, 2500)
    # world y -30..70, x -70..130: clamped at 0
    assert view_bounds(look_at((20, 30), 4), PLAIN, shape, cap=2048) == (0, 0, 71, 131)
    everything = look_at((1500, 1250), 0.1)  # everything in view: 2048-pixel sides centred on the camera
    assert view_bounds(everything, PLAIN, shape, cap=2048) == (476, 226, 2048, 2048)
    assert view_bounds(everything, PLAIN, shape, cap=100) == (1450, 1200, 100, 100)
    with pytest.raises(DataError, match="not in view"):
        view_bounds(look_at((5000, 5000), 4), PLAIN, shape, cap=2048)


def test_visible_region_is_in_pixels_of_the_level_shown():
    """The same view on level 1 (downsample 2) of a 1000 x 1000 image: data 50..150 x 100..300
    is level-1 rows 25..75(+1), columns 50..150(+1)."""
    view = look_at((100, 200), 4)
    assert visible_region(view, PLAIN, 0, 1.0, (1000, 1000)) == (0, 50, 100, 101, 201)
    assert visible_region(view, PLAIN, 1, 2.0, (500, 500)) == (1, 25, 50, 51, 101)
    with pytest.raises(DataError, match="not in view"):
        visible_region(look_at((5000, 5000), 4), PLAIN, 0, 1.0, (1000, 1000))
    with pytest.raises(DataError, match="zoom in"):
        visible_region(look_at((500, 500), 0.5), PLAIN, 0, 1.0, (1000, 1000), max_pixels=100)


def test_layer_downsamples_average_the_last_two_axes():
    assert layer_downsamples(None) == [1.0]
    assert layer_downsamples([[1, 1], [2, 2], [4, 4]]) == [1.0, 2.0, 4.0]
    assert layer_downsamples([[1, 1, 1], [1, 2, 2]]) == [1.0, 2.0]  # a stack: the last two axes


# ---------------------------------------------------------------------------------------------
# levels and placement

def test_placement_puts_level_pixels_over_their_full_resolution_pixels():
    """Level pixel (0, 0) of a crop at (3, 5) on a level of downsample 4 covers level-0 pixels
    12..15 x 20..23, centred at (13.5, 21.5); with the image's scale 0.5 and translate (10, 20)
    that is world (16.75, 30.75), and one level pixel spans 2 world units."""
    place = placement(SCALED, 4.0, 3, 5)
    assert place["scale"] == pytest.approx((2.0, 2.0))
    assert place["translate"] == pytest.approx((16.75, 30.75))


def test_field_of_view_runs_at_the_models_resolution():
    """A 1.0 um/px model on a 0.5 um/px two-level image predicts the same view on level 1."""
    downsamples, shapes = [1.0, 2.0], [(400, 600, 3), (200, 300, 3)]
    assert at_model_level((0, 100, 50, 201, 99), downsamples, shapes, 0.5, 1.0) == (1, 50, 25, 101, 50)
    assert at_model_level((0, 100, 50, 201, 99), downsamples, shapes, 0.5, 0.5) == (0, 100, 50, 201, 99)
    assert at_model_level((0, 100, 50, 201, 99), downsamples, shapes, 0.5, None) == (0, 100, 50, 201, 99)
    assert at_model_level((0, 390, 590, 10, 10), downsamples, shapes, 0.5, 1.0) == (1, 195, 295, 5, 5)
    assert at_model_level((0, 100, 50, 201, 99), downsamples, shapes, None, 1.0) == (0, 100, 50, 201, 99)


def test_region_centre_and_membership_in_world_coordinates():
    bounds = (10, 20, 4, 6)  # rows 10..13, columns 20..25: centre (11.5, 22.5)
    assert bounds_centre_world(PLAIN, bounds) == (11.5, 22.5)
    assert bounds_centre_world(SCALED, bounds) == (10 + 0.5 * 11.5, 20 + 0.5 * 22.5)
    assert world_in_bounds(PLAIN, (9.5, 19.5), bounds) and not world_in_bounds(PLAIN, (13.5, 22), bounds)
    assert world_in_bounds(SCALED, SCALED.to_world((13.4, 25.4)), bounds)
    assert zoom_to_fit(SCALED, bounds, (400, 800)) == pytest.approx(0.9 * min(400 / 2, 800 / 3))
    assert box_overlap((0, 0, 10, 10), (5, 5, 10, 10)) == 25 and box_overlap((0, 0, 1, 1), (1, 1, 1, 1)) == 0


# ---------------------------------------------------------------------------------------------
# labels over an image

def test_sample_labels_reads_a_coarser_prediction_under_each_pixel():
    """A level-1 result (scale 2, translate 0.5, as the Predict widget places it): level-0 pixel
    (r, c) lies under label pixel (r // 2, c // 2)."""
    coarse = np.arange(400, dtype=np.int32).reshape(20, 20)
    labels_grid = Grid(scale=(2, 2), translate=(0.5, 0.5))
    got = sample_labels(coarse, labels_grid, PLAIN, (5, 7, 10, 12))
    rows, cols = np.arange(5, 15) // 2, np.arange(7, 19) // 2
    np.testing.assert_array_equal(got, coarse[np.ix_(rows, cols)])
    part = sample_labels(coarse, labels_grid, PLAIN, (30, 30, 20, 20))  # half outside the labels: 0 there
    assert part.shape == (20, 20) and (part[10:] == 0).all() and (part[:10, :10] > 0).all()
    assert sample_labels(coarse, labels_grid, PLAIN, (100, 100, 5, 5)) is None
    assert sample_labels(np.zeros((2, 3, 4)), labels_grid, PLAIN, (0, 0, 5, 5)) is None


def test_label_grid_over_an_image_is_in_its_level0_pixels():
    """Labels placed like a level-1 result over a scaled image: downsample 2, and label pixel
    (0, 0) starts at the image's pixel edge (0, 0)."""
    labels_grid = Grid(scale=(1.0, 1.0), translate=(10.25, 20.25))  # SCALED image, level 1 (d = 2)
    offset, d = label_grid_over(labels_grid, SCALED)
    assert d == 2.0 and offset == pytest.approx((0.0, 0.0))
    # without an image, world units are pixels (what the napari writer does)
    assert label_grid_over(Grid((2.0, 2.0), (6.5, 10.5))) == (pytest.approx((3.0, 5.0)), 2.0)
