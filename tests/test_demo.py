"""The README's main job (``genselfdiff demo``) end to end, on the bundled sample image."""
import json

import pytest
from imageio.v3 import imread

from napari_genselfdiff.cli import main
from napari_genselfdiff.bundled import bundled_models


@pytest.mark.slow
def test_demo_writes_labels_geojson_and_overlay(tmp_path, capsys, request):
    if not {"glands", "nuclei"} <= set(bundled_models()):
        request.getfixturevalue("glas_dir")  # trains a small model instead: needs the real data
    assert main(["demo", "--out", str(tmp_path), "--quick", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name, info in summary["predicted"].items():
        if name == "overlay" or "skipped" in info:
            continue
        fc = json.loads((tmp_path / f"{name}.geojson").read_text())
        assert len(fc["features"]) == info["objects"]
        assert (tmp_path / f"{name}_labels.tif").exists()
    ov = imread(tmp_path / "overlay.png")
    assert ov.shape == (768, 1024, 3)
    # the outlines are drawn: the overlay differs from the sample image where objects were found
    from napari_genselfdiff.core.data import read_image
    from napari_genselfdiff.bundled import sample_image_path
    changed = (ov != read_image(sample_image_path())).any(axis=2).mean()
    assert (changed > 0) == any(v.get("objects", 0) > 0 for k, v in summary["predicted"].items() if k != "overlay")
    # a gland result over most of the (skin) sample is flagged as implausible, never silently shown
    from napari_genselfdiff.cli.demo import GLANDS_IMPLAUSIBLE
    glands = summary["predicted"].get("glands")
    out = capsys.readouterr().out
    if glands is not None and "skipped" not in glands:
        assert ("implausible" in out) == (glands["foreground_fraction"] > GLANDS_IMPLAUSIBLE)
    # the bundled glands model on the skin sample: skipped, one line saying why, nothing written
    if set(bundled_models()) >= {"glands", "nuclei"}:
        assert "skipped" in glands and not (tmp_path / "glands.geojson").exists()
        assert [ln for ln in out.splitlines() if "no glands here" in ln] == [
            f"glands: skipped, no glands here: {glands['skipped']}"]
