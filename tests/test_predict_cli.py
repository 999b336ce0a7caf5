"""``genselfdiff predict`` / ``export`` on the bundled sample image with a tiny model."""
import json

import numpy as np
import pytest
import torch

from napari_genselfdiff.cli import main
from napari_genselfdiff.core.data import LabeledImage
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.training import FinetuneConfig, finetune
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


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--labels", str(tmp_path / "nope.zarr"), "--geojson", str(tmp_path / "x.geojson")]) == 2
    err = capsys.readouterr().err
    assert "no such prediction store" in err and len(err.strip().splitlines()) == 1
