"""Per-object measurements in microns (formats/measurements.py): shapes a pathologist can check by
hand, stain densities, region counts, the CSV and the GeoJSON export's unit-named measurements."""
import csv
import json

import numpy as np
import pytest

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.formats.measurements import measure_objects, region_summary, shape_row, shape_table, write_csv


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _scene():
    labels = np.zeros((120, 160), np.int32)
    labels[_disc(labels.shape, 40, 40, 20)] = 1           # a disc, radius 20 px
    labels[80:100, 90:150] = 2                            # a 20 x 60 px rectangle
    return labels


def test_shapes_in_microns_match_geometry():
    t = measure_objects(_scene(), mpp=0.5)
    assert list(t["Object ID"]) == [1, 2]
    disc_area = np.pi * 20 ** 2 * 0.25  # µm^2
    assert t["Area µm^2"][0] == pytest.approx(disc_area, rel=0.02)
    assert t["Area µm^2"][1] == pytest.approx(20 * 60 * 0.25)
    assert t["Perimeter µm"][0] == pytest.approx(2 * np.pi * 20 * 0.5, rel=0.06)
    assert t["Circularity"][0] > 0.9 > t["Circularity"][1]
    assert t["Eccentricity"][0] < 0.2 < t["Eccentricity"][1]
    assert t["Solidity"][1] == pytest.approx(1.0)
    assert t["Centroid X µm"][1] == pytest.approx(119.5 * 0.5) and t["Centroid Y µm"][1] == pytest.approx(89.5 * 0.5)
    px = measure_objects(_scene())
    assert "Area px^2" in px and "Area µm^2" not in px  # no pixel size: pixels, said in the name
    assert px["Area px^2"][1] == 1200


def test_stain_densities_and_probability():
    labels = _scene()
    image = np.full(labels.shape + (3,), 235, np.uint8)
    image[labels == 1] = (60, 40, 140)    # haematoxylin-blue nucleus
    image[labels == 2] = (230, 120, 190)  # eosin-pink cytoplasm
    prob = np.where(labels > 0, 0.8, 0.1).astype(np.float32)
    t = measure_objects(labels, image=image, probability=prob, mpp=0.5)
    assert t["Hematoxylin OD mean"][0] > t["Hematoxylin OD mean"][1]
    assert t["Eosin OD mean"][1] > t["Eosin OD mean"][0]
    assert t["Probability mean"] == pytest.approx([0.8, 0.8])
    t8 = measure_objects(labels, probability=(prob * 255).astype(np.uint8))
    assert t8["Probability mean"] == pytest.approx([0.8, 0.8], abs=0.01)


def test_region_summary_counts_density_and_fraction():
    labels = _scene()
    left = np.zeros(labels.shape, bool)
    left[:, :80] = True
    s = region_summary(labels, left, mpp=0.5)
    assert s["objects"] == 1  # the disc's centre is inside, the rectangle's is not
    assert s["area mm^2"] == pytest.approx(120 * 80 * 0.25e-6)
    assert s["objects per mm^2"] == pytest.approx(1 / (120 * 80 * 0.25e-6))
    assert s["area fraction"] == pytest.approx((labels[:, :80] > 0).mean())
    with pytest.raises(DataError, match="region is empty"):
        region_summary(labels, np.zeros(labels.shape, bool))


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(DataError, match="2-D integer"):
        measure_objects(np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match="not the same pixels"):
        measure_objects(_scene(), image=np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DataError, match="pixel size"):
        measure_objects(_scene(), mpp=-1)


def test_csv_round_trip_and_never_over_a_users_file(tmp_path):
    t = measure_objects(_scene(), mpp=0.5)
    path = tmp_path / "m.csv"
    assert write_csv(path, t) == 2
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert rows[1]["Object ID"] == "2" and float(rows[1]["Area µm^2"]) == pytest.approx(300)
    with pytest.raises(DataError):
        write_csv(path, t)  # exists: --force needed
    assert write_csv(path, t, force=True) == 2
    mine = tmp_path / "mine.csv"
    mine.write_text("patient,grade\n1,2\n")
    with pytest.raises(DataError):
        write_csv(mine, t, force=True)  # not ours: never replaced
    assert mine.read_text() == "patient,grade\n1,2\n"


def test_one_objects_row_is_the_table_row():
    labels = _scene()
    row = shape_row(shape_table((labels == 2).astype(np.uint8)), 0, mpp=0.25, downsample=2.0)
    t = measure_objects(labels, mpp=0.5)
    for k in ("Area µm^2", "Perimeter µm", "Circularity", "Solidity"):
        assert row[k] == pytest.approx(t[k][1])


def test_geojson_carries_measurements_with_units(tmp_path):
    from napari_genselfdiff.formats.geojson import labels_to_features

    feats = list(labels_to_features(_scene(), mpp=0.5))
    m = feats[1]["properties"]["measurements"]
    assert m["Area µm^2"] == pytest.approx(300) and m["area"] == 1200  # pixels kept for the round trip
    assert m["Circularity"] < 0.9
    json.dumps(feats)  # serialisable
    plain = list(labels_to_features(_scene()))[0]["properties"]["measurements"]
    assert "Area µm^2" not in plain and "Circularity" in plain


def test_napari_writer_puts_microns_in_the_geojson_of_a_predict_layer(tmp_path):
    from napari_genselfdiff._writer import write_geojson

    meta = {"name": "glands", "metadata": {"genselfdiff": {"downsample": 2.0, "offset": [0, 0], "mpp": 0.25}}}
    path = tmp_path / "g.geojson"
    write_geojson(str(path), _scene(), meta)
    feats = json.loads(path.read_text())["features"]
    m = feats[1]["properties"]["measurements"]
    assert m["Area µm^2"] == pytest.approx(1200 * (2 * 0.25) ** 2)  # label px -> full-res px -> µm


def _touching_objects(seed=0, size=200):
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random((size, size)), 3) > 0.5
    dist = ndi.distance_transform_edt(mask)
    markers = ndi.label((ndi.maximum_filter(dist, 5) == dist) & mask)[0]
    labels = watershed(-dist, markers, mask=mask)
    labels[labels > 0] += 7  # ids with gaps
    return labels


def test_the_one_pass_table_is_regionprops_for_every_touching_object():
    """shape_table measures all objects at once (regionprops per object made a whole slide's GeoJSON
    export take 10 minutes): area, centroid, perimeter and eccentricity are scikit-image's, object by
    object, also where objects touch."""
    from skimage.measure import regionprops_table

    from napari_genselfdiff.formats.measurements import shape_table

    labels = _touching_objects()
    ours = shape_table(labels)
    ref = regionprops_table(labels, properties=["label", "area", "perimeter", "eccentricity", "centroid"])
    assert len(ours["label"]) > 30
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], rtol=0, atol=1e-9, err_msg=key)


def test_solidity_is_area_over_the_convex_hull_of_the_outline():
    from scipy.spatial import ConvexHull
    from skimage.measure import regionprops

    from napari_genselfdiff.formats.measurements import shape_table

    labels = _touching_objects(1)
    ours = shape_table(labels)
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    for k, r in enumerate(regionprops(labels)):
        if r.area > 2:
            hull = ConvexHull((r.coords[:, None, :] + corners[None]).reshape(-1, 2)).volume
            assert ours["solidity"][k] == pytest.approx(min(1.0, r.area / hull), abs=1e-12)
    ell = np.zeros((6, 6), np.uint8)
    ell[1:4, 1] = ell[3, 1:4] = 1  # an L of 5 pixels; its outline's hull (1,1) (1,2) (3,4) (4,4) (4,1): area 7
    assert shape_table(ell)["solidity"][0] == pytest.approx(5 / 7)  # QuPath's ROI solidity
    assert shape_table(np.zeros((4, 4), np.int32))["label"].size == 0


def test_a_label_array_larger_than_memory_is_measured_as_in_one_piece():
    """A whole slide's labels are measured group by group (chunks far smaller than the objects that
    cross them): the same table as measuring the array in one piece, each object once."""
    from skimage.segmentation import expand_labels

    from napari_genselfdiff.core.progress import run_to_end
    from napari_genselfdiff.formats.measurements import iter_measure_label_array

    rng = np.random.default_rng(0)
    seeds = np.zeros((300, 260), np.int32)
    seeds[rng.integers(0, 300, 90), rng.integers(0, 260, 90)] = np.arange(1, 91)
    labels = expand_labels(seeds, 9)  # touching objects, many across the 64-px chunk borders
    labels[labels == 7] = 0  # an id missing from the sequence
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    prob = rng.random((300, 260)).astype(np.float32)
    whole = measure_objects(labels, image=image, probability=prob, mpp=0.5)
    steps = []
    gen = iter_measure_label_array(labels, chunk=64, image=image, probability=prob, mpp=0.5)
    table = run_to_end(_recording(gen, steps))
    assert list(table) == list(whole)
    assert np.array_equal(table["Object ID"], whole["Object ID"]) and len(table["Object ID"]) == 89
    for column in whole:
        np.testing.assert_allclose(table[column], whole[column], rtol=1e-9, atol=1e-9, err_msg=column)
    assert steps[-1][0] == steps[-1][1] > 1  # measured in several groups
    empty = run_to_end(iter_measure_label_array(np.zeros((50, 50), np.int32), chunk=16, image=image[:50, :50]))
    assert "Hematoxylin OD mean" in empty and len(empty["Object ID"]) == 0
    with pytest.raises(DataError, match="not the same pixels"):
        run_to_end(iter_measure_label_array(labels, image=image[:10]))


def _recording(gen, steps):
    """``gen``'s steps, each also appended to ``steps``; its return value."""
    from napari_genselfdiff.core.progress import relay

    return (yield from relay(gen, lambda step: steps.append(step) or step))
