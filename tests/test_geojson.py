"""GeoJSON export/import: exact pixel-edge polygons, QuPath layout, streaming, chunked export of
lazy label arrays, tolerant import and rasterisation back to labels."""
from __future__ import annotations

import json
import uuid
import weakref
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from shapely.geometry import MultiPolygon, Polygon, shape
from skimage import draw

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.formats import geojson as gj
from napari_genselfdiff.formats import label_blocks

CANVAS = 2000
CELL = 36
BIG_BLOCKS = [(10, 10), (30, 40), (45, 5), (54, 54)]   # top-left cells of 4x4-cell objects
KINDS = ["disc", "ellipse", "rect", "full", "ring", "holes2", "two", "checker", "pocket",
         "line", "single"]


def _cell_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One object of ``kind`` drawn on a CELL x CELL patch."""
    m = np.zeros((CELL, CELL), bool)
    c = CELL // 2
    if kind == "disc":
        r = rng.integers(2, 17)
        m[draw.disk((c + rng.integers(-1, 2), c + rng.integers(-1, 2)), r, shape=m.shape)] = True
    elif kind == "ellipse":
        m[draw.ellipse(c, c, rng.integers(3, 16), rng.integers(3, 16), shape=m.shape,
                       rotation=rng.uniform(0, np.pi))] = True
    elif kind == "rect":
        y0, x0 = rng.integers(1, 12, 2)
        y1, x1 = rng.integers(14, 35, 2)
        m[y0:y1, x0:x1] = True
    elif kind == "full":                      # touches its neighbours and, at the edge, the border
        m[:] = True
    elif kind == "ring":
        outer = rng.integers(8, 17)
        m[draw.disk((c, c), outer, shape=m.shape)] = True
        m[draw.disk((c, c), rng.integers(2, outer - 3))] = False
    elif kind == "holes2":
        m[2:34, 2:34] = True
        m[6:14, 6:30] = False
        m[20:30, 10:20] = False
    elif kind == "two":                       # one id, two disconnected parts
        m[draw.disk((7, 7), rng.integers(2, 6))] = True
        m[draw.disk((27, 27), rng.integers(2, 6))] = True
    elif kind == "checker":                   # 11 pixels touching only at corners
        m[10:15:2, 10:15:2] = True
        m[11, 11] = m[13, 13] = True
    elif kind == "pocket":                    # enclosed pocket open only through one corner
        m[5:15, 5:15] = True
        m[6:14, 6:14] = False
        m[5, 5] = False
    elif kind == "line":
        rr, cc = draw.line(2, rng.integers(2, 34), 33, rng.integers(2, 34))
        m[rr, cc] = True
    else:                                     # single pixel
        m[rng.integers(0, CELL), rng.integers(0, CELL)] = True
    return m


def make_synthetic(seed: int = 0) -> tuple[np.ndarray, dict[int, str], set[int]]:
    """~3000 non-overlapping objects on a 2000 x 2000 canvas with large, sparse ids.

    Returns labels, id -> kind, and the ids whose cell lies wholly inside the canvas."""
    rng = np.random.default_rng(seed)
    n_cells = -(-CANVAS // CELL)
    pad = CELL * 4
    canvas = np.zeros((n_cells * CELL + pad, n_cells * CELL + pad), np.int32)
    reserved = {(by + i, bx + j) for by, bx in BIG_BLOCKS for i in range(4) for j in range(4)}
    cells = [(i, j) for i in range(n_cells) for j in range(n_cells) if (i, j) not in reserved]
    ids = rng.choice(np.arange(1, 5_000_000), size=len(cells) + len(BIG_BLOCKS), replace=False)
    kinds: dict[int, str] = {}
    inside: set[int] = set()
    for (i, j), label in zip(cells, ids):
        kind = KINDS[rng.integers(len(KINDS))]
        y0, x0 = i * CELL, j * CELL
        canvas[y0:y0 + CELL, x0:x0 + CELL][_cell_mask(kind, rng)] = label
        kinds[int(label)] = kind
        if y0 + CELL <= CANVAS and x0 + CELL <= CANVAS:
            inside.add(int(label))
    for (by, bx), label in zip(BIG_BLOCKS, ids[len(cells):]):   # large ellipses with a hole
        y0, x0 = by * CELL, bx * CELL
        patch = np.zeros((pad, pad), bool)
        patch[draw.ellipse(pad // 2, pad // 2, 70, 60, rotation=0.4)] = True
        patch[draw.disk((pad // 2, pad // 2), 30)] = False
        canvas[y0:y0 + pad, x0:x0 + pad][patch] = label
        kinds[int(label)] = "big"
        if y0 + pad <= CANVAS and x0 + pad <= CANVAS:
            inside.add(int(label))
    return canvas[:CANVAS, :CANVAS].copy(), kinds, inside


@pytest.fixture(scope="module")
def synthetic():
    labels, kinds, inside = make_synthetic()
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return labels, kinds, inside, dict(zip(ids.tolist(), counts.tolist()))


@pytest.fixture(scope="module")
def exported(synthetic, tmp_path_factory):
    labels = synthetic[0]
    path = tmp_path_factory.mktemp("geojson") / "glands.geojson"
    count = gj.export_labels_geojson(labels, path)
    with open(path) as fh:
        return path, count, json.load(fh)


def _partition_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same background and the same pixel sets per object, up to a renumbering of the ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return (np.unique(pairs[0]).size == pairs.shape[1]
            and np.unique(pairs[1]).size == pairs.shape[1])


def _rings(geometry: dict) -> list[list]:
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [ring for poly in polys for ring in poly]


# --------------------------------------------------------------------------- the fixture is honest

def test_synthetic_fixture_has_the_hard_cases(synthetic):
    labels, kinds, inside, counts = synthetic
    assert len(counts) > 3000
    assert labels[0].any() and labels[-1].any() and labels[:, 0].any() and labels[:, -1].any()
    present = {kinds[i] for i in counts}
    assert set(KINDS) | {"big"} <= present
    assert max(counts) > label_blocks._DIRECT_MAX_LABEL       # the np.unique path is exercised
    # objects touching each other (different ids on 4-adjacent pixels)
    h = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert h.any()


# --------------------------------------------------------------------------- export layout

def test_one_feature_per_id_with_unique_uuid4(exported, synthetic):
    path, count, data = exported
    counts = synthetic[3]
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert count == len(features) == len(counts)
    assert sorted(f["properties"]["label_id"] for f in features) == sorted(counts)
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_object_type_inside_properties_qupath_layout(exported, synthetic):
    features = exported[2]["features"]
    counts = synthetic[3]
    for f in features:
        assert f["type"] == "Feature"
        assert "objectType" not in f
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "Gland", "color": list(gj.DEFAULT_COLOR)}
        assert props["measurements"]["area"] == counts[props["label_id"]]
        assert "mean_probability" not in props["measurements"]


def test_geometry_exact_valid_closed_and_oriented(exported, synthetic):
    counts = synthetic[3]
    for f in exported[2]["features"]:
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        for ring in _rings(geom):
            assert len(ring) >= 5 and ring[0] == ring[-1]
        g = shape(geom)
        assert g.is_valid, shapely.is_valid_reason(g)
        label = f["properties"]["label_id"]
        assert g.area == counts[label]
        assert f["properties"]["measurements"]["perimeter"] == pytest.approx(g.length)
        for poly in getattr(g, "geoms", [g]):
            assert poly.exterior.is_ccw
            assert not any(r.is_ccw for r in poly.interiors)


def test_holes_and_multiple_parts_kept(exported, synthetic):
    _, kinds, inside, _ = synthetic
    expected_holes = {"ring": 1, "holes2": 2, "pocket": 1, "big": 1}
    seen = set()
    for f in exported[2]["features"]:
        label = f["properties"]["label_id"]
        if label not in inside:
            continue
        kind = kinds[label]
        g = shape(f["geometry"])
        if kind in expected_holes:
            assert isinstance(g, Polygon), kind
            assert len(g.interiors) == expected_holes[kind], kind
            seen.add(kind)
        elif kind == "two":
            assert isinstance(g, MultiPolygon) and len(g.geoms) == 2
            seen.add(kind)
        elif kind == "checker":
            assert isinstance(g, MultiPolygon) and len(g.geoms) == 11
            assert all(p.area == 1 for p in g.geoms)
            seen.add(kind)
        elif kind in ("disc", "rect", "full", "single"):
            assert isinstance(g, Polygon) and not g.interiors
    assert seen == set(expected_holes) | {"two", "checker"}


def test_round_trip_reproduces_labels_exactly(exported, synthetic):
    labels = synthetic[0]
    result = gj.read_geojson(exported[0])
    assert result.warnings == []
    assert len(result.features) == len(synthetic[3])
    back, classes = gj.features_to_labels(result, labels.shape)
    assert back.dtype == np.int32
    assert set(classes.values()) == {"Gland"}
    assert _partition_equal(labels, back)
    # feature order is id order, so the ids map monotonically
    assert [f.properties["label_id"] for f in result.features] == sorted(synthetic[3])


def test_saddle_heavy_noise_is_exact_and_valid():
    rng = np.random.default_rng(7)
    for _ in range(40):
        labels = rng.integers(0, 4, (24, 24)) * (rng.random((24, 24)) < rng.uniform(0.3, 0.9))
        features = list(gj.labels_to_features(labels))
        for f in features:
            g = shape(f["geometry"])
            assert g.is_valid, shapely.is_valid_reason(g)
            assert g.area == np.count_nonzero(labels == f["properties"]["label_id"])
        back, _ = gj.features_to_labels(gj.read_geojson(features), labels.shape)
        assert _partition_equal(labels, back)


def test_pocket_closed_through_a_corner_is_a_hole_touching_the_shell():
    labels = np.zeros((6, 6), int)
    labels[1:5, 1:5] = 3
    labels[2:4, 2:4] = 0
    labels[1, 1] = 0                 # the pocket now reaches outside only through corner (2, 2)
    (f,) = gj.labels_to_features(labels)
    g = shape(f["geometry"])
    assert isinstance(g, Polygon) and g.is_valid
    assert g.area == 11
    assert sorted(map(tuple, g.interiors[0].coords[:-1])) == [(2, 2), (2, 4), (4, 2), (4, 4)]
    assert (2.0, 2.0) in set(g.exterior.coords)


def test_offset_and_downsample_hand_worked():
    labels = np.zeros((20, 20), np.uint16)
    labels[5:8, 10:12] = 9           # 3 rows x 2 cols
    probs = np.zeros((20, 20), np.float32)
    probs[5:8, 10:12] = 0.5
    probs[5, 10] = 1.0
    (f,) = gj.labels_to_features(labels, offset=(100, 200), downsample=4, probabilities=probs,
                                 object_type="detection", class_name="Nucleus",
                                 color=(1, 2, 3))
    ring = f["geometry"]["coordinates"][0]
    assert f["geometry"]["type"] == "Polygon" and len(f["geometry"]["coordinates"]) == 1
    # x = (col + 200) * 4 in [840, 848], y = (row + 100) * 4 in [420, 432]
    assert sorted(map(tuple, ring[:-1])) == [(840, 420), (840, 432), (848, 420), (848, 432)]
    assert ring[0] == ring[-1] and all(isinstance(v, int) for v in ring[0])
    assert Polygon(ring).exterior.is_ccw
    props = f["properties"]
    assert props["objectType"] == "detection" and props["label_id"] == 9
    assert props["classification"] == {"name": "Nucleus", "color": [1, 2, 3]}
    m = props["measurements"]
    assert m["area"] == 6 * 16
    assert m["perimeter"] == 2 * (2 + 3) * 4
    assert m["mean_probability"] == pytest.approx((5 * 0.5 + 1.0) / 6)

    as_bytes = np.zeros((20, 20), np.uint8)
    as_bytes[5:8, 10:12] = 51
    (g,) = gj.labels_to_features(labels, probabilities=as_bytes, downsample=1.5)
    assert g["properties"]["measurements"]["mean_probability"] == pytest.approx(0.2)
    xs = sorted({x for x, _ in g["geometry"]["coordinates"][0]})
    assert xs == [15.0, 18.0]        # cols 10 and 12 times 1.5


def test_simplify_keeps_valid_geometry_and_exact_measurements():
    labels = np.zeros((80, 80), np.int32)
    labels[draw.disk((40, 40), 30)] = 1
    labels[draw.disk((40, 40), 10)] = 0
    exact = next(gj.labels_to_features(labels))
    simple = next(gj.labels_to_features(labels, simplify_tolerance=1.5))
    assert sum(map(len, _rings(simple["geometry"]))) < sum(map(len, _rings(exact["geometry"])))
    g = shape(simple["geometry"])
    assert g.is_valid and len(g.interiors) == 1 and g.exterior.is_ccw
    assert abs(g.area - np.count_nonzero(labels)) < 0.03 * np.count_nonzero(labels)
    assert simple["properties"]["measurements"] == exact["properties"]["measurements"]


def test_bad_export_arguments_rejected():
    labels = np.ones((4, 4), np.int32)
    with pytest.raises(ValueError, match="object_type"):
        next(gj.labels_to_features(labels, object_type="cell"))
    with pytest.raises(ValueError, match="integer"):
        next(gj.labels_to_features(labels.astype(float)))
    with pytest.raises(ValueError, match="shape"):
        next(gj.labels_to_features(labels, probabilities=np.ones((3, 4))))
    assert list(gj.labels_to_features(np.zeros((5, 5), np.int32))) == []


# --------------------------------------------------------------------------- chunked export

def _by_label(features: list[dict]) -> dict[int, dict]:
    out = {}
    for f in features:
        label = f["properties"]["label_id"]
        assert label not in out, f"label {label} emitted twice"
        out[label] = f
    return out


def _same_features(a: list[dict], b: list[dict]) -> None:
    fa, fb = _by_label(a), _by_label(b)
    assert fa.keys() == fb.keys()
    for label in fa:
        ga, gb = shape(fa[label]["geometry"]), shape(fb[label]["geometry"])
        assert shapely.equals_exact(shapely.normalize(ga), shapely.normalize(gb), 0), label
        assert fa[label]["properties"]["measurements"] == fb[label]["properties"]["measurements"]


def test_chunked_zarr_export_matches_in_memory(synthetic, tmp_path):
    labels = synthetic[0][:1100, :1300]
    store = zarr.create_array(tmp_path / "labels.zarr", shape=labels.shape, dtype=labels.dtype,
                              chunks=(256, 256))
    store[:] = labels
    straddling = set()               # objects with pixels on both sides of a block line
    for k in range(256, 1100, 256):
        for a, b in ((labels[k - 1], labels[k]), (labels[:, k - 1], labels[:, k])):
            straddling.update(a[(a == b) & (a > 0)].tolist())
    assert len(straddling) > 50
    out = tmp_path / "chunked.geojson"
    count = gj.export_label_array_chunked(store, out, chunk=256)
    with open(out) as fh:
        chunked = json.load(fh)["features"]
    assert count == len(chunked) == np.unique(labels[labels > 0]).size
    _same_features(chunked, list(gj.labels_to_features(labels)))


def test_chunked_export_whole_objects_across_many_blocks(tmp_path):
    labels = np.zeros((300, 300), np.int64)
    labels[draw.ellipse(150, 150, 120, 100)] = 7                 # spans 5 x 4 blocks of 64
    labels[draw.disk((150, 150), 40)] = 0                        # with a hole
    labels[draw.disk((150, 150), 15)] = 8                        # an island in the hole
    labels[2:10, 2:10] = 5                                       # one id, parts far apart
    labels[290:298, 280:299] = 5
    labels[60:70, 250:260] = 2 ** 40                             # a huge id
    probs = np.linspace(0, 1, labels.size, dtype=np.float32).reshape(labels.shape)
    lazy = zarr.create_array(tmp_path / "l.zarr", shape=labels.shape, dtype=labels.dtype,
                             chunks=(64, 64))
    lazy[:] = labels
    out = tmp_path / "c.geojson"
    assert gj.export_label_array_chunked(lazy, out, chunk=64, probabilities=probs,
                                         offset=(3, 4), downsample=2) == 4
    with open(out) as fh:
        chunked = json.load(fh)["features"]
    in_memory = list(gj.labels_to_features(labels, probabilities=probs, offset=(3, 4),
                                           downsample=2))
    _same_features(chunked, in_memory)
    ring = shape(_by_label(chunked)[7]["geometry"])
    assert len(ring.interiors) == 1 and ring.area == 4 * np.count_nonzero(labels == 7)
    assert len(shape(_by_label(chunked)[5]["geometry"]).geoms) == 2


def test_direct_and_compacted_bounding_boxes_agree(monkeypatch):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, (50, 70)) * (rng.random((50, 70)) < 0.5)
    direct = list(gj.labels_to_features(labels))
    monkeypatch.setattr(label_blocks, "_DIRECT_MAX_LABEL", 0)
    _same_features(list(gj.labels_to_features(labels)), direct)


# --------------------------------------------------------------------------- streaming writer

class _Feature(dict):
    """A dict that can be weakly referenced, to see when the writer lets go of it."""


def test_write_geojson_streams_a_generator(tmp_path):
    refs: list[weakref.ref] = []

    def features():
        for i in range(50):
            if len(refs) >= 2:
                # the one before the previous feature must already be gone
                assert refs[-2]() is None, "writer keeps features in memory"
            f = _Feature(type="Feature", id=str(i), geometry={
                "type": "Polygon", "coordinates": [[[i, 0], [i + 1, 0], [i + 1, 1], [i, 0]]]},
                properties={"objectType": "annotation"})
            refs.append(weakref.ref(f))
            yield f
            del f

    path = tmp_path / "s.geojson"
    assert gj.write_geojson(path, features()) == 50
    with open(path) as fh:
        data = json.load(fh)
    assert [f["id"] for f in data["features"]] == [str(i) for i in range(50)]
    assert gj.write_geojson(tmp_path / "empty.geojson", iter([])) == 0
    assert json.loads((tmp_path / "empty.geojson").read_text()) == {
        "type": "FeatureCollection", "features": [], "genselfdiff": gj.MARKER}


def test_write_geojson_is_atomic(tmp_path):
    path = tmp_path / "a.geojson"
    gj.write_geojson(path, [])  # an export of ours, which force may replace
    old = path.read_bytes()

    def failing():
        yield {"type": "Feature", "geometry": None, "properties": {}}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gj.write_geojson(path, failing(), force=True)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson"]
    with pytest.raises(DataError, match="does not exist"):
        gj.write_geojson(tmp_path / "missing" / "x.geojson", [])


# --------------------------------------------------------------------------- import

def _square(x0, y0, size):
    return [[[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]]


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(DataError, match="broken.geojson.*not valid JSON"):
        gj.read_geojson(bad)
    with pytest.raises(DataError, match="nope.geojson.*not found"):
        gj.read_geojson(tmp_path / "nope.geojson")
    with pytest.raises(DataError, match="not GeoJSON"):
        gj.read_geojson({"type": "Topology"})


def test_mixed_collection_keeps_good_features_and_warns(tmp_path):
    cls = {"classification": {"name": "Gland", "color": [0, 200, 0]}}
    data = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "two-points", "properties": cls,
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5, 5]]]}},
        {"type": "Feature", "id": "pt", "properties": cls,
         "geometry": {"type": "Point", "coordinates": [1, 2]}},
        {"type": "Feature", "id": "oob", "properties": {**cls, "objectType": "annotation"},
         "geometry": {"type": "Polygon", "coordinates": _square(90, 80, 20)}},
        {"type": "Feature", "id": "good1", "properties": {**cls, "objectType": "detection"},
         "geometry": {"type": "Polygon", "coordinates": _square(10, 10, 5)}},
        {"type": "Feature", "id": "good2", "properties": cls,
         "geometry": {"type": "Polygon", "coordinates": _square(30, 30, 4)}},
        {"type": "Feature", "id": "far", "properties": cls,
         "geometry": {"type": "Polygon", "coordinates": _square(500, 500, 4)}},
        "not a feature",
        {"type": "Feature", "id": "weird", "properties": cls,
         "geometry": {"type": "Circle", "coordinates": [1, 2]}},
    ]}
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps(data))
    result = gj.read_geojson(path, image_shape=(100, 100))      # (height, width)
    assert [f.feature_id for f in result.features] == ["oob", "good1", "good2"]
    assert [f.index for f in result.features] == [2, 3, 4]
    clipped = result.features[0].geometry
    assert clipped.bounds == (90.0, 80.0, 100.0, 100.0) and clipped.area == 10 * 20
    assert result.features[1].object_type == "detection"
    assert result.features[1].class_name == "Gland"
    assert result.features[1].geometry.area == 25
    w = result.warnings
    assert len(w) == 6
    assert w[0].startswith("feature 0 (id='two-points')") and "malformed" in w[0]
    assert w[1].startswith("feature 1 (id='pt')") and "Point" in w[1] and "skipped" in w[1]
    assert w[2].startswith("feature 2 (id='oob')") and "clipped" in w[2]
    assert w[3].startswith("feature 5 (id='far')") and "outside" in w[3]
    assert w[4].startswith("feature 6 (no id)") and "malformed" in w[4]
    assert w[5].startswith("feature 7 (id='weird')") and "unknown geometry type" in w[5]


def test_multipolygon_plain_list_bare_feature_and_unclassified():
    multi = {"type": "MultiPolygon", "coordinates": [_square(0, 0, 2), _square(10, 0, 3)]}
    result = gj.read_geojson(multi)
    (f,) = result.features
    assert isinstance(f.geometry, MultiPolygon) and f.geometry.area == 4 + 9
    assert f.class_name is None and f.object_type is None
    assert result.warnings == ["feature 0 (no id): no classification (class name None)"]

    listed = [{"type": "Feature", "id": "a", "objectType": "annotation",     # top-level style
               "geometry": {"type": "Polygon", "coordinates": _square(0, 0, 2)},
               "properties": {"classification": "Tumor"}},
              {"type": "Feature", "geometry": multi, "properties": {"classification": {
                  "name": "Stroma", "colorRGB": -1}}}]
    result = gj.read_geojson(listed)
    assert [(f.class_name, f.object_type) for f in result.features] == [
        ("Tumor", "annotation"), ("Stroma", None)]
    assert result.warnings == []
    bare = gj.read_geojson(listed[1])
    assert len(bare.features) == 1 and bare.features[0].class_name == "Stroma"


def test_self_intersecting_polygon_is_repaired_with_warning():
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]}
    result = gj.read_geojson({"type": "Feature", "id": 12, "geometry": bowtie,
                              "properties": {"classification": {"name": "X"}}})
    (f,) = result.features
    assert f.geometry.is_valid and f.geometry.area == pytest.approx(8)
    assert result.warnings[0].startswith("feature 0 (id='12')") and "repaired" in result.warnings[0]


# --------------------------------------------------------------------------- rasterise / shapes

def test_features_to_labels_holes_downsample_and_class_map():
    donut = Polygon(_square(0, 0, 20)[0], [[[4, 4], [4, 12], [12, 12], [12, 4], [4, 4]]])
    feats = [gj.ImportedFeature(0, "d", donut, "Gland", "annotation", {}),
             gj.ImportedFeature(1, "s", Polygon(_square(30, 0, 8)[0]), "Lumen", None, {}),
             gj.ImportedFeature(2, "t", Polygon(_square(60, 60, 8)[0]), None, None, {})]
    labels, classes = gj.features_to_labels(feats, (40, 40), downsample=2.0)
    assert classes == {1: "Gland", 2: "Lumen", 3: None}
    assert np.count_nonzero(labels == 1) == 10 * 10 - 4 * 4
    assert (labels[2:6, 2:6] == 0).all() and (labels[0:10, 0:2] == 1).all()
    assert np.count_nonzero(labels == 2) == 16 and (labels[0:4, 15:19] == 2).all()
    assert np.count_nonzero(labels == 3) == 16 and (labels[30:34, 30:34] == 3).all()

    semantic, classes = gj.features_to_labels(feats, (20, 40), class_map={"Gland": 5, "Lumen": 2})
    assert classes == {5: "Gland", 2: "Lumen"}
    assert np.count_nonzero(semantic == 5) == 400 - 64
    assert np.count_nonzero(semantic == 2) == 64
    assert set(np.unique(semantic)) == {0, 2, 5}


def test_features_to_labels_clips_to_the_image():
    feats = [gj.ImportedFeature(0, None, Polygon(_square(-5, -5, 10)[0]), "A", None, {})]
    labels, _ = gj.features_to_labels(feats, (8, 8))
    assert np.count_nonzero(labels) == 25 and (labels[:5, :5] == 1).all()


def test_features_to_shapes_row_col_order():
    multi = MultiPolygon([Polygon(_square(0, 0, 2)[0]), Polygon(_square(10, 20, 3)[0])])
    feats = [gj.ImportedFeature(0, "m", multi, "Gland", "annotation", {}),
             gj.ImportedFeature(1, None, Polygon([(5, 1), (9, 1), (9, 4)]), None, None, {})]
    data, props = gj.features_to_shapes(feats)
    assert len(data) == 3
    assert data[1].shape == (4, 2)
    assert sorted(map(tuple, data[1].tolist())) == [(20, 10), (20, 13), (23, 10), (23, 13)]
    np.testing.assert_array_equal(data[2], [[1, 5], [1, 9], [4, 9]])
    assert props == {"class_name": ["Gland", "Gland", ""],
                     "object_type": ["annotation", "annotation", ""],
                     "feature_id": ["m", "m", ""]}


# --------------------------------------------------------------------------- import safety (issue #11)

def _collection(*geometries) -> dict:
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": str(i), "geometry": g, "properties": {"classification": {"name": "Gland"}}}
        for i, g in enumerate(geometries)]}


def _poly(x0, y0, size) -> dict:
    return {"type": "Polygon", "coordinates": _square(x0, y0, size)}


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"type":"Feature","geometry":{"type":"Polygon","coordinates":'
                                  + "[" * 2000 + "]" * 2000 + "}}",
                                  '{"a":"' + "]" * 50 + '\\"' + '",' + '"b":' + "{" * 70 + "}" * 70 + "}"])
def test_deeply_nested_json_is_one_clear_error(tmp_path, text):
    path = tmp_path / "deep.geojson"
    path.write_text(text)
    with pytest.raises(DataError, match=r"deep.geojson: JSON nested \d+ levels deep") as info:
        gj.read_geojson(path)
    assert "\n" not in str(info.value)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    data = _collection(_poly(0, 0, 4))
    data["features"][0]["properties"]["note"] = "[[[[[[" * 50 + '\\" {{{{' * 40
    path = tmp_path / "ok.geojson"
    path.write_text(json.dumps(data))
    assert len(gj.read_geojson(path).features) == 1


def test_deep_nesting_in_memory_skips_the_feature():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    data = _collection(_poly(0, 0, 4), {"type": "Polygon", "coordinates": deep})
    result = gj.read_geojson(data)
    assert len(result.features) == 1 and any("feature 1" in w and "RecursionError" in w for w in result.warnings)


def test_absurd_coordinates_are_skipped_with_a_warning_without_an_image_size():
    result = gj.read_geojson(_collection(_poly(10, 10, 4), _poly(1e12, 5, 10), _poly(-3e9, 0, 1)))
    assert [f.feature_id for f in result.features] == ["0"]
    assert sum("beyond 10,000,000 pixels" in w for w in result.warnings) == 2


def test_raster_window_refuses_what_is_too_large_or_outside():
    far = gj.read_geojson(_collection(_poly(0, 0, 4), _poly(2_000_000, 3_000_000, 4))).features
    with pytest.raises(DataError, match=r"span 2000004x3000004 pixels .* more than the 100 Mpx"):
        gj.raster_window(far)
    assert gj.raster_window(far[:1]) == (0, 0, 4, 4)
    negative = gj.read_geojson(_collection(_poly(-50, -50, 10))).features
    with pytest.raises(DataError, match=r"none of the 1 objects lies inside the image area"):
        gj.raster_window(negative)
    beyond = gj.read_geojson(_collection(_poly(500, 500, 10))).features
    with pytest.raises(DataError, match=r"none of the 1 objects lies inside the 100x80 image"):
        gj.raster_window(beyond, image_shape=(80, 100))


def test_iterating_reads_and_draws_with_progress_and_the_same_result():
    from napari_genselfdiff.core.progress import run_to_end

    data = _collection(*[_poly(3 * i, 2 * i, 2) for i in range(25)])
    events: list = []
    result = run_to_end(gj.iter_read_geojson(data, every=10), events.append)
    assert [(e.stage, e.step) for e in events] == [("read", 0), ("read", 10), ("read", 20), ("read", 25)]
    assert [f.feature_id for f in result.features] == [f.feature_id for f in gj.read_geojson(data).features]
    events.clear()
    labels, _ = run_to_end(gj.iter_features_to_labels(result, (60, 80), every=10), events.append)
    assert [e.step for e in events] == [10, 20, 25] and events[-1].total == 25
    np.testing.assert_array_equal(labels, gj.features_to_labels(result, (60, 80))[0])


def test_feature_raster_windows_and_strides_equal_the_full_raster(synthetic):
    labels = synthetic[0][:300, :400]
    features = gj.read_geojson(json.loads(json.dumps(
        {"type": "FeatureCollection", "features": list(gj.labels_to_features(labels))}))).features
    full, _ = gj.features_to_labels(features, labels.shape)
    raster = gj.FeatureRaster(features, labels.shape)
    assert raster.shape == labels.shape and raster.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(raster), full)
    for key in [(slice(None, None, 2), slice(None, None, 2)), (slice(None, None, 8), slice(None, None, 8)),
                (slice(37, 250, 3), slice(101, 399, 5)), (slice(290, 400), slice(0, 7))]:
        np.testing.assert_array_equal(raster[key], full[key])


# --------------------------------------------------------------------------- genselfdiff import

def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_import_writes_one_id_per_object(tmp_path, capsys):
    from napari_genselfdiff.cli import main
    from napari_genselfdiff.formats.tiff import read_label_tiff

    data = _collection(_poly(10, 5, 20), _poly(60, 40, 8), _poly(90, 70, 30), {"type": "Point", "coordinates": [1, 1]})
    src = _write(tmp_path / "objects.geojson", data)
    out = tmp_path / "labels.tif"
    assert main(["import", "--geojson", src, "--shape", "80", "100", "--out", str(out)]) == 0
    labels = read_label_tiff(out)
    expected, _ = gj.features_to_labels(gj.read_geojson(data, image_shape=(80, 100)), (80, 100))
    np.testing.assert_array_equal(labels, expected)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    captured = capsys.readouterr()
    assert "3 objects -> " in captured.out and "clipped" in captured.err and "Point" in captured.err


def test_cli_import_like_an_image_and_the_overwrite_rule(tmp_path, capsys):
    from napari_genselfdiff.cli import main
    from napari_genselfdiff.formats.tiff import read_label_tiff

    import tifffile

    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((48, 64, 3), np.uint8), photometric="rgb")
    src = _write(tmp_path / "o.geojson", _collection(_poly(4, 4, 8)))
    before_image, before_src = image.read_bytes(), Path(src).read_bytes()
    out = tmp_path / "labels.tif"
    assert main(["import", "--geojson", src, "--like", str(image), "--out", str(out)]) == 0
    assert read_label_tiff(out).shape == (48, 64)
    for target, extra in ((out, []), (image, ["--force"]), (Path(src), ["--force"])):
        assert main(["import", "--geojson", src, "--like", str(image), "--out", str(target), *extra]) == 2
    user = tmp_path / "user.tif"
    tifffile.imwrite(user, np.ones((4, 4), np.uint8))
    user_bytes = user.read_bytes()
    assert main(["import", "--geojson", src, "--shape", "48", "64", "--out", str(user), "--force"]) == 2
    err = capsys.readouterr().err
    assert "never replaced" in err and "input" in err
    assert image.read_bytes() == before_image and Path(src).read_bytes() == before_src and user.read_bytes() == user_bytes
    assert main(["import", "--geojson", src, "--like", str(image), "--out", str(out), "--force"]) == 0  # ours


def test_cli_import_says_so_when_nothing_lies_inside_the_image(tmp_path, capsys):
    from napari_genselfdiff.cli import main

    src = _write(tmp_path / "far.geojson", _collection(_poly(5000, 5000, 10), _poly(-400, 3, 10)))
    out = tmp_path / "labels.tif"
    assert main(["import", "--geojson", src, "--shape", "80", "100", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no polygon object lies inside the 100x80 image" in err and "outside the image" in err
    assert not out.exists()
    deep = tmp_path / "deep.geojson"
    deep.write_text("[" * 10_000 + "]" * 10_000)
    assert main(["import", "--geojson", str(deep), "--shape", "8", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nested" in err


def test_each_class_is_exported_in_its_own_colour_nucleus_is_not_gland_green():
    from napari_genselfdiff.formats import qupath

    labels = np.zeros((20, 20), np.int32)
    labels[2:8, 2:8] = 1
    colours = {name: next(gj.labels_to_features(labels, class_name=name))["properties"]["classification"]["color"]
               for name in ("Gland", "Nucleus", "Stroma")}
    assert colours["Gland"] == list(qupath.COLOURS["glands"])
    assert colours["Nucleus"] == list(qupath.COLOURS["nuclei"]) != colours["Gland"]
    assert colours["Stroma"] == list(qupath.DEFAULT_COLOUR)
