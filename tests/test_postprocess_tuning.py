"""Objects from probabilities: the rules are the checkpoint's, tuned on validation images, applied
alike in memory and block by block; boundary targets from binary masks; test-time augmentation;
the weight average."""
import json

import numpy as np
import pytest
import torch
import zarr

from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.data import TaskSpec, mask_to_target, split_touching
from napari_genselfdiff.core.errors import CheckpointError
from napari_genselfdiff.core.eval.postprocess import OPTIONS, options_for, postprocess
from napari_genselfdiff.core.eval.tuning import instances_of_target, tune_postprocess
from napari_genselfdiff.core.inference import TorchPredictor
from napari_genselfdiff.core.nets.unet import UNet, UNetConfig, segmentation_config
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.training import FinetuneConfig, finetune
from napari_genselfdiff.slide.instances import iter_nuclei_blockwise

from _shapes import discs
from conftest import random_labeled

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_split_touching_separates_two_touching_discs_and_keeps_one_whole():
    two = discs((40, 60), [(20, 20), (20, 34)], 8)  # overlapping: one blob in a binary mask
    assert len(np.unique(two[two > 0])) == 2
    blob = two > 0
    from scipy import ndimage as ndi
    assert ndi.label(blob)[0].max() == 1
    split = split_touching(blob)
    assert split.max() == 2 and ((split > 0) == blob).all()
    one = split_touching(discs((40, 40), [(20, 20)], 9) > 0)
    assert one.max() == 1


def test_boundary_target_of_a_binary_mask_draws_the_line_between_touching_nuclei():
    blob = (discs((40, 60), [(20, 20), (20, 34)], 8) > 0).astype(np.uint8) * 255
    target = mask_to_target(blob, TaskSpec.make("nuclei", boundary=True))
    assert set(np.unique(target)) == {0, 1, 2}
    # the neck between the two discs (column ~27) is boundary, the discs' centres interior
    assert (target[14:26, 26:29] == 2).any()
    assert target[20, 20] == 1 and target[20, 34] == 1
    # and the two interiors are apart: recovered objects are two
    assert instances_of_target(target, "nuclei").max() == 2


def test_a_wider_boundary_class_peels_layers_but_leaves_small_nuclei_an_interior():
    lab = discs((48, 80), [(24, 20), (24, 56)], 9)
    lab[discs((48, 80), [(6, 70)], 2) > 0] = 3  # a nucleus about 3 px across
    one = mask_to_target(lab, TaskSpec.make("nuclei", boundary=True))
    three = mask_to_target(lab, TaskSpec.make("nuclei", boundary=True, boundary_width=3))
    assert ((one > 0) == (lab > 0)).all() and ((three > 0) == (lab > 0)).all()
    # the big discs' boundary is three pixels deep: about three times the one-pixel ring
    big = lab[:, :50] > 0
    ratio = (three[:, :50][big] == 2).sum() / (one[:, :50][big] == 2).sum()
    assert 2.4 < ratio < 3.2
    assert three[24, 20] == 1 and three[24, 11 + 2] == 2 and three[24, 11 + 3] == 1
    # every object keeps interior pixels, so each keeps a watershed marker
    for i in (1, 2, 3):
        assert (three[lab == i] == 1).any()
    assert TaskSpec.from_dict(TaskSpec.make("nuclei", True, boundary_width=3).to_dict()).boundary_width == 3
    assert TaskSpec.from_dict({"task": "nuclei", "num_classes": 3, "class_names": ["a", "b", "c"],
                               "boundary": True}).boundary_width == 1  # checkpoints before the option
    with pytest.raises(Exception, match="at least 1 pixel"):
        TaskSpec.make("nuclei", True, boundary_width=0)


def _three_class(lab):
    """Probabilities of a perfect 3-class model for instance labels ``lab``."""
    from skimage.segmentation import find_boundaries
    fg = lab > 0
    edge = find_boundaries(lab, mode="inner") & fg
    p = np.zeros((3,) + lab.shape, np.float32)
    p[0] = ~fg
    p[1] = fg & ~edge
    p[2] = edge
    return p


def test_postprocess_options_change_objects_and_unknown_options_are_refused():
    lab = discs((64, 64), [(20, 20), (44, 44)], 3)  # two small nuclei (~29 px each)
    probs = _three_class(lab)
    assert postprocess(probs, "nuclei")[1].max() == 2
    assert postprocess(probs, "nuclei", {"min_size": 40})[1].max() == 0
    with pytest.raises(ValueError, match="unknown nuclei post-processing option 'sigma'"):
        options_for("nuclei", {"sigma": 1})
    assert options_for("glands", {"threshold": "0.3"})["threshold"] == 0.3


def test_h_maxima_markers_split_touching_nuclei_the_boundary_class_missed():
    """Two nuclei whose interiors meet (the model drew their outline but not the line between
    them): interior markers give one object, ``split`` markers the two, with every pixel kept."""
    from skimage.segmentation import find_boundaries
    two = discs((40, 64), [(20, 22), (20, 36)], 9)
    blob = (two > 0).astype(np.int32)
    edge = find_boundaries(blob, mode="inner") & (blob > 0)
    p = np.zeros((3,) + blob.shape, np.float32)
    p[0], p[1], p[2] = blob == 0, (blob > 0) & ~edge, edge
    assert postprocess(p, "nuclei", {"min_size": 5})[1].max() == 1
    _, split = postprocess(p, "nuclei", {"min_size": 5, "split": 1.0})
    assert split.max() == 2 and ((split > 0) == (blob > 0)).all()
    # each recovered object sits over one of the true nuclei
    assert split[20, 18] != split[20, 40] and split[20, 18] > 0 and split[20, 40] > 0


@pytest.mark.parametrize("split", [0.0, 0.5])
def test_in_memory_and_blockwise_nuclei_agree_for_a_three_class_model(tmp_path, split):
    rng = np.random.default_rng(0)
    centres = [(int(y), int(x)) for y, x in rng.integers(8, 120, (25, 2))]
    lab = discs((128, 128), centres, 5)
    probs = _three_class(lab)
    probs = 0.8 * probs + 0.2 * rng.random(probs.shape).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    opts = {"threshold": 0.45, "marker_threshold": 0.55, "min_size": 6, "min_distance": 4, "split": split}
    _, whole = postprocess(probs, "nuclei", opts)
    out = zarr.zeros((128, 128), chunks=(32, 32), dtype="int32", store=zarr.storage.MemoryStore())
    drain(iter_nuclei_blockwise(probs[1], out, block=32, prob_boundary=probs[2], halo=24, **opts))
    blocks = np.asarray(out)
    assert whole.max() > 10
    # the same partition (ids may differ): every object of one is one object of the other
    from napari_genselfdiff.slide.instances import compare_partitions
    assert compare_partitions(whole, blocks).identical


def test_tuning_finds_the_threshold_that_recovers_the_objects():
    lab = discs((64, 96), [(20, 20), (20, 60), (45, 40)], 7)
    p = np.zeros((2,) + lab.shape, np.float32)
    p[1] = np.where(lab > 0, 0.45, 0.05)  # an under-confident model: 0.5 finds nothing
    p[0] = 1 - p[1]
    assert postprocess(p, "glands")[1].max() == 0
    options, report = tune_postprocess("glands", [p], [lab])
    assert options["threshold"] < 0.45
    assert postprocess(p, "glands", options)[1].max() == 3
    assert report["best"] > report["default"]


def test_pixel_sizes_follow_the_model_resolution_in_defaults_and_in_the_tuning_grid():
    """A nucleus model at 0.25 um/px (twice the bundled one's pixels per micron) drops objects
    under the same area in um^2: its default and searched min_size are 4x, min_distance 2x."""
    from napari_genselfdiff.core.eval.tuning import GRIDS, grid_at

    assert options_for("nuclei", None, 0.5) == options_for("nuclei")
    fine = options_for("nuclei", None, 0.25)
    assert fine["min_size"] == 4 * OPTIONS["nuclei"]["min_size"]
    assert fine["min_distance"] == 2 * OPTIONS["nuclei"]["min_distance"]
    assert fine["threshold"] == OPTIONS["nuclei"]["threshold"]  # not a size: unchanged
    assert options_for("nuclei", {"min_size": 7}, 0.25)["min_size"] == 7  # stored options are already in pixels
    assert grid_at("nuclei", 0.25)["min_size"] == tuple(4 * v for v in GRIDS["nuclei"]["min_size"])
    assert grid_at("glands", 2.48)["min_size"] == tuple(max(1, round(v / 4)) for v in GRIDS["glands"]["min_size"])
    # a 6-pixel nucleus at 0.25 um/px is under the smallest area searched there, kept at 0.5 um/px
    lab = np.zeros((40, 40), np.int32)
    lab[10:12, 10:13] = 1
    lab[20:32, 20:32] = 2
    p = np.zeros((3,) + lab.shape, np.float32)
    p[1] = np.where(lab > 0, 0.9, 0.05)
    p[0] = 1 - p[1]
    _, report = tune_postprocess("nuclei", [p], [lab], mpp=0.25)
    assert min(report["grid"]["min_size"]) > 6
    options, _ = tune_postprocess("nuclei", [p], [lab], mpp=0.5)
    assert min(GRIDS["nuclei"]["min_size"]) <= 6 and options["min_distance"] == OPTIONS["nuclei"]["min_distance"]


_tiny_items = random_labeled


FT = FinetuneConfig(preset="tiny", steps=4, patch=32, batch=2, lr=1e-3, warmup=1, checkpoint_every=0, val_every=0)


def test_finetune_stores_tuned_options_and_the_predictor_applies_them(tmp_path):
    items = _tiny_items()
    drain(finetune(items[:2], tmp_path / "m", FT, val_items=items[2:], device="cpu"))
    cfg = ck.load_config(tmp_path / "m")
    assert set(cfg["postprocess"]) == set(OPTIONS["glands"])
    assert cfg["postprocess_tuning"]["n_images"] == 1
    pred = TorchPredictor.from_checkpoint(tmp_path / "m", device="cpu")
    assert pred.postprocess_options == options_for("glands", cfg["postprocess"])
    # without validation images there is nothing to tune on: the defaults
    drain(finetune(items[:2], tmp_path / "n", FT, device="cpu"))
    assert "postprocess" not in ck.load_config(tmp_path / "n")


def test_a_checkpoint_with_bad_postprocess_settings_is_one_clear_error(tmp_path):
    items = _tiny_items()
    drain(finetune(items[:2], tmp_path / "m", FT, device="cpu"))
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["postprocess"] = {"treshold": 0.3}
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="postprocess settings are invalid.*treshold"):
        TorchPredictor.from_checkpoint(tmp_path / "m", device="cpu")


def _predictor(tta):
    torch.manual_seed(0)
    net = UNet(segmentation_config(UNetConfig.from_preset("tiny", in_channels=3, out_channels=3), 2)).eval()
    cfg = {"kind": "segmentation", "model": net.config.to_dict(), "task": TaskSpec.make("glands").to_dict()}
    return TorchPredictor(net, cfg, "cpu", tta=tta)


def test_eight_view_tta_is_equivariant_to_flips_and_turns_one_view_is_not():
    x = np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    turned = np.ascontiguousarray(np.rot90(x, 1, (1, 2)))
    flipped = np.ascontiguousarray(x[:, :, ::-1])
    plain, tta = _predictor(1), _predictor(8)
    for views, back in ((turned, lambda p: np.rot90(p, -1, (2, 3))), (flipped, lambda p: p[:, :, :, ::-1])):
        np.testing.assert_allclose(back(tta(views)), tta(x), atol=1e-5)
        assert np.abs(back(plain(views)) - plain(x)).max() > 1e-4
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        _predictor(3)


def test_ema_saves_the_averaged_weights_and_training_keeps_its_own(tmp_path):
    items = _tiny_items()
    drain(finetune(items, tmp_path / "plain", FT, device="cpu"))
    drain(finetune(items, tmp_path / "ema", FinetuneConfig(**{**FT.__dict__, "ema": 0.9}), device="cpu"))
    a, b = ck.load_weights(tmp_path / "plain"), ck.load_weights(tmp_path / "ema")
    conv = next(k for k in a if k.endswith("weight") and a[k].ndim == 4)
    # same seed, same batches: the raw weights would be equal; the average is not
    assert not torch.allclose(a[conv], b[conv])


def test_cli_tta_flag_is_checked(tmp_path, capsys):
    from napari_genselfdiff.cli import main
    code = main(["evaluate", "--model", "nuclei", "--images", str(tmp_path), "--masks", str(tmp_path),
                 "--tta", "3"])
    assert code == 2
    assert "--tta" in capsys.readouterr().err


def test_h_maxima_object_by_object_equals_the_whole_map():
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima

    from napari_genselfdiff.core.eval.postprocess import h_maxima_by_object

    rng = np.random.default_rng(3)
    lab = discs((120, 160), [(30, 30), (30, 44), (80, 100), (90, 40), (100, 140)], 9)
    lab[5:9, 150:154] = 9  # an object lower than h: no marker
    fg = lab > 0
    score = ndi.distance_transform_edt(fg) * np.where(fg, rng.uniform(0.5, 1.5, fg.shape), 0)
    for h in (0.5, 1.0, 3.0):
        ours = h_maxima_by_object(score, h)
        assert ours.any() and (ours == h_maxima(score, h)).all()
    assert not h_maxima_by_object(score, 3.0)[5:9, 150:154].any()  # at most 2 px deep x 1.5 < 3
    assert not h_maxima_by_object(np.zeros((8, 8)), 1.0).any()


def _h_maxima_each_object(score, h):
    """The definition: skimage's h_maxima of each object alone, surrounded by zeros."""
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima

    objects, _ = ndi.label(score > 0, structure=np.ones((3, 3), bool))
    out = np.zeros(score.shape, np.uint8)
    for i, box in enumerate(ndi.find_objects(objects), 1):
        own = objects[box] == i
        sub = np.where(own, score[box], 0.0)
        if sub.max() >= h:
            out[box] |= h_maxima(np.pad(sub, 1), h)[1:-1, 1:-1].astype(np.uint8) & own
    return out


def test_h_maxima_by_flooding_equals_skimage_on_maps_with_many_maxima():
    """Smooth random maps (many regional maxima per object, plateaus where clipped, objects
    touching the border) and a real nuclei score: the flooding gives skimage's markers, object by
    object and, where no object is lower than h, on the whole map."""
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima

    from napari_genselfdiff.core.eval.postprocess import h_maxima_by_object

    rng = np.random.default_rng(0)
    kept = 0
    for trial in range(12):
        raw = ndi.gaussian_filter(rng.normal(size=(96, 128)), rng.uniform(1, 4))
        score = np.clip(raw * 10 + rng.uniform(-1, 1), 0, None)
        score[score > np.quantile(score, 0.98)] = np.quantile(score, 0.98)  # plateaus
        for h in (0.2, 1.0, 3.0):
            ours = h_maxima_by_object(score, h)
            np.testing.assert_array_equal(ours, _h_maxima_each_object(score, h), err_msg=f"{trial} {h}")
            kept += int(ours.sum())
    assert kept > 100
    lab = discs((120, 160), [(30, 30), (30, 44), (80, 100), (90, 40), (100, 140)], 9)
    score = ndi.distance_transform_edt(lab > 0) * (1 + 0.3 * np.sin(np.arange(160) / 3))[None, :]
    np.testing.assert_array_equal(h_maxima_by_object(score, 0.5), h_maxima(score, 0.5))
