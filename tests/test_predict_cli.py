"""``genselfdiff predict`` / ``export`` on the bundled sample image with a tiny model."""
import json

import numpy as np
import pytest
import torch

from napari_genselfdiff.cli import main
from napari_genselfdiff.core.data import LabeledImage
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.training import FinetuneConfig, finetune
from napari_genselfdiff.bundled import sample_image_path


@pytest.fixture(scope="module")
def tiny_glands(tmp_path_factory):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tgt = (img[..., 1] < 100).astype(np.uint8)
    out = tmp_path_factory.mktemp("m") / "glands"
    cfg = FinetuneConfig(preset="tiny", steps=2, patch=32, batch=2, checkpoint_every=0, val_every=0)
    drain(finetune([LabeledImage("a", img, tgt)], out, cfg, device="cpu"))
    return out


def test_predict_writes_store_geojson_overlay_and_exports(tiny_glands, tmp_path, capsys):
    out = tmp_path / "pred.zarr"
    code = main(["predict", "--model", str(tiny_glands), "--input", str(sample_image_path()), "--out", str(out),
                 "--tile", "256", "--overlap", "32", "--level", "0", "--no-tissue", "--device", "cpu",
                 "--geojson", str(tmp_path / "g.geojson"), "--overlay", str(tmp_path / "ov.png")])
    assert code == 0, capsys.readouterr().err
    import zarr
    g = zarr.open_group(out, mode="r")
    assert g["probabilities"].shape == (2, 768, 1024)
    labels = np.asarray(g["labels"]["glands"]["0"])
    assert labels.shape == (768, 1024)
    fc = json.loads((tmp_path / "g.geojson").read_text())
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == len(np.unique(labels[labels > 0]))  # one feature per object id
    if fc["features"]:
        props = fc["features"][0]["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Gland"
        assert 0 <= props["measurements"]["mean_probability"] <= 1
    from imageio.v3 import imread
    assert imread(tmp_path / "ov.png").shape == (768, 1024, 3)

    code = main(["export", "--labels", str(out), "--tiff", str(tmp_path / "l.tif"), "--ome-zarr",
                 str(tmp_path / "l.ome.zarr"), "--geojson", str(tmp_path / "d.geojson"), "--object-type", "detection"])
    assert code == 0
    from napari_genselfdiff.formats.tiff import read_label_tiff
    np.testing.assert_array_equal(read_label_tiff(tmp_path / "l.tif"), labels)
    det = json.loads((tmp_path / "d.geojson").read_text())
    assert all(f["properties"]["objectType"] == "detection" for f in det["features"])
    # the OME-Zarr's root is the slide's image (the level predicted), in micrometres, with the labels
    images, label_nodes = _ome_zarr_nodes(tmp_path / "l.ome.zarr")
    assert [d.shape for d in images[0].data][:2] == [(3, 768, 1024), (3, 384, 512)]
    assert images[0].metadata["coordinateTransformations"][0] == [{"type": "scale", "scale": [1.0, 0.499, 0.499]}]
    assert [a.get("unit") for a in images[0].metadata["axes"]] == [None, "micrometer", "micrometer"]
    from napari_genselfdiff.slide.reader import open_slide
    with open_slide(sample_image_path()) as slide:
        np.testing.assert_array_equal(np.asarray(images[0].data[0]), np.moveaxis(np.asarray(slide.levels[0]), -1, 0))
    (lab,) = label_nodes
    np.testing.assert_array_equal(np.asarray(lab.data[0]), labels)
    assert lab.metadata["name"] == "glands"


def _ome_zarr_nodes(path):
    """(image nodes, label nodes) the ``ome-zarr`` reader finds opening ``path``."""
    import ome_zarr.io as ome_io
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(ome_io.parse_url(str(path)))())
    return ([n for n in nodes if n.load(Multiscales) and not n.load(Label)], [n for n in nodes if n.load(Label)])


def test_ome_zarr_export_finds_its_slide_or_says_why_not(tiny_glands, tmp_path, capsys):
    import shutil

    slide = tmp_path / "case.tif"
    shutil.copy(sample_image_path(), slide)
    out = tmp_path / "pred.zarr"
    assert main(["predict", "--model", str(tiny_glands), "--input", str(slide), "--out", str(out), "--tile", "256",
                 "--overlap", "32", "--level", "1", "--no-tissue", "--device", "cpu"]) == 0
    # the prediction ran on level 1 (384 x 512): the image is that level, each pixel 2 x 0.499 um
    assert main(["export", "--labels", str(out), "--ome-zarr", str(tmp_path / "a.zarr")]) == 0
    images, labels = _ome_zarr_nodes(tmp_path / "a.zarr")
    assert images[0].data[0].shape == (3, 384, 512) and labels[0].data[0].shape == (384, 512)
    assert images[0].metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 0.998, 0.998]
    # --no-image: the labels only (a viewer opening the root finds nothing, as the help says)
    assert main(["export", "--labels", str(out), "--ome-zarr", str(tmp_path / "b.zarr"), "--no-image"]) == 0
    images, labels = _ome_zarr_nodes(tmp_path / "b.zarr")
    assert images == [] and labels == []
    capsys.readouterr()
    # the slide moved: the labels are exported, with a note saying how to add the image
    moved = tmp_path / "moved.tif"
    slide.rename(moved)
    assert main(["export", "--labels", str(out), "--ome-zarr", str(tmp_path / "c.zarr")]) == 0
    err = capsys.readouterr().err
    assert "case.tif is not there" in err and "--slide" in err
    assert main(["export", "--labels", str(out), "--ome-zarr", str(tmp_path / "d.zarr"), "--slide", str(moved)]) == 0
    assert _ome_zarr_nodes(tmp_path / "d.zarr")[0][0].data[0].shape == (3, 384, 512)
    # another slide, whose level 1 is not the prediction's: one line, nothing written
    other = tmp_path / "other.png"
    from PIL import Image
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(other)
    assert main(["export", "--labels", str(out), "--ome-zarr", str(tmp_path / "e.zarr"), "--slide", str(other),
                 "--geojson", str(tmp_path / "e.geojson")]) == 2
    err = capsys.readouterr().err
    assert "other.png: level 1 is 300x400, the prediction is 384x512" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "e.geojson").exists()


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--labels", str(tmp_path / "nope.zarr"), "--geojson", str(tmp_path / "x.geojson")]) == 2
    err = capsys.readouterr().err
    assert "no such prediction store" in err and len(err.strip().splitlines()) == 1


def test_the_cli_tiles_slides_like_the_library_by_default():
    """`genselfdiff predict` without --tile uses the library's default tile (the measured one)."""
    from napari_genselfdiff.cli import build_parser
    from napari_genselfdiff.slide.tiler import DEFAULT_TILE, SlideSettings

    args = build_parser().parse_args(["predict", "--model", "m", "--input", "s.tif", "--out", "o.zarr"])
    assert args.tile == DEFAULT_TILE == SlideSettings().tile


def test_csv_export_measures_every_object_of_the_store(tiny_glands, tmp_path, capsys):
    """Issue 35 item 5 for a whole slide: `export --csv` writes a row per object of the store, the
    table measure_objects gives the whole label array with the slide's pixels at the predicted level."""
    import csv
    import shutil

    from napari_genselfdiff.formats.measurements import measure_objects
    from napari_genselfdiff.slide.reader import open_slide
    from napari_genselfdiff.slide.store import PredictionStore

    slide = tmp_path / "case.tif"
    shutil.copy(sample_image_path(), slide)
    out = tmp_path / "pred.zarr"
    assert main(["predict", "--model", str(tiny_glands), "--input", str(slide), "--out", str(out), "--tile", "256",
                 "--overlap", "32", "--level", "1", "--no-tissue", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["export", "--labels", str(out), "--csv", str(tmp_path / "m.csv")]) == 0
    store = PredictionStore.open(out)
    labels = np.asarray(store.labels("glands"))
    with open_slide(slide) as opened:
        expected = measure_objects(labels, image=np.asarray(opened.levels[1]), probability=store.foreground()[:, :],
                                   mpp=store.mpp)
    with open(tmp_path / "m.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(np.unique(labels[labels > 0])) == len(expected["Object ID"]) > 0
    assert f"csv: {len(rows)} objects measured" in capsys.readouterr().out
    assert list(rows[0]) == list(expected) and "Hematoxylin OD mean" in rows[0] and "Area µm^2" in rows[0]
    for column, values in expected.items():
        np.testing.assert_allclose([float(r[column]) for r in rows], values, rtol=1e-5, err_msg=column)
    # the slide moved: the shapes are measured, the note says why there are no optical densities
    slide.rename(tmp_path / "moved.tif")
    assert main(["export", "--labels", str(out), "--csv", str(tmp_path / "m.csv"), "--force"]) == 0
    err = capsys.readouterr().err
    assert "case.tif is not there" in err and "optical densities" in err
    with open(tmp_path / "m.csv", encoding="utf-8") as f:
        header = f.readline()
    assert "Hematoxylin" not in header and "Probability mean" in header
    # a CSV that is not ours is never replaced, --force or not
    (tmp_path / "mine.csv").write_text("patient,notes\n1,keep me\n")
    assert main(["export", "--labels", str(out), "--csv", str(tmp_path / "mine.csv"), "--force"]) == 2
    assert (tmp_path / "mine.csv").read_text() == "patient,notes\n1,keep me\n"
