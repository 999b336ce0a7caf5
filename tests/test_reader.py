"""Lazy slide reading: formats, pyramids, pixel size, normalisation to RGB uint8, bad input."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import skimage.io
import tifffile
import zarr

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.slide.levels import level_for_mpp, region_at_mpp
from napari_genselfdiff.slide.reader import Slide, open_slide

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_test_slide", REPO / "scripts" / "make_test_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_test_slide = _load_script().make_test_slide


def _mean2(a: np.ndarray) -> np.ndarray:
    """Rounded 2x2 mean of an (H, W, 3) uint8 image (odd edge trimmed), as the reader builds it."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    f = a[:h, :w].astype(np.float32)
    return np.rint((f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2]) / 4).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid_tif(tmp_path_factory) -> Path:
    """A small pyramidal BigTIFF from the build script (synthetic tissue, lossless tiles)."""
    out = tmp_path_factory.mktemp("slide") / "pyr.tif"
    return make_test_slide(out, 1024, tile=256, mpp=0.5, source=None, compression="zlib")


# ------------------------------------------------------------------------------- real SVS


def test_svs_opens_with_pyramid_mpp_and_exact_regions(slides_dir):
    with open_slide(slides_dir / "cmu_small_region.svs") as slide:
        # tifffile's series 0 (the baseline image) is 2967 rows x 2220 columns; the thumbnail,
        # label and macro pages are separate series and must not become levels
        assert slide.shape == (2967, 2220, 3)
        assert slide.mpp == pytest.approx(0.499)
        assert all(lv.dtype == np.uint8 and lv.shape[2] == 3 for lv in slide.levels)
        # one stored level -> lower levels are built lazily by 2x2 averaging
        assert slide.downsamples[:3] == [1.0, 2.0, 4.0]
        assert slide.levels[1].shape == (1483, 1110, 3)
        full = slide.levels[0].compute()
        region = slide.read_region(0, 1000, 700, 300, 500)
        np.testing.assert_array_equal(region, full[1000:1300, 700:1200])
        np.testing.assert_array_equal(slide.levels[1][:50, :60].compute(), _mean2(full[:100, :120]))
        # the region crossing the bottom-right corner is padded with white
        corner = slide.read_region(0, 2900, 2200, 100, 50)
        np.testing.assert_array_equal(corner[:67, :20], full[2900:, 2200:])
        assert (corner[67:] == 255).all() and (corner[:, 20:] == 255).all()


def test_level_for_mpp_picks_nearest_level_on_log_scale():
    lv = [da.zeros((64, 64, 3), np.uint8), da.zeros((32, 32, 3), np.uint8), da.zeros((16, 16, 3), np.uint8)]
    slide = Slide(path=Path("x"), levels=lv, downsamples=[1.0, 2.0, 4.0], mpp=0.5)
    # level mpps 0.5, 1.0, 2.0: |log(1.0/1.5)| = 0.405 > |log(2.0/1.5)| = 0.288 -> level 2
    assert slide.level_for_mpp(1.5) == 2
    assert slide.level_for_mpp(1.0) == 1
    assert slide.level_for_mpp(0.1) == 0
    assert slide.level_for_mpp(None) == 0
    assert Slide(path=Path("x"), levels=lv, downsamples=[1.0, 2.0, 4.0]).level_for_mpp(1.0) == 0


def test_one_mpp_rule_and_regions_at_the_model_level():
    assert level_for_mpp([1.0, 2.0, 4.0], 0.5, 1.5) == 2
    assert level_for_mpp([1.0, 2.0, 4.0], 0.5, 0.7) == 0  # |log(0.5/0.7)| = 0.336 < |log(1.0/0.7)| = 0.357
    assert level_for_mpp([1.0, 2.0, 4.0], None, 1.0) == level_for_mpp([1.0, 2.0], 0.5, None) == 0
    lv = [da.zeros((64, 64, 3), np.uint8), da.zeros((32, 32, 3), np.uint8), da.zeros((16, 16, 3), np.uint8)]
    slide = Slide(path=Path("x"), levels=lv, downsamples=[1.0, 2.0, 4.0], mpp=0.5)
    # a level-0 view (10, 20) 30 x 40 seen by a 1.0 mpp model: level 1, halved, rounded outwards
    assert slide.region_at_mpp((0, 10, 20, 30, 40), 1.0) == (1, 5, 10, 15, 20)
    assert slide.region_at_mpp((0, 60, 60, 10, 10), 2.0) == (2, 15, 15, 1, 1)  # clipped, >= 1 pixel
    assert slide.region_at_mpp((0, 10, 20, 30, 40), 0.5) == (0, 10, 20, 30, 40)
    assert slide.region_at_mpp((0, 10, 20, 30, 40), None) == (0, 10, 20, 30, 40)
    assert region_at_mpp((0, 10, 20, 30, 40), [1.0, 2.0, 4.0], [(64, 64), (32, 32), (16, 16)], 0.5, 1.0) == \
        (1, 5, 10, 15, 20)


# ------------------------------------------------------------------------------- TIFF family


def test_pyramidal_bigtiff_levels_and_resolution_tag_mpp(pyramid_tif):
    with tifffile.TiffFile(pyramid_tif) as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled
        assert len(tif.series[0].levels) == 3
    with open_slide(pyramid_tif) as slide:
        assert slide.mpp == pytest.approx(0.5)  # XResolution 20000 px/cm
        assert slide.downsamples == [1.0, 2.0, 4.0]
        assert [lv.shape[:2] for lv in slide.levels] == [(1024, 1024), (512, 512), (256, 256)]
        assert slide.notes == []  # a real pyramid: nothing built
        full = slide.levels[0].compute()
        # the script renders level 1 as the 2x2 mean of level 0 (lossless zlib tiles)
        np.testing.assert_array_equal(slide.levels[1].compute(), _mean2(full))
        assert (full == 255).all(axis=2).mean() > 0.2, "the mosaic has white background"
        assert slide.level_for_mpp(2.0) == 2


def test_ome_tiff_planar_channels_and_physical_size(tmp_path, rng):
    img = rng.integers(0, 256, (3, 300, 400), dtype=np.uint8)  # CYX, as OME stores RGB planes
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(path, img, ome=True, tile=(128, 128),
                     metadata={"axes": "CYX", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 250.0, "PhysicalSizeYUnit": "nm"})
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.shape == (300, 400, 3)
        np.testing.assert_array_equal(slide.levels[0].compute(), img.transpose(1, 2, 0))


def test_grayscale_tiff_is_repeated_to_rgb(tmp_path, rng):
    grey = rng.integers(0, 256, (200, 300), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    with open_slide(tmp_path / "g.tif") as slide:
        out = slide.levels[0].compute()
        assert out.shape == (200, 300, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], grey)
        assert any("grayscale" in n for n in slide.notes)


def test_uint16_rgb_and_grey_are_rescaled_as_training_reads_them(tmp_path):
    from napari_genselfdiff.core.data import read_image

    img = np.zeros((64, 64, 3), np.uint16)
    img[0, 0] = (0, 32768, 65535)  # -> 0, rint(127.502) = 128, 255
    tifffile.imwrite(tmp_path / "rgb16.tif", img, photometric="rgb")
    with open_slide(tmp_path / "rgb16.tif") as slide:
        assert slide.levels[0].dtype == np.uint8
        assert tuple(slide.read_region(0, 0, 0, 1, 1)[0, 0]) == (0, 128, 255)
        assert any("16-bit" in n for n in slide.notes)
    # 16-bit grayscale: accepted by predict (this reader) exactly as by training / evaluate (read_image)
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    for name, write in (("grey16.tif", tifffile.imwrite), ("grey16.png", skimage.io.imsave)):
        write(tmp_path / name, grey)
        with open_slide(tmp_path / name) as slide:
            got = slide.levels[0].compute()
        assert got.dtype == np.uint8 and got[0, 0].tolist() == [0, 0, 0] and got[-1, -1].tolist() == [255] * 3
        np.testing.assert_array_equal(got, read_image(tmp_path / name))
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((64, 64, 3), np.float32), photometric="rgb")
    with pytest.raises(DataError, match=r"float\.tif.*float32"):
        open_slide(tmp_path / "float.tif")


def test_stack_with_extra_dimension_is_refused_naming_shape_and_axes(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(DataError, match=r"stack\.tif.*\(2, 64, 64, 3\).*axes"):
        open_slide(tmp_path / "stack.tif")


# ------------------------------------------------------------------------------- OME-Zarr


def _write_ome_zarr(path: Path, levels: list[np.ndarray], axes: list[str], scale0: float) -> None:
    group = zarr.open_group(path, mode="w")
    datasets = []
    for i, arr in enumerate(levels):
        group.create_array(str(i), data=arr, chunks=tuple(min(s, 64) for s in arr.shape))
        scale = [1.0] * (len(axes) - 2) + [scale0 * 2 ** i] * 2
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    group.attrs["multiscales"] = [{
        "version": "0.4", "datasets": datasets,
        "axes": [{"name": a, "type": kinds[a], **({"unit": "micrometer"} if a in "yx" else {})}
                 for a in axes]}]


def test_ome_zarr_multiscale_with_singleton_axes(tmp_path, rng):
    rgb = rng.integers(0, 256, (128, 96, 3), dtype=np.uint8)
    lv0 = rgb.transpose(2, 0, 1)[None, :, None]  # (t, c, z, y, x) = (1, 3, 1, 128, 96)
    lv1 = lv0[..., ::2, ::2]
    _write_ome_zarr(tmp_path / "img.zarr", [lv0, lv1], ["t", "c", "z", "y", "x"], 0.25)
    with open_slide(tmp_path / "img.zarr") as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.downsamples == [1.0, 2.0]
        np.testing.assert_array_equal(slide.levels[0].compute(), rgb)
        np.testing.assert_array_equal(slide.levels[1].compute(), rgb[::2, ::2])


def test_ome_zarr_time_series_is_refused(tmp_path):
    _write_ome_zarr(tmp_path / "t.zarr", [np.zeros((2, 3, 1, 32, 32), np.uint8)],
                    ["t", "c", "z", "y", "x"], 1.0)
    with pytest.raises(DataError, match=r"t\.zarr.*\(2, 3, 1, 32, 32\).*TCZYX"):
        open_slide(tmp_path / "t.zarr")


def test_zarr_without_multiscales_is_refused(tmp_path):
    zarr.open_group(tmp_path / "plain.zarr", mode="w").create_array("a", shape=(4, 4), dtype="uint8")
    with pytest.raises(DataError, match="multiscales"):
        open_slide(tmp_path / "plain.zarr")


# ------------------------------------------------------------------------------- plain images


def test_png_gets_a_lazy_pyramid(glas_dir):
    path = sorted((glas_dir / "images").glob("*.png"))[0]
    img = skimage.io.imread(path)[..., :3]
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert slide.shape == img.shape
        assert len(slide.levels) == 2 and slide.downsamples == [1.0, 2.0]
        np.testing.assert_array_equal(slide.levels[1].compute(), _mean2(img))


def test_rgba_png_is_composited_on_white(tmp_path):
    img = np.zeros((300, 300, 4), np.uint8)
    img[..., :3] = (200, 100, 0)
    img[0, 0, 3] = 0      # transparent -> white
    img[0, 1, 3] = 255    # opaque -> colour
    img[0, 2, 3] = 51     # 20 %: 0.2 * (200, 100, 0) + 0.8 * 255 = (244, 224, 204)
    skimage.io.imsave(tmp_path / "a.png", img, check_contrast=False)
    with open_slide(tmp_path / "a.png") as slide:
        px = slide.read_region(0, 0, 0, 1, 3)[0]
        assert px.tolist() == [[255, 255, 255], [200, 100, 0], [244, 224, 204]]
        assert any("alpha" in n for n in slide.notes)


# ------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.svs: file not found"):
        open_slide(tmp_path / "nope.svs")


def test_truncated_bigtiff_is_reported(pyramid_tif, tmp_path):
    data = pyramid_tif.read_bytes()
    bad = tmp_path / "cut.tif"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.tif.*(truncated|corrupt|not a readable)"):
        open_slide(bad)


def test_garbage_and_unknown_formats(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 60)
    with pytest.raises(DataError, match=r"junk\.tif"):
        open_slide(tmp_path / "junk.tif")
    (tmp_path / "notes.txt").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match=r"notes\.txt: not a supported"):
        open_slide(tmp_path / "notes.txt")
    png = tmp_path / "half.png"
    skimage.io.imsave(png, np.full((64, 64, 3), 9, np.uint8), check_contrast=False)
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(DataError, match=r"half\.png") as err:
        open_slide(png)
    assert "truncated or damaged" in str(err.value) and "pip" not in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_truncated_svs_says_truncated_not_no_series(tmp_path, slides_dir):
    """An SVS keeps its directory at the end: cut short, tifffile finds no image series at all."""
    data = (slides_dir / "cmu_small_region.svs").read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.svs: .*truncated or damaged"):
        open_slide(cut)


def test_tiff_whose_directory_lies_past_its_end_is_truncated(tmp_path):
    import struct
    path = tmp_path / "short.svs"
    path.write_bytes(b"II*\x00" + struct.pack("<I", 5000) + b"\0" * 1000)  # first IFD at 5000 > size
    with pytest.raises(DataError, match=r"short\.svs: .*truncated or damaged"):
        open_slide(path)


def test_reading_after_close_raises_data_error(pyramid_tif):
    slide = open_slide(pyramid_tif)
    assert slide.read_region(0, 0, 0, 8, 8).shape == (8, 8, 3)
    slide.close()
    with pytest.raises(DataError, match=r"pyr\.tif.*closed"):
        slide.read_region(0, 0, 0, 8, 8)
    with pytest.raises(DataError, match="level 7 does not exist"):
        slide.read_region(7, 0, 0, 8, 8)
