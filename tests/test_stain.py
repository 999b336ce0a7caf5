"""Stain normalisation at inference (core/stain.py, slide/stain.py): an option that moves an image's
tissue colours to the model's training stain, per pixel once the image's statistics are known, so
tiling still cannot change the answer; recorded in a slide's store; the CLI, the evaluation and the
cluster path all take it; a model or a store someone edited gets one clear line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.core.stain import (LabStats, StainNormalizer, StainedPredictor, lab_stats, model_targets,
                                           normalizer_for, training_stain, with_stain)


@pytest.fixture(scope="module")
def tissue(monuseg_dir):
    from napari_genselfdiff.core.data import read_image

    paths = sorted((monuseg_dir / "images").iterdir())[:2]
    return [read_image(p)[:384, :384] for p in paths]


def _tinted(img: np.ndarray) -> np.ndarray:
    """The same tissue scanned paler and bluer (a lighter, colder stain), glass left white."""
    f = img.astype(np.float32)
    out = 255 - (255 - f) * np.array([0.55, 0.7, 0.9])
    return np.clip(out, 0, 255).astype(np.uint8)


def test_a_normalised_image_takes_the_targets_statistics_and_glass_stays(tissue):
    target = lab_stats([tissue[0]])
    pale = _tinted(tissue[1])
    pale[:40, :40] = 250  # glass
    norm = normalizer_for(lab_stats([pale]), {"train": target})
    out = norm(pale)
    assert out.shape == pale.shape and out.dtype == np.uint8
    got = lab_stats([out])
    assert np.allclose(got.mean, target.mean, atol=2.0) and np.allclose(got.std, target.std, atol=2.0), (got, target)
    before = lab_stats([pale])
    assert np.abs(np.subtract(before.mean, target.mean)).max() > 5  # it had something to move
    assert (out[:40, :40] == 250).all()


def test_the_same_stain_is_left_nearly_as_it_is(tissue):
    s = lab_stats([tissue[0]])
    out = StainNormalizer(s, s, "same")(tissue[0])
    assert np.abs(out.astype(int) - tissue[0]).max() <= 2


def test_per_pixel_so_tiles_give_the_whole_images_answer(tissue):
    """Once the statistics are fixed the change is a function of the pixel alone: normalising tiles
    is normalising the image, so tiled prediction stays as invariant as without it."""
    img = _tinted(tissue[0])
    norm = normalizer_for(lab_stats([img]), {"train": lab_stats([tissue[1]])})
    whole = norm(img)
    tiles = np.stack([img[:128, :128], img[128:256, 64:192]])
    out = norm(tiles)
    assert np.array_equal(out[0], whole[:128, :128]) and np.array_equal(out[1], whole[128:256, 64:192])


def test_the_nearest_target_is_chosen(tissue):
    a, b = lab_stats([tissue[0]]), lab_stats([_tinted(tissue[0])])
    assert normalizer_for(a, {"pale": b, "dark": a}).target_name == "dark"
    assert normalizer_for(b, {"pale": b, "dark": a}).target_name == "pale"


def test_edited_stain_records_are_one_clear_error():
    good = LabStats((50.0, 20.0, -10.0), (15.0, 8.0, 8.0))
    assert LabStats.from_dict(good.to_dict()) == good
    for bad in [{"lab_mean": [1, 2], "lab_std": [1, 1, 1]}, {"lab_mean": "x"}, None,
                {"lab_mean": [1, 2, 3], "lab_std": [1, 0, 1]}, {"lab_mean": [1, 2, float("nan")], "lab_std": [1, 1, 1]}]:
        with pytest.raises(DataError, match="config.json"):
            LabStats.from_dict(bad)
    with pytest.raises(DataError, match="records no stain"):
        model_targets({})
    with pytest.raises(DataError, match="must map"):
        model_targets({"stain_targets": [1, 2]})
    norm = StainNormalizer(good, good, "x")
    assert StainNormalizer.from_dict(norm.to_dict()) == norm
    with pytest.raises(DataError, match="reinhard-lab"):
        StainNormalizer.from_dict({"method": "macenko"})


def test_glass_alone_has_no_stain_and_training_records_none():
    glass = np.full((64, 64, 3), 245, np.uint8)
    with pytest.raises(DataError, match="too little tissue"):
        lab_stats([glass], "glass.png")

    class It:
        image = glass

    assert training_stain([It()]) == {}


def test_the_wrapper_is_the_predictor_but_for_the_pixels(tissue):
    seen = []

    class Fake:
        mpp, num_classes = 0.5, 2

        def __call__(self, tiles):
            seen.append(tiles)
            return np.zeros((len(tiles), 2, *tiles.shape[1:3]), np.float32)

    fake = Fake()
    assert with_stain(fake, None) is fake
    s = lab_stats([tissue[0]])
    wrapped = with_stain(fake, StainNormalizer(s, lab_stats([tissue[1]]), "t").to_dict())
    assert isinstance(wrapped, StainedPredictor) and wrapped.mpp == 0.5 and wrapped.num_classes == 2
    wrapped(tissue[0][None, :64, :64])
    assert not np.array_equal(seen[0][0], tissue[0][:64, :64])


def test_bundled_models_record_their_training_stains():
    from conftest import require_bundled

    models = require_bundled("glands", "nuclei")
    for task, sets in {"glands": {"glas"}, "nuclei": {"monuseg", "consep"}}.items():
        cfg = json.loads((models[task] / "config.json").read_text())
        assert set(model_targets(cfg)) == sets


def test_fine_tuning_records_the_training_stain(tissue, tmp_path):
    from napari_genselfdiff.core.data import LabeledImage
    from napari_genselfdiff.core.train.training import FinetuneConfig, finetune
    from napari_genselfdiff.core.progress import run_to_end

    items = [LabeledImage(f"t{i}", im[:128, :128], (im[:128, :128].mean(-1) < 120).astype(np.uint8))
             for i, im in enumerate(tissue)]
    cfg = FinetuneConfig(task="nuclei", preset="tiny", steps=1, patch=64, batch=2, warmup=1, checkpoint_every=0,
                         val_every=0, tune_postprocess=False)
    run_to_end(finetune(items, tmp_path / "m", cfg, device="cpu"))
    recorded = model_targets(json.loads((tmp_path / "m" / "config.json").read_text()))
    want = lab_stats([it.image for it in items])
    assert list(recorded) == ["training"] and np.allclose(recorded["training"].mean, want.mean, atol=1e-3)


def test_cli_predict_records_the_stain_and_a_model_without_one_is_refused(tissue, tmp_path, capsys):
    """`predict --stain-normalize` on an image: the store records the normalisation (a resumed run must
    normalise alike), the prediction differs from the plain one; `evaluate --stain-normalize` says so;
    a model without a recorded stain is one line and exit code 2, before any work."""
    import tifffile
    from conftest import require_bundled

    from napari_genselfdiff.cli import main
    from napari_genselfdiff.slide.store import PredictionStore

    img = tmp_path / "pale.tif"
    tifffile.imwrite(img, _tinted(tissue[0]), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    args = ["predict", "--model", "nuclei", "--input", str(img), "--tile", "256", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "plain.zarr")]) == 0
    assert main(args + ["--out", str(tmp_path / "norm.zarr"), "--stain-normalize"]) == 0
    out = capsys.readouterr().out
    assert "stain: normalised to the model's" in out
    plain, norm = PredictionStore.open(tmp_path / "plain.zarr"), PredictionStore.open(tmp_path / "norm.zarr")
    assert "stain" not in plain.settings and norm.settings["stain"]["target_name"] in ("monuseg", "consep")
    assert not np.allclose(np.asarray(plain.probabilities[...]), np.asarray(norm.probabilities[...]), atol=0.02)
    # resuming the normalised store without the flag is another run's settings: refused
    assert main(args + ["--out", str(tmp_path / "norm.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norm.zarr" in err[0]

    # evaluate: the same option, said in the report
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    shutil.copy(img, tmp_path / "img" / "pale.tif")
    mask = (np.asarray(norm.probabilities[1]) > 0.5).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "msk" / "pale.tif", mask)
    assert main(["evaluate", "--model", "nuclei", "--images", str(tmp_path / "img"), "--masks",
                 str(tmp_path / "msk"), "--stain-normalize", "--device", "cpu"]) == 0
    assert "stain: normalised to the model's training stain" in capsys.readouterr().out

    old = tmp_path / "old_model"
    shutil.copytree(require_bundled("nuclei")["nuclei"], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["stain_targets"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert main(["predict", "--model", str(old), "--input", str(img), "--out", str(tmp_path / "x.zarr"),
                 "--stain-normalize", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "no stain" in err[0]
    assert not (tmp_path / "x.zarr").exists()


def test_a_slides_statistics_come_from_windows_over_its_tissue(slides_dir, monkeypatch):
    """A large level is sampled (windows over the tissue, never read whole); the sample's statistics
    are close to those of the whole level."""
    from napari_genselfdiff.slide import stain as S
    from napari_genselfdiff.slide.reader import open_slide

    with open_slide(slides_dir / "cmu_small_region.svs") as slide:
        level = len(slide.levels) - 1 if slide.levels[-1].shape[0] * slide.levels[-1].shape[1] > 1e5 else 0
        whole = S.slide_stats(slide, level)
        monkeypatch.setattr(S, "WHOLE_LEVEL_PIXELS", 1000)  # as if the level were large
        sampled = S.slide_stats(slide, level)
    assert sampled != whole
    assert np.allclose(sampled.mean, whole.mean, atol=4) and np.allclose(sampled.std, whole.std, atol=4)


def test_a_cluster_job_carries_the_stain(tissue, tmp_path):
    from conftest import require_bundled

    from napari_genselfdiff.core.inference import TorchPredictor
    from napari_genselfdiff.slide.distributed import plan_job
    from napari_genselfdiff.slide.reader import open_slide
    from napari_genselfdiff.slide.stain import slide_normalizer
    from napari_genselfdiff.slide.tiler import SlideSettings

    import tifffile

    img = tmp_path / "pale.tif"
    tifffile.imwrite(img, _tinted(tissue[0]), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    pred = TorchPredictor.from_checkpoint(require_bundled("nuclei")["nuclei"], device="cpu")
    with open_slide(img) as slide:
        norm = slide_normalizer(slide, pred, 0).to_dict()
        job = plan_job(pred, slide, tmp_path / "s.zarr", SlideSettings(tile=256, overlap=64, stain=norm))
    assert job.stain == norm
    from napari_genselfdiff.slide.store import PredictionStore

    assert PredictionStore.open(tmp_path / "s.zarr").settings["stain"] == norm
