"""The OpenSlide reader backend and open_slide's automatic choice between tifffile and OpenSlide.

OpenSlide reads SVS too, so the real SVS is read both ways and compared. A real MRXS, BIF or
Philips TIFF cannot be made here: for those the dispatch is tested (which reader open_slide
calls), and a Hamamatsu VMS (an INI file naming a JPEG with restart markers, which tifffile cannot
read at all) is built from the bundled sample image and read through OpenSlide for real.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL
import pytest
import tifffile
from PIL import Image

from napari_genselfdiff.bundled import sample_image_path
from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.slide import openslide_reader, reader
from napari_genselfdiff.slide.openslide_reader import OpenSlideFile, composite_on_white
from napari_genselfdiff.slide.reader import file_mpp, open_slide

#: Regions (level, y, x, h, w) of the 2967 x 2220 SVS: corners, the middle, across the border.
SVS_REGIONS = [(0, 0, 0, 256, 256), (0, 1000, 700, 300, 500), (0, 2711, 1964, 256, 256),
               (0, 2900, 2150, 200, 200), (0, -20, -30, 64, 64)]


@pytest.fixture
def svs(slides_dir) -> Path:
    return slides_dir / "cmu_small_region.svs"


def test_openslide_reads_the_svs_as_tifffile_does(svs):
    with open_slide(svs) as by_tifffile, reader._open_openslide(svs) as by_openslide:
        assert (by_tifffile.backend, by_openslide.backend) == ("tifffile", "openslide")
        assert by_openslide.mpp == pytest.approx(by_tifffile.mpp) == pytest.approx(0.499)
        assert by_openslide.shape == by_tifffile.shape == (2967, 2220, 3)
        assert by_openslide.downsamples == by_tifffile.downsamples
        assert [lv.shape for lv in by_openslide.levels] == [lv.shape for lv in by_tifffile.levels]
        for region in SVS_REGIONS:
            a, b = by_tifffile.read_region(*region), by_openslide.read_region(*region)
            assert b.shape == region[3:] + (3,) and b.dtype == np.uint8
            np.testing.assert_array_equal(b, a, err_msg=f"region {region}")
        # outside the image is white, as in the tifffile reader
        assert (by_openslide.read_region(0, -20, -30, 64, 64)[:20] == 255).all()
        # the lazy level (what napari shows) holds the same pixels as the direct region reads
        np.testing.assert_array_equal(by_openslide.levels[0][1000:1300, 700:1200].compute(),
                                      by_openslide.read_region(0, 1000, 700, 300, 500))


def test_open_slide_picks_tifffile_for_svs_and_openslide_for_mrxs(svs, tmp_path, monkeypatch):
    calls = []
    real_openslide, real_tiff = reader._open_openslide, reader._open_tiff
    monkeypatch.setattr(reader, "_open_openslide", lambda p: calls.append(("openslide", p.name)) or real_openslide(p))
    monkeypatch.setattr(reader, "_open_tiff", lambda p: calls.append(("tifffile", p.name)) or real_tiff(p))
    with open_slide(svs) as slide:
        assert slide.backend == "tifffile"
    assert calls == [("tifffile", "cmu_small_region.svs")]
    # a .mrxs goes to OpenSlide by its extension (no real MIRAX can be made here: its index
    # file is INI text and its tiles live in a companion folder), and when OpenSlide cannot
    # read it the error is one line naming the file and what is missing
    calls.clear()
    mrxs = tmp_path / "case.mrxs"
    mrxs.write_text("[GENERAL]\nSLIDE_VERSION=01.02\n")
    with pytest.raises(DataError, match=r"case\.mrxs: OpenSlide cannot open it .*data folder 'case'") as err:
        open_slide(mrxs)
    assert len(str(err.value).splitlines()) == 1
    assert calls == [("openslide", "case.mrxs")]
    assert file_mpp(mrxs) is None


@pytest.mark.parametrize("vendor, backend", [("philips", "openslide"), ("ventana", "openslide"),
                                             (None, "tifffile"), ("hamamatsu", "tifffile")])
def test_tiff_vendors_tifffile_misreads_go_to_openslide(tmp_path, monkeypatch, vendor, backend):
    """Philips TIFF (sparse tiles) and Ventana (overlapping tiles) are TIFFs tifffile would read
    wrongly: OpenSlide's vendor detection sends them to OpenSlide; NDPI ('hamamatsu') stays with
    tifffile. The detection is faked (no Philips file can be made here), the dispatch is real."""
    path = tmp_path / "scan.tiff"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    used = []
    monkeypatch.setattr(openslide_reader, "openslide_vendor", lambda p: vendor)
    monkeypatch.setattr(reader, "_open_openslide", lambda p: used.append("openslide") or "opened by OpenSlide")
    result = open_slide(path)
    assert used == (["openslide"] if backend == "openslide" else [])
    if backend == "tifffile":
        assert result.backend == "tifffile" and result.read_region(0, 0, 0, 4, 4).max() == 200
        result.close()


def test_openslide_is_tried_when_tifffile_fails(svs, monkeypatch):
    def tifffile_fails(path):
        raise DataError(f"{path.name}: tifffile cannot read it (pretend)")

    monkeypatch.setattr(reader, "_open_tiff", tifffile_fails)
    with open_slide(svs) as slide:
        assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.499)
        expected = tifffile.imread(svs)[1000:1100, 700:900]
        np.testing.assert_array_equal(slide.read_region(0, 1000, 700, 100, 200), expected)


def test_neither_reader_can_is_one_line_naming_both(svs, tmp_path, monkeypatch):
    cut = tmp_path / "cut.svs"
    cut.write_bytes(svs.read_bytes()[:4096])
    with pytest.raises(DataError, match=r"cut\.svs: .*truncated or damaged") as err:
        open_slide(cut)
    assert len(str(err.value).splitlines()) == 1
    # a file OpenSlide recognises but cannot read either: both reasons, in one line
    monkeypatch.setattr(openslide_reader, "openslide_vendor", lambda p: "aperio")
    with pytest.raises(DataError, match=r"cut\.svs: .*truncated.*; OpenSlide cannot read it either "
                                        r"\(cut\.svs: OpenSlide cannot open it") as err:
        open_slide(cut)
    assert len(str(err.value).splitlines()) == 1
    bif = tmp_path / "scan.bif"
    bif.write_bytes(b"II*\x00" + b"\0" * 100)
    with pytest.raises(DataError, match=r"scan\.bif: OpenSlide cannot open it"):
        open_slide(bif)


def _make_vms(folder: Path, image: np.ndarray, mpp: float) -> Path:
    """A Hamamatsu VMS: an INI key file naming one JPEG with restart markers, plus its map."""
    if tuple(int(v) for v in PIL.__version__.split(".")[:2]) < (10, 2):
        pytest.skip("Pillow >= 10.2 is needed to write JPEG restart markers")
    Image.fromarray(image).save(folder / "img.jpg", quality=95, subsampling=0, restart_marker_blocks=16)
    Image.fromarray(image[::8, ::8]).save(folder / "map.jpg", quality=95, subsampling=0,
                                          restart_marker_blocks=4)
    h, w = image.shape[:2]
    vms = folder / "scan.vms"
    vms.write_text("[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
                   f"ImageFile=img.jpg\nMapFile=map.jpg\nPhysicalWidth={round(w * mpp * 1000)}\n"
                   f"PhysicalHeight={round(h * mpp * 1000)}\n")
    return vms


def test_a_real_vms_tifffile_cannot_read_is_read_with_openslide(tmp_path):
    image = np.asarray(Image.open(sample_image_path()).convert("RGB"))[:512, :768]
    vms = _make_vms(tmp_path, image, mpp=0.5)
    with pytest.raises(Exception):
        tifffile.TiffFile(vms)                              # not a TIFF: only OpenSlide reads it
    decoded = np.asarray(Image.open(tmp_path / "img.jpg"))  # the pixels the JPEG holds
    with open_slide(vms) as slide:
        assert slide.backend == "openslide" and slide.notes[0].startswith("read with OpenSlide (hamamatsu")
        assert slide.shape == (512, 768, 3)
        assert slide.mpp == pytest.approx(0.5)
        assert slide.downsamples[:3] == [1.0, 2.0, 4.0]
        assert slide.level_for_mpp(1.0) == 1 and slide.levels[1].shape == (256, 384, 3)
        for y, x, h, w in [(0, 0, 512, 768), (100, 200, 64, 300), (480, 700, 64, 100)]:
            got = slide.read_region(0, y, x, h, w).astype(int)
            want = np.full((h, w, 3), 255)
            want[:max(0, min(h, 512 - y)), :max(0, min(w, 768 - x))] = decoded[y:y + h, x:x + w]
            assert np.abs(got - want).max() <= 2, (y, x, h, w)    # libjpeg builds may round differently
        # level coordinates, as the tifffile reader takes them: level 1 pixel (50, 60) is level-0 (100, 120)
        np.testing.assert_array_equal(slide.read_region(1, 50, 60, 40, 40), slide.levels[1][50:90, 60:100].compute())
    assert file_mpp(vms) == pytest.approx(0.5)
    with pytest.raises(DataError, match=r"scan\.vms.*closed"):
        slide.read_region(0, 0, 0, 8, 8)
    with pytest.raises(DataError, match=r"scan\.vms.*closed"):
        slide.read_region(2, 0, 0, 8, 8)


def test_openslide_file_interface_and_compositing(svs):
    with OpenSlideFile(svs) as osf:
        assert osf.vendor == "aperio" and osf.shapes == [(2967, 2220)] and osf.downsamples == [1.0]
        assert osf.levels[0].shape == (2967, 2220, 3) and osf.levels[0].dtype == np.uint8
        with pytest.raises(DataError, match="level 3 does not exist"):
            osf.read_region(3, 0, 0, 4, 4)
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8)
    np.testing.assert_array_equal(composite_on_white(rgba), [[[10, 20, 30], [255, 255, 255], [127, 127, 127]]])
