"""Tiling cannot change the answer: the bundled (trained, tile-invariant) models on real tissue,
256-px tiles with the model's default overlap against the same tile predicted in one piece."""
import numpy as np
import pytest

from napari_genselfdiff.bundled import resolve_model
from napari_genselfdiff.core.data import read_image
from napari_genselfdiff.core.inference import TorchPredictor, predict_image
from napari_genselfdiff.core.resolution import Rescale, resize_image
from napari_genselfdiff.slide.consistency import compare

# (model, dataset folder, the dataset's microns per pixel, tiles to check)
CASES = [("nuclei", "monuseg/train/images", 0.25, 2), ("glands", "glas/train/images", 0.62, 6)]


def _at_model_resolution(path, mpp, predictor):
    img = read_image(path)
    return resize_image(img, Rescale(img.shape[:2], mpp, predictor.mpp).model_shape)


@pytest.mark.parametrize("model,folder,mpp,n", CASES)
def test_bundled_model_tiled_equals_whole(one_torch_thread, shared_data, model, folder, mpp, n):
    predictor = TorchPredictor.from_checkpoint(resolve_model(model), device="cpu")
    assert predictor.model.config.tile_invariant, "the bundled model must be the tile-invariant network"
    files = sorted((shared_data / folder).iterdir())[:n]
    whole_objects = tiled_objects = 0
    worst = 0.0
    for f in files:
        img = _at_model_resolution(f, mpp, predictor)
        whole = predict_image(predictor, img)
        d = compare(predictor, img, tile=256, overlap=predictor.overlap, whole=whole)
        worst = max(worst, d.max_abs)
        whole_objects += d.objects_whole
        tiled_objects += d.objects_tiled
    assert worst <= 0.02, f"{model}: tiling changed a probability by {worst:.4f}"
    assert whole_objects > 10
    assert abs(tiled_objects - whole_objects) <= 0.005 * whole_objects + 1, (whole_objects, tiled_objects)


def test_too_small_an_overlap_does_change_the_answer(one_torch_thread, monuseg_dir):
    """The check above can fail: with a tiny overlap the same model's tiles disagree visibly."""
    predictor = TorchPredictor.from_checkpoint(resolve_model("nuclei"), device="cpu")
    f = sorted((monuseg_dir / "images").iterdir())[0]
    img = _at_model_resolution(f, 0.25, predictor)
    d = compare(predictor, img, tile=256, overlap=8, whole=np.asarray(predict_image(predictor, img)))
    assert d.max_abs > 0.05


def test_cpu_forward_takes_tiles_one_at_a_time_and_the_answer_does_not_depend_on_it(one_torch_thread):
    import torch

    calls = []
    pred = TorchPredictor.from_checkpoint(resolve_model("nuclei"), device="cpu", batch_size=4)
    assert pred.batch_size == 4 and pred.forward_tiles == 1  # a CPU: one tile per forward pass
    tiles = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    hook = pred.network.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    one_by_one = pred(tiles)
    hook.remove()
    assert calls == [1, 1, 1] and one_by_one.shape == (3, 3, 64, 64)
    pred.forward_tiles = 3  # all at once, as on a GPU: the same probabilities
    together = pred(tiles)
    assert np.abs(together - one_by_one).max() < 1e-4
    assert TorchPredictor(pred.model, pred.config, torch.device("cpu"), batch_size=8).forward_tiles == 1
