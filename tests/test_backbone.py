"""One network from pretext to segmentation (the ``backbone`` preset, per-pixel LayerNorm): the
pretext's every tensor reaches the segmenter unchanged, nothing depends on the tile or the batch,
the frozen-backbone fine-tuning trains the head alone, and the shipped backbone is a starting point,
not a model to predict with."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.data import TaskSpec
from napari_genselfdiff.core.train.segmenter import HEAD_MODULES, build_segmentation_model, freeze_backbone
from napari_genselfdiff.core.nets.unet import (LayerNorm2d, UNet, UNetConfig, fused_for_inference, seeded_model,
                                               segmentation_config)
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.training import FinetuneConfig, PretrainConfig, finetune, pretrain

from conftest import random_labeled, random_sources  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_sources, _labeled = random_sources, random_labeled


def _random_affine(model: torch.nn.Module) -> None:
    """Norm layers with weights and biases away from 1 / 0, so folding them is tested for real."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (LayerNorm2d, torch.nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


@pytest.fixture(scope="module", params=["backbone", "s2d-backbone"])
def backbone_run(tmp_path_factory, request):
    """A toy pretraining of each one-network preset (s2d-backbone: no level at full resolution)."""
    out = tmp_path_factory.mktemp("bb") / "pretrained"
    cfg = PretrainConfig(preset=request.param, steps=4, patch=32, batch=2, lr=1e-3, warmup=1, checkpoint_every=0)
    drain(pretrain(_sources(), out, cfg, device="cpu"))
    return out


def test_layer_norm_is_per_pixel():
    ln = LayerNorm2d(8)
    x = torch.randn(2, 8, 20, 20)
    torch.testing.assert_close(ln(x)[:, :, 5:9, 3:11], ln(x[:, :, 5:9, 3:11]))
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


def test_backbone_answer_does_not_depend_on_the_batch_even_while_training():
    """BatchNorm mixes the images of a batch while training (so a pretext's features change when
    moved to inference); the per-pixel network does not."""
    x = torch.randn(3, 3, 32, 32)
    one = seeded_model(UNetConfig.from_preset("backbone"), 0).train()
    torch.testing.assert_close(one(x)[:1], one(x[:1]), rtol=1e-5, atol=1e-5)
    bn = seeded_model(segmentation_config(UNetConfig.from_preset("tiny"), 3), 0).train()
    assert (bn(x)[:1] - bn(x[:1])).abs().max() > 1e-3  # the property the test checks is real


@pytest.mark.parametrize("preset", ["backbone", "s2d-backbone"])
def test_backbone_is_its_own_segmentation_network_and_tile_invariant(preset):
    cfg = UNetConfig.from_preset(preset)
    seg = segmentation_config(cfg, 3)
    assert seg == cfg.with_outputs(3) and seg.norm == "layer" and seg.tile_invariant and cfg.tile_invariant
    assert segmentation_config(UNetConfig.from_preset("tiny"), 3).norm == "batch"  # GroupNorm -> BatchNorm as before


def test_fused_layer_norm_network_computes_the_same_function():
    model = UNet(segmentation_config(UNetConfig.from_preset("backbone"), 3)).eval()
    _random_affine(model)
    x = torch.randn(2, 3, 64, 64)
    fused = fused_for_inference(model)
    assert fused is not model
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_every_pretrained_tensor_reaches_the_segmenter_unchanged(backbone_run):
    model, info, how = build_segmentation_model(TaskSpec.make("nuclei", boundary=True), backbone_run, "tiny", seed=3)
    pre = ck.load_weights(backbone_run)
    own = model.state_dict()
    assert model.config.norm == "layer"
    body = [k for k in own if not k.startswith("final_conv.")]
    assert set(body) == set(pre) - {"final_conv.weight", "final_conv.bias"}  # nothing unused, nothing initialised
    for k in body:
        assert torch.equal(own[k], pre[k]), k
    assert own["final_conv.weight"].shape[0] == 3 * model.config.stem_factor ** 2  # s2d: 2x2 positions each


def test_frozen_backbone_trains_the_head_alone(backbone_run, tmp_path):
    cfg = FinetuneConfig(steps=4, patch=32, batch=2, lr=1e-2, warmup=1, checkpoint_every=0, val_every=0,
                         freeze_backbone=True)
    events = list(finetune(_labeled(), tmp_path / "ft", cfg, init=backbone_run, device="cpu"))
    assert events[-1].done and any("backbone frozen" in (e.message or "") for e in events)
    pre, ft = ck.load_weights(backbone_run), ck.load_weights(tmp_path / "ft")
    head = [k for k in ft if k.split(".", 1)[0] in HEAD_MODULES and k != "final_conv.weight" and k != "final_conv.bias"]
    assert head and any(not torch.equal(ft[k], pre[k]) for k in head)  # the head learned
    for k in ft:
        if k.split(".", 1)[0] not in HEAD_MODULES:
            assert torch.equal(ft[k], pre[k]), k  # the backbone did not move


def test_freeze_backbone_counts_what_it_leaves_to_train():
    model = seeded_model(segmentation_config(UNetConfig.from_preset("backbone"), 2), 0)
    n = freeze_backbone(model)
    assert 0 < n < sum(p.numel() for p in model.parameters()) / 4
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_shipped_backbone_is_a_starting_point_not_a_prediction_model(tmp_path):
    from conftest import require_bundled

    from napari_genselfdiff.bundled import BACKBONE, bundled_backbone, bundled_models, resolve_model

    require_bundled("glands", "nuclei")
    path = bundled_backbone()
    assert path is not None, "resources/models/pretrained is missing"
    assert BACKBONE not in bundled_models()
    assert resolve_model(BACKBONE) == path
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["kind"] == "pretrain" and UNetConfig.from_dict(cfg["model"]).norm == "layer"
    assert (path / "MODEL_CARD.md").is_file()
    assert sum(f.stat().st_size for f in path.iterdir()) < 5 * 2**20


def test_cli_finetunes_from_the_shipped_backbone(tmp_path):
    import imageio.v3 as iio

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for it in _labeled(2, 64):
        iio.imwrite(tmp_path / "img" / f"{it.name}.png", it.image)
        iio.imwrite(tmp_path / "msk" / f"{it.name}.png", (it.target * 255).astype(np.uint8))
    cmd = [sys.executable, "-m", "napari_genselfdiff.cli", "finetune", "--images", str(tmp_path / "img"),
           "--masks", str(tmp_path / "msk"), "--init", "pretrained", "--freeze-backbone", "--steps", "2",
           "--patch", "32", "--batch", "2", "--out", str(tmp_path / "out"), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["training"]["init_info"]["init_kind"] == "pretrain"
    assert cfg["model"]["norm"] == "layer"
    r = subprocess.run(cmd[:cmd.index("--init")] + ["--freeze-backbone", "--scratch", "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--freeze-backbone needs --init" in r.stderr


def test_a_segmenter_fine_tuned_from_the_shipped_backbone_cannot_be_changed_by_tiling(monuseg_dir, tmp_path):
    """The one network keeps the tiling guarantee: 256-px tiles with the model's overlap against
    the same image in one piece, on real tissue, <= 0.02 in probability."""
    from conftest import require_bundled

    from napari_genselfdiff.bundled import bundled_backbone
    from napari_genselfdiff.core.data import TaskSpec, downscale_item, load_labeled_folder
    from napari_genselfdiff.core.inference import TorchPredictor, predict_image
    from napari_genselfdiff.slide.consistency import compare

    require_bundled("glands", "nuclei")
    items = load_labeled_folder(monuseg_dir / "images", monuseg_dir / "masks", TaskSpec.make("nuclei"))[:2]
    items = [downscale_item(it, 2.0) for it in items]  # 0.5 µm/px, the backbone's nuclei resolution
    cfg = FinetuneConfig(task="nuclei", steps=20, patch=128, batch=4, lr=1e-3, warmup=2, checkpoint_every=0,
                         val_every=0, mpp=0.5, tune_postprocess=False)
    drain(finetune(items, tmp_path / "nuc", cfg, init=bundled_backbone(), device="cpu"))
    predictor = TorchPredictor.from_checkpoint(tmp_path / "nuc", device="cpu")
    assert predictor.model.config.tile_invariant and predictor.model.config.norm == "layer"
    img = items[0].image
    d = compare(predictor, img, tile=256, overlap=predictor.overlap, whole=predict_image(predictor, img))
    assert d.max_abs <= 0.02, d


def test_feature_t_is_one_constant_timestep_folded_like_t0():
    """A segmenter told it sees timestep feature_t: the same as passing t explicitly, folded at
    inference, stored with the architecture, bounded."""
    cfg = UNetConfig.from_preset("backbone", feature_t=100)
    model = UNet(segmentation_config(cfg, 2)).eval()
    assert model.config.feature_t == 100
    _random_affine(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        told = model(x)
        torch.testing.assert_close(told, model(x, torch.full((1,), 100.0)))
        assert (told - model(x, torch.zeros(1))).abs().max() > 1e-4  # t matters
        torch.testing.assert_close(fused_for_inference(model)(x), told, rtol=1e-4, atol=1e-4)
    assert UNetConfig.from_dict(model.config.to_dict()).feature_t == 100
    assert UNetConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k != "feature_t"}).feature_t == 0
    for bad in (-1, 10**6, 2.5, True):
        with pytest.raises(ValueError, match="feature_t"):
            UNetConfig(feature_t=bad)


def test_finetune_with_feature_t_records_it(backbone_run, tmp_path):
    cfg = FinetuneConfig(steps=2, patch=32, batch=2, lr=1e-3, warmup=1, checkpoint_every=0, val_every=0,
                         freeze_backbone=True, feature_t=50)
    drain(finetune(_labeled(), tmp_path / "ft", cfg, init=backbone_run, device="cpu"))
    model, _ = ck.load_model(tmp_path / "ft")
    assert model.config.feature_t == 50
