"""Nuclei models that also learn a distance map: its targets, loss, outputs, the watershed's
markers from it, its tuning, and training one end to end."""
import numpy as np
import pytest
import torch

from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.data import LabeledImage, TaskSpec, distance_target, mask_to_target
from napari_genselfdiff.core.errors import DataError  # noqa: F401
from napari_genselfdiff.core.eval.postprocess import postprocess
from napari_genselfdiff.core.eval.tuning import tune_postprocess
from napari_genselfdiff.core.inference import TorchPredictor, as_probabilities, predict_image
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.losses import build_loss, distance_loss
from napari_genselfdiff.core.train.training import FinetuneConfig, finetune

from _shapes import discs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = TaskSpec.make("nuclei", boundary=True, distance=True)


def test_the_task_records_its_distance_map_and_refuses_it_without_a_boundary_class():
    assert SPEC.num_classes == 3 and SPEC.out_channels == 4
    assert SPEC.channel_names == ("background", "nucleus", "boundary", "distance")
    assert TaskSpec.from_dict(SPEC.to_dict()) == SPEC
    plain = TaskSpec.make("nuclei", boundary=True)
    assert plain.out_channels == 3 and "distance" not in plain.to_dict()
    for task, boundary in (("nuclei", False), ("glands", False)):
        with pytest.raises(DataError, match="boundary class"):
            TaskSpec.make(task, boundary=boundary, distance=True)


def test_distance_target_peaks_once_per_nucleus_and_dips_where_two_touch():
    lab = discs((40, 64), [(20, 22), (20, 36), (8, 56)], 7)
    target = mask_to_target(lab, SPEC)
    d = distance_target(target)
    assert d.shape == lab.shape and d.dtype == np.float32
    assert (d[lab == 0] == 0).all() and (d[lab > 0] > 0).all() and d.max() == 1.0
    for i in (1, 2, 3):
        assert d[lab == i].max() == pytest.approx(1.0)  # each nucleus on its own scale
    assert d[20, 22] == 1.0 and d[20, 36] == 1.0
    assert d[20, 29] < 0.5  # the seam between the two touching ones is a valley
    # a batch is the images one by one
    both = distance_target(np.stack([target, target[::-1]]))
    np.testing.assert_array_equal(both[0], d)
    np.testing.assert_array_equal(both[1], d[::-1])


def test_the_loss_reads_the_classes_and_adds_the_distance_term():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=g)
    target = torch.randint(0, 3, (2, 16, 16), generator=g)
    dist = torch.rand(2, 16, 16, generator=g)
    plain = build_loss("focal+dice")
    loss = build_loss("focal+dice", num_classes=3)
    assert loss(logits, target).item() == pytest.approx(plain(logits[:, :3], target).item(), rel=1e-6)
    want = plain(logits[:, :3], target) + torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 3], dist)
    assert loss(logits, target, dist).item() == pytest.approx(want.item(), rel=1e-6)
    assert distance_loss(logits[:, 3], dist).item() > distance_loss(torch.logit(dist.clamp(0.01, 0.99)), dist).item()


def test_probabilities_are_a_softmax_over_the_classes_and_a_sigmoid_after_them():
    logits = torch.randn(1, 4, 8, 8)
    p = as_probabilities(logits, 3)
    torch.testing.assert_close(p[:, :3].sum(1), torch.ones(1, 8, 8))
    torch.testing.assert_close(p[:, 3], logits[:, 3].sigmoid())
    torch.testing.assert_close(as_probabilities(logits[:, :3], 3), logits[:, :3].softmax(1))


def _merged_prediction():
    """A model that drew two touching nuclei as one blob with no line between them, and a
    distance map that still has one peak in each."""
    lab = discs((40, 64), [(20, 22), (20, 36)], 9)
    blob = lab > 0
    p = np.zeros((4,) + lab.shape, np.float32)
    p[0], p[1] = ~blob, blob
    p[3] = distance_target(mask_to_target(lab, SPEC))
    return lab, p


def test_markers_from_the_distance_map_split_what_the_classes_merged():
    lab, p = _merged_prediction()
    semantic, without = postprocess(p[:3], "nuclei", {"min_size": 5})
    assert without.max() == 1
    semantic4, inst = postprocess(p, "nuclei", {"min_size": 5, "distance_h": 0.1})
    np.testing.assert_array_equal(semantic4, semantic)  # the map is not a class
    assert semantic4.max() <= 2
    assert inst.max() == 2 and ((inst > 0) == (lab > 0)).all()
    assert inst[20, 18] != inst[20, 40]
    # a marker height above the lower peak's rise over the seam keeps the higher peak only
    p[3][lab == 2] *= 0.9
    assert postprocess(p, "nuclei", {"min_size": 5, "distance_h": 0.3})[1].max() == 2
    assert postprocess(p, "nuclei", {"min_size": 5, "distance_h": 0.85})[1].max() == 1


def test_tuning_a_distance_model_searches_the_marker_height_only():
    lab, p = _merged_prediction()
    options, report = tune_postprocess("nuclei", [p], [lab])
    assert options["distance_h"] in (0.05, 0.1, 0.2, 0.3)
    assert postprocess(p, "nuclei", options)[1].max() == 2
    assert (options["split"], options["marker_threshold"]) == (0.0, 0.4)  # not read with a map: never varied
    # a model without the map never varies distance_h
    options3, _ = tune_postprocess("nuclei", [p[:3]], [lab])
    assert options3["distance_h"] == 0.05


def _nuclei_items(n=3, size=48):
    rng = np.random.default_rng(2)
    items = []
    for i in range(n):
        lab = discs((size, size), [tuple(c) for c in rng.integers(6, size - 6, (6, 2))], 5)
        img = np.where(lab[..., None] > 0, 60, 220).astype(np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        items.append(LabeledImage(f"n{i}", img, mask_to_target(lab, SPEC)))
    return items


def test_a_distance_model_trains_saves_and_predicts_four_channels(tmp_path):
    items = _nuclei_items()
    cfg = FinetuneConfig(task="nuclei", boundary=True, distance=True, preset="tiny", steps=3, patch=32, batch=2,
                         lr=1e-3, warmup=1, checkpoint_every=0, val_every=0)
    drain(finetune(items[:2], tmp_path / "m", cfg, val_items=items[2:], device="cpu"))
    saved = ck.load_config(tmp_path / "m")
    assert saved["task"]["distance"] is True and saved["model"]["out_channels"] == 4
    assert "distance_h" in saved["postprocess"]
    pred = TorchPredictor.from_checkpoint(tmp_path / "m", device="cpu")
    assert (pred.num_classes, pred.channels) == (3, 4) and pred.channel_names[-1] == "distance"
    out = predict_image(pred, items[0].image)
    assert out.shape == (4, 48, 48)
    np.testing.assert_allclose(out[:3].sum(0), 1.0, atol=1e-5)
    assert ((out[3] > 0) & (out[3] < 1)).all()
    # continuing it (a refine) keeps the map: all weights, four outputs
    drain(finetune(items[:2], tmp_path / "r", cfg, init=tmp_path / "m", device="cpu"))
    assert ck.load_config(tmp_path / "r")["model"]["out_channels"] == 4


def test_a_project_refine_keeps_the_distance_map_of_its_base_model(tmp_path):
    from napari_genselfdiff.project.refine import refine_config
    from napari_genselfdiff.project.store import Project

    items = _nuclei_items(2)
    cfg = FinetuneConfig(task="nuclei", boundary=True, distance=True, preset="tiny", steps=1, patch=32, batch=2,
                         lr=1e-3, warmup=1, checkpoint_every=0, val_every=0, tune_postprocess=False)
    drain(finetune(items, tmp_path / "base", cfg, device="cpu"))
    plain = FinetuneConfig(**{**cfg.__dict__, "distance": False})
    drain(finetune(items, tmp_path / "plain", plain, device="cpu"))
    proj = Project.create(tmp_path / "proj", task="nuclei", boundary=True, model=tmp_path / "base")
    assert refine_config(proj, 5, 0, {}, None).distance is True
    assert refine_config(proj, 5, 0, {}, tmp_path / "plain").distance is False
