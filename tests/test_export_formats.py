"""OME-Zarr (NGFF 0.4) and pyramidal TIFF label export: round trips, pyramid levels, metadata,
lazy sources, and atomicity (a failed write leaves neither a partial target nor temp files)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.core.atomic import foreign_files
from napari_genselfdiff.formats import ome_zarr, tiff


def _labels(shape=(300, 500), dtype=np.int32, seed=0) -> np.ndarray:
    """Blocky labels (8x8 patches with random ids) so that striding is visible."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, np.iinfo(dtype).max if np.dtype(dtype).itemsize < 4 else 10 ** 6,
                         (-(-shape[0] // 8), -(-shape[1] // 8)))
    return np.kron(small, np.ones((8, 8), int))[:shape[0], :shape[1]].astype(dtype)


# --------------------------------------------------------------------------- OME-Zarr

@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint32])
def test_ome_zarr_round_trip_levels_and_values(tmp_path, dtype):
    labels = _labels(dtype=dtype)
    target = ome_zarr.write_ome_zarr_labels(tmp_path / "out.zarr", labels, chunks=(64, 128))
    levels = ome_zarr.read_ome_zarr_labels(target)
    assert [lv.shape for lv in levels] == [(300, 500), (150, 250), (75, 125), (38, 63)]
    for k, level in enumerate(levels):
        assert level.dtype == dtype
        np.testing.assert_array_equal(np.asarray(level), labels[::2 ** k, ::2 ** k])
    assert levels[0].chunks == (64, 128)


def test_ome_zarr_ngff_metadata(tmp_path):
    labels = _labels((100, 60))
    path = tmp_path / "slide.ome.zarr"
    ome_zarr.write_ome_zarr_labels(path, labels, name="nuclei", downsample=2,
                                   image_shape=(200, 120), pyramid_levels=3, chunks=(32, 32))
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    assert json.loads((path / "labels" / ".zattrs").read_text()) == {"labels": ["nuclei"]}
    attrs = json.loads((path / "labels" / "nuclei" / ".zattrs").read_text())
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4" and ms["name"] == "nuclei"
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["type"] == "space" and "unit" not in a for a in ms["axes"])   # no mpp: pixels
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    # full-resolution pixels per label pixel; a label pixel's centre lies half a label pixel in
    assert [d["coordinateTransformations"] for d in ms["datasets"]] == [
        [{"type": "scale", "scale": [2.0 * 2 ** k, 2.0 * 2 ** k]},
         {"type": "translation", "translation": [0.5, 0.5]}] for k in range(3)]
    assert attrs["image-label"]["version"] == "0.4"
    assert attrs["image-label"]["source"] == {"image": "../../"}
    assert attrs["napari-genselfdiff"] == {"image_shape": [200, 120], "unit": "pixel", "downsample": 2.0}
    zarray = json.loads((path / "labels" / "nuclei" / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["zarr_format"] == 2
    assert zarray["dtype"] == "<i4" and zarray["chunks"] == [32, 32]
    assert (path / "labels" / "nuclei" / "0" / "0" / "0").is_file()      # nested chunk keys
    levels = ome_zarr.read_ome_zarr_labels(path, "nuclei")
    assert [lv.shape for lv in levels] == [(100, 60), (50, 30), (25, 15)]


def test_ome_zarr_from_lazy_source_and_tiny_pyramid(tmp_path):
    labels = _labels((70, 90))
    lazy = zarr.create_array(tmp_path / "src.zarr", shape=labels.shape, dtype=labels.dtype,
                             chunks=(16, 16))
    lazy[:] = labels
    path = ome_zarr.write_ome_zarr_labels(tmp_path / "o.zarr", lazy, pyramid_levels=20,
                                          chunks=(32, 32))
    levels = ome_zarr.read_ome_zarr_labels(path)
    assert levels[-1].shape == (1, 1) and len(levels) == 8            # stops at 1 x 1
    np.testing.assert_array_equal(np.asarray(levels[3]), labels[::8, ::8])


def test_ome_zarr_argument_and_read_errors(tmp_path):
    with pytest.raises(ValueError, match="image_shape"):
        ome_zarr.write_ome_zarr_labels(tmp_path / "a.zarr", _labels((10, 10)),
                                       image_shape=(40, 20), downsample=2)
    with pytest.raises(ValueError, match="integer"):
        ome_zarr.write_ome_zarr_labels(tmp_path / "a.zarr", np.zeros((4, 4)))
    assert not (tmp_path / "a.zarr").exists()
    with pytest.raises(DataError, match="missing.zarr.*not found"):
        ome_zarr.read_ome_zarr_labels(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain.*not an OME-Zarr with labels"):
        ome_zarr.read_ome_zarr_labels(tmp_path / "plain")
    ome_zarr.write_ome_zarr_labels(tmp_path / "ok.zarr", _labels((10, 10)))
    with pytest.raises(DataError, match="no labels named 'cells'"):
        ome_zarr.read_ome_zarr_labels(tmp_path / "ok.zarr", "cells")


def test_ome_zarr_failed_write_leaves_no_partial_target(tmp_path, monkeypatch):
    labels = _labels((128, 128))
    real = ome_zarr._write_level

    def failing(group, name, *args, **kwargs):
        if name == "2":
            raise RuntimeError("disk full")
        return real(group, name, *args, **kwargs)

    monkeypatch.setattr(ome_zarr, "_write_level", failing)
    target = tmp_path / "new.zarr"
    with pytest.raises(RuntimeError, match="disk full"):
        ome_zarr.write_ome_zarr_labels(target, labels, chunks=(32, 32))
    assert list(tmp_path.iterdir()) == []

    # an existing good target survives a failed overwrite ...
    monkeypatch.setattr(ome_zarr, "_write_level", real)
    old = _labels((64, 64), seed=1)
    ome_zarr.write_ome_zarr_labels(target, old)
    monkeypatch.setattr(ome_zarr, "_write_level", failing)
    with pytest.raises(RuntimeError):
        ome_zarr.write_ome_zarr_labels(target, labels, force=True)
    np.testing.assert_array_equal(np.asarray(ome_zarr.read_ome_zarr_labels(target)[0]), old)
    # ... and a successful overwrite (of an export of ours, with force) replaces it without leftovers
    monkeypatch.setattr(ome_zarr, "_write_level", real)
    ome_zarr.write_ome_zarr_labels(target, labels, force=True)
    np.testing.assert_array_equal(np.asarray(ome_zarr.read_ome_zarr_labels(target)[0]), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["new.zarr"]


# --------------------------------------------------------------------------- TIFF

def test_tiff_round_trip_pyramid_tiles_and_resolution(tmp_path):
    labels = _labels((700, 900), np.uint16)
    path = tiff.write_label_tiff(tmp_path / "l.tif", labels, tile=(256, 256), mpp=0.25)
    back = tiff.read_label_tiff(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_bigtiff
        assert len(tif.pages) == 1                        # levels are SubIFDs, not pages
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 2
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(700, 900), (350, 450), (175, 225)]
        for k, level in enumerate(levels):
            np.testing.assert_array_equal(level.asarray(), labels[::2 ** k, ::2 ** k])
            lp = level.pages[0]
            # 0.25 um/px = 40000 px/cm at level 0, halved at each level
            assert lp.tags["XResolution"].value == (40000 // 2 ** k, 1)
            assert lp.tags["YResolution"].value == (40000 // 2 ** k, 1)
            assert lp.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            assert lp.subfiletype == (0 if k == 0 else 1)         # 1: reduced-resolution


def test_tiff_without_pyramid_and_lazy_source(tmp_path):
    labels = _labels((300, 200), np.int32)
    lazy = zarr.create_array(tmp_path / "s.zarr", shape=labels.shape, dtype=labels.dtype,
                             chunks=(100, 100))
    lazy[:] = labels
    path = tiff.write_label_tiff(tmp_path / "flat.tif", lazy, pyramid=False, tile=(128, 128),
                                 compression="zstd")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 1 and not tif.pages[0].subifds
        assert tif.pages[0].compression == tifffile.COMPRESSION.ZSTD
        assert "XResolution" not in tif.pages[0].tags or tif.pages[0].tags[
            "ResolutionUnit"].value == tifffile.RESUNIT.NONE
    np.testing.assert_array_equal(tiff.read_label_tiff(path), labels)


def test_tiff_bigtiff_when_large(tmp_path, monkeypatch):
    monkeypatch.setattr(tiff, "_BIGTIFF_BYTES", 1000)
    labels = _labels((64, 64), np.uint32)
    path = tiff.write_label_tiff(tmp_path / "big.tif", labels, tile=(32, 32))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and [lv.shape for lv in tif.series[0].levels] == [
            (64, 64), (32, 32)]
    np.testing.assert_array_equal(tiff.read_label_tiff(path), labels)


def test_tiff_failed_write_leaves_no_partial_target(tmp_path, monkeypatch):
    labels = _labels((256, 256), np.uint16)
    target = tmp_path / "x.tif"
    real = tiff._tiles

    def failing(source, factor, shape, tile):
        if factor == 2:
            raise RuntimeError("interrupted")
        return real(source, factor, shape, tile)

    monkeypatch.setattr(tiff, "_tiles", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        tiff.write_label_tiff(target, labels, tile=(64, 64))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tiff, "_tiles", real)
    tiff.write_label_tiff(target, labels[:64, :64], tile=(64, 64))  # ours: force may replace it
    previous = target.read_bytes()
    monkeypatch.setattr(tiff, "_tiles", failing)
    with pytest.raises(RuntimeError):
        tiff.write_label_tiff(target, labels, tile=(64, 64), force=True)
    assert target.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["x.tif"]


def test_tiff_bad_arguments_and_files(tmp_path):
    with pytest.raises(ValueError, match="multiples of 16"):
        tiff.write_label_tiff(tmp_path / "a.tif", _labels((32, 32)), tile=(100, 100))
    with pytest.raises(ValueError, match="integer"):
        tiff.write_label_tiff(tmp_path / "a.tif", np.zeros((32, 32), np.float32))
    with pytest.raises(DataError, match="nothere.tif.*not found"):
        tiff.read_label_tiff(tmp_path / "nothere.tif")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff")
    with pytest.raises(DataError, match="junk.tif.*cannot read"):
        tiff.read_label_tiff(junk)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="rgb.tif.*not a 2-D integer"):
        tiff.read_label_tiff(rgb)


def test_write_tiff_one_image_atomically_with_resolution(tmp_path, monkeypatch):
    rgb = np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    path = tiff.write_tiff(tmp_path / "sub" / "img.tif", rgb, photometric="rgb", tile=(64, 64), mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.photometric == tifffile.PHOTOMETRIC.RGB
        assert page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1] == pytest.approx(2e4)
        np.testing.assert_array_equal(page.asarray(), rgb)
    mask = _labels((40, 50), np.uint16)
    np.testing.assert_array_equal(tiff.read_label_tiff(tiff.write_tiff(tmp_path / "m.tif", mask)), mask)
    # a failed write leaves the previous file and no temporary one
    target = tmp_path / "m.tif"
    monkeypatch.setattr(tifffile.TiffWriter, "write", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk")))
    with pytest.raises(RuntimeError, match="disk"):
        tiff.write_tiff(target, mask)
    np.testing.assert_array_equal(tiff.read_label_tiff(target), mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "sub"]


# ------------------------------------------------- OME-Zarr as a viewer reads it (ome-zarr)

def _read_with_ome_zarr(path):
    """The nodes the ``ome-zarr`` reader (what napari-ome-zarr builds on) finds at ``path``."""
    import ome_zarr.io as ome_io
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(ome_io.parse_url(str(path)))())
    images = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
    labels = [n for n in nodes if n.load(Label)]
    return images, labels


def _mean2(a: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 -> rounded 2 x 2 means, an odd edge repeated."""
    a = np.pad(a.astype(np.float32), ((0, 0), (0, a.shape[1] % 2), (0, a.shape[2] % 2)), mode="edge")
    return np.rint((a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]) / 4).astype(np.uint8)


def test_ome_zarr_root_is_an_image_in_micrometres_with_its_labels(tmp_path):
    import dask.array as da

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (150, 250, 3), dtype=np.uint8)
    labels = np.zeros((150, 250), np.int32)
    labels[10:40, 20:90], labels[60:149, 100:249] = 5, 12
    path = ome_zarr.write_ome_zarr_labels(
        tmp_path / "slide.ome.zarr", labels, name="glands", image=da.from_array(image, chunks=64),
        image_name="slide.svs", downsample=4.0, mpp=0.25, chunks=(64, 64))

    images, label_nodes = _read_with_ome_zarr(path)
    (root,) = images
    assert Path(root.zarr.path) == path                                  # the root itself is the image
    assert root.metadata["axes"] == [{"name": "c", "type": "channel"},
                                     {"name": "y", "type": "space", "unit": "micrometer"},
                                     {"name": "x", "type": "space", "unit": "micrometer"}]
    # one image pixel = 4 slide pixels of 0.25 um; level k = 2**k of those; centres placed
    transforms = root.metadata["coordinateTransformations"]
    assert [t[0]["scale"] for t in transforms] == [[1.0, 1.0 * 2 ** k, 1.0 * 2 ** k] for k in range(4)]
    assert [t[1]["translation"] for t in transforms] == [
        [0.0, 0.375 + (2 ** k - 1) / 2, 0.375 + (2 ** k - 1) / 2] for k in range(4)]
    assert root.metadata["channel_names"] == ["red", "green", "blue"]
    assert [d.shape for d in root.data] == [(3, 150, 250), (3, 75, 125), (3, 38, 63), (3, 19, 32)]
    np.testing.assert_array_equal(np.asarray(root.data[0]), np.moveaxis(image, -1, 0))
    np.testing.assert_array_equal(np.asarray(root.data[1]), _mean2(np.moveaxis(image, -1, 0)))
    np.testing.assert_array_equal(np.asarray(root.data[2]), _mean2(np.asarray(root.data[1])))

    (lab,) = label_nodes
    assert lab.metadata["name"] == "glands"
    assert [a.get("unit") for a in lab.metadata["axes"]] == ["micrometer", "micrometer"]
    assert [t[0]["scale"] for t in lab.metadata["coordinateTransformations"]] == [
        [2.0 ** k, 2.0 ** k] for k in range(4)]
    assert [t[1]["translation"] for t in lab.metadata["coordinateTransformations"]] == [[0.375, 0.375]] * 4
    np.testing.assert_array_equal(np.asarray(lab.data[0]), labels)
    np.testing.assert_array_equal(np.asarray(lab.data[1]), labels[::2, ::2])
    colors = lab.metadata["color"]
    assert set(colors) == {0, 5, 12} and colors[0][3] == 0 and colors[5] != colors[12]
    assert all(c[3] == 1.0 for k, c in colors.items() if k)

    # opening the labels themselves finds the image they label (image-label.source)
    images, label_nodes = _read_with_ome_zarr(path / "labels" / "glands")
    assert len(images) == 1 and [d.shape for d in images[0].data][0] == (3, 150, 250)


def test_ome_zarr_export_is_valid_ngff_04(tmp_path):
    """The metadata validates against OME-NGFF 0.4 (ome-zarr-models, which ome-zarr installs)."""
    import ome_zarr_models.v04 as v04
    from ome_zarr_models.v04.image_label import ImageLabel

    labels = _labels((96, 80))
    image = np.full((96, 80, 3), 200, np.uint8)
    path = ome_zarr.write_ome_zarr_labels(tmp_path / "v.zarr", labels, name="nuclei", image=image,
                                          downsample=1.0, mpp=0.5, chunks=(32, 32))
    root = zarr.open_group(str(path), mode="r")
    model = v04.Image.from_zarr(root)
    assert model.labels is not None and model.labels.attributes.labels == ["nuclei"]
    assert [a.unit for a in model.attributes.multiscales[0].axes] == [None, "micrometer", "micrometer"]
    ImageLabel.from_zarr(root["labels"]["nuclei"])       # raises when the labels metadata is not valid


def test_ome_zarr_without_pixel_size_is_in_slide_pixels(tmp_path):
    labels = _labels((64, 64))
    path = ome_zarr.write_ome_zarr_labels(tmp_path / "p.zarr", labels, image=np.zeros((64, 64, 3), np.uint8),
                                          downsample=2.0, pyramid_levels=2)
    images, label_nodes = _read_with_ome_zarr(path)
    assert all("unit" not in a for a in images[0].metadata["axes"] + label_nodes[0].metadata["axes"])
    assert [t[0]["scale"] for t in images[0].metadata["coordinateTransformations"]] == [[1.0, 2.0, 2.0], [1.0, 4.0, 4.0]]
    attrs = json.loads((path / "labels" / "glands" / ".zattrs").read_text())
    assert attrs["napari-genselfdiff"]["unit"] == "pixel"


def test_ome_zarr_colours_every_object_or_none(tmp_path, monkeypatch):
    labels = np.arange(30, dtype=np.int32).reshape(5, 6)           # 29 objects and background
    path = ome_zarr.write_ome_zarr_labels(tmp_path / "c.zarr", labels, chunks=(2, 4))
    colors = json.loads((path / "labels" / "glands" / ".zattrs").read_text())["image-label"]["colors"]
    assert [c["label-value"] for c in colors] == list(range(30))    # every id seen across chunks
    assert len({tuple(c["rgba"]) for c in colors}) == 30
    # more objects than listed would leave the unlisted invisible in napari: then none are listed
    monkeypatch.setattr(ome_zarr, "MAX_COLORS", 10)
    path = ome_zarr.write_ome_zarr_labels(tmp_path / "d.zarr", labels, chunks=(2, 4))
    assert "colors" not in json.loads((path / "labels" / "glands" / ".zattrs").read_text())["image-label"]


def test_ome_zarr_image_must_match_the_labels(tmp_path):
    with pytest.raises(ValueError, match=r"image must be \(10, 10, 3\) uint8"):
        ome_zarr.write_ome_zarr_labels(tmp_path / "m.zarr", _labels((10, 10)), image=np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(ValueError, match="image must be"):
        ome_zarr.write_ome_zarr_labels(tmp_path / "m.zarr", _labels((10, 10)), image=np.zeros((10, 10, 3), np.float32))
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.parametrize("inside", ["notes.txt", "labels/my_counts.csv", "0/README"])
def test_ome_zarr_force_never_deletes_a_users_file_put_inside_our_export(inside, tmp_path):
    """Issue 36 (4): a user's file inside an earlier export of ours makes it theirs too: --force
    refuses to replace the folder, and the file is kept byte for byte."""
    from napari_genselfdiff.core.errors import DataError

    target = tmp_path / "out.zarr"
    ome_zarr.write_ome_zarr_labels(target, _labels((64, 64)))
    assert ome_zarr.is_our_ome_zarr(target)
    user = target / inside
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_bytes(b"a pathologist's own file")
    assert not ome_zarr.is_our_ome_zarr(target) and foreign_files(target) == [inside]
    with pytest.raises(DataError, match="not an OME-Zarr labels export written by genselfdiff|never replaced"):
        ome_zarr.write_ome_zarr_labels(target, _labels((64, 64), seed=2), force=True)
    assert user.read_bytes() == b"a pathologist's own file"
