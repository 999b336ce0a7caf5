"""The nucleus-aware pretext (core.pretext.pseudomask, core.pretext.translation,
core.train.pretext_nucleus): pseudo-mask statistics, network shapes, each loss finite and falling
on real tiles, exact resume after a cancel, the checkpoint's pretext, the transfer into the
segmentation U-Net, the sample grid."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_genselfdiff.core import checkpoint as ckpt
from napari_genselfdiff.core.data import ImageSource, TaskSpec, read_image, to_model_input
from napari_genselfdiff.core.errors import CheckpointError
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.pretext_nucleus import (NucleusPretrainConfig, _GanTrainer, _seeded_nets,
                                                           nucleus_samples, pretrain_nucleus)
from napari_genselfdiff.core.pretext.pseudomask import (ORIENTATION_BINS, NucleusStats, draw_batch, draw_instances,
                                                        instance_target, mask_image, measure_nuclei)
from napari_genselfdiff.core.pretext.translation import (LossWeights, TranslationConfig, discriminator_loss,
                                                         generator_losses, soft_mask, translator_config)

PATCH = 32
STATS = NucleusStats(log_area_mean=math.log(40), log_area_std=0.3, density_mean=25, density_std=6)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _props(inst):
    from skimage.measure import regionprops
    h, w = inst.shape
    return [p for p in regionprops(inst)
            if p.bbox[0] > 0 and p.bbox[1] > 0 and p.bbox[2] < h and p.bbox[3] < w]


def test_drawn_masks_have_the_statistics_asked_for():
    hist = np.full(ORIENTATION_BINS, 0.02)
    hist[3] = 1 - 0.02 * (ORIENTATION_BINS - 1)  # most nuclei turned about -0.92 rad
    want = NucleusStats(log_area_mean=math.log(150), log_area_std=0.25, log_ratio_mean=0.5, log_ratio_std=0.1,
                        orientation_hist=tuple(hist), density_mean=12, density_std=4)
    rng = np.random.default_rng(1)
    masks = [draw_instances(want, 128, rng) for _ in range(60)]
    counts = np.array([m.max() for m in masks]) / 128 ** 2 * 1e4
    props = [p for m in masks for p in _props(m)]
    log_area = np.log([p.area for p in props])
    log_ratio = np.log([p.axis_major_length / p.axis_minor_length for p in props])
    angles = np.array([p.orientation for p in props])
    assert abs(counts.mean() - 12) < 1.5  # nuclei per 10,000 px
    assert 2.5 < counts.std() < 6
    assert abs(np.median(log_area) - math.log(150)) < 0.1  # light overlaps take a few pixels
    assert abs(np.median(log_ratio) - 0.5) < 0.1
    lo = -np.pi / 2 + 3 * np.pi / ORIENTATION_BINS
    assert np.mean((angles >= lo - 0.1) & (angles < lo + np.pi / ORIENTATION_BINS + 0.1)) > 0.75
    # instances are distinct, lightly touching at most, and their targets / images agree
    m = masks[0]
    assert set(np.unique(m)) == set(range(m.max() + 1))
    t, img = instance_target(m), mask_image(m)
    assert img.shape == (3, 128, 128) and img.min() >= -1 and img.max() <= 1
    assert np.array_equal(t > 0, img[0] > 0) and np.array_equal(t == 2, img[1] > 0)


def test_measured_statistics_recover_synthetic_nuclei():
    """Purple ellipses drawn from known statistics on pink: the colour-deconvolution measurement
    finds about that area and density."""
    rng = np.random.default_rng(2)
    want = NucleusStats(log_area_mean=math.log(120), log_area_std=0.2, density_mean=15, density_std=3)
    tiles = []
    for _ in range(6):
        inst = draw_instances(want, 96, rng, max_overlap=0.0)
        tile = np.empty((96, 96, 3), np.uint8)
        tile[:] = (235, 170, 200)
        tile[inst > 0] = (80, 50, 140)
        tiles.append(tile)
    got = measure_nuclei(tiles)
    assert abs(got.log_area_mean - math.log(120)) < 0.25
    assert abs(got.density_mean - 15) < 4
    assert got.n_tiles == 6 and got.n_nuclei >= 20


@pytest.mark.parametrize("preset", ["tiny", "s2d", "backbone"])
def test_network_shapes(preset):
    """Every U-Net preset gets a translation setup (s2d and backbone: their own base width)."""
    tcfg = TranslationConfig.from_preset(preset)
    nets = _seeded_nets(translator_config(preset), tcfg, 0)
    x = torch.rand(2, 3, PATCH, PATCH) * 2 - 1
    masks, targets, _ = draw_batch(STATS, np.random.default_rng(0), 2, PATCH)
    m = torch.from_numpy(masks)
    fake = nets.generator(m, torch.randn(2, tcfg.style_dim))
    assert fake.shape == (2, 3, PATCH, PATCH) and fake.abs().max() <= 1
    out = nets.translator(x)
    assert out.shape == (2, 4, PATCH, PATCH)
    assert soft_mask(out).shape == (2, 3, PATCH, PATCH)
    mu, logvar = nets.style(x)
    assert mu.shape == logvar.shape == (2, tcfg.style_dim)
    score = nets.d_he(x)
    assert score.shape[:2] == (2, 1) and score.shape[-1] < PATCH // 2
    assert nets.d_mask(m).shape == score.shape
    # two styles, one mask: two different stainings
    other = nets.generator(m, torch.randn(2, tcfg.style_dim))
    assert (fake - other).abs().mean() > 1e-3
    assert nets.translator.config.tile_invariant


def _real_tiles(monuseg_dir, n=2):
    paths = sorted((monuseg_dir / "images").glob("*.png"))[:n]
    return np.stack([read_image(p)[100:100 + PATCH, 200:200 + PATCH] for p in paths])


def test_each_loss_is_finite_and_falls_on_real_tiles(monuseg_dir):
    he = torch.from_numpy(to_model_input(_real_tiles(monuseg_dir)))
    masks, targets, _ = draw_batch(STATS, np.random.default_rng(3), 2, PATCH)
    m, t = torch.from_numpy(masks), torch.from_numpy(targets)
    nets = _seeded_nets(translator_config("tiny"), TranslationConfig.from_preset("tiny"), 0)
    trainer = _GanTrainer(nets, torch.device("cpu"), 2e-3, False, LossWeights())
    history = []
    for k in range(8):  # the whole step (both sides) on one fixed batch
        trainer.step(lambda: (he, m, t, torch.Generator().manual_seed(k)), 1.0)
        history.append(trainer.last)
    for term in ("total", "adversarial", "cycle_he", "cycle_mask", "instance", "kl", "discriminator"):
        assert all(np.isfinite(h[term]) for h in history), term
    for term in ("cycle_he", "cycle_mask", "instance"):
        assert np.mean([h[term] for h in history[-2:]]) < history[0][term], term
    # the adversarial terms, each optimised on its own for a few steps: discriminators on fixed
    # translations, then the generator side against fixed discriminators
    g = generator_losses(nets, he, m, t, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(nets.discriminator_side(), lr=2e-4)
    d_losses = []
    for _ in range(4):
        d = discriminator_loss(nets, he, m, g["fake_he"], g["fake_mask"])
        opt.zero_grad()
        d.backward()
        opt.step()
        d_losses.append(float(d.detach()))
    assert d_losses[-1] < d_losses[0]
    opt = torch.optim.Adam(nets.generator_side(), lr=2e-4)
    adv = []
    for _ in range(4):
        a = generator_losses(nets, he, m, t, torch.Generator().manual_seed(0))["adversarial"]
        opt.zero_grad()
        a.backward()
        opt.step()
        adv.append(float(a.detach()))
    assert adv[-1] < adv[0]


CFG = NucleusPretrainConfig(preset="tiny", steps=4, patch=PATCH, batch=2, lr=1e-3, warmup=1, checkpoint_every=0)


def _sources():
    rng = np.random.default_rng(5)
    return [ImageSource(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "noise")]


@pytest.fixture(scope="module")
def nucleus_run(tmp_path_factory):
    """A 4-step run straight through, and the same run cancelled after step 2 and resumed."""
    root = tmp_path_factory.mktemp("nucleus")
    torch.set_num_threads(1)
    straight = root / "straight"
    drain(pretrain_nucleus(_sources(), straight, CFG, device="cpu", stats=STATS))
    resumed = root / "resumed"
    events = pretrain_nucleus(_sources(), resumed, CFG, device="cpu", stats=STATS)
    for ev in events:
        if ev.step == 2:
            break
    events.close()  # cancel: the finally saves step 2
    at_cancel = ckpt.load_training_state(resumed)["step"]
    last = drain(pretrain_nucleus(_sources(), resumed, CFG, device="cpu", resume=True))
    return straight, resumed, at_cancel, last


def test_resume_after_cancel_continues_the_same_run(nucleus_run):
    straight, resumed, at_cancel, last = nucleus_run
    assert at_cancel == 2 and last.done and last.step == 4
    a, b = ckpt.load_weights(straight), ckpt.load_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = ckpt.load_training_state(straight), ckpt.load_training_state(resumed)
    assert sa["nets"].keys() == sb["nets"].keys()
    assert all(torch.equal(sa["nets"][k], sb["nets"][k]) for k in sa["nets"])  # generator, discriminators
    cfg = ckpt.load_config(resumed)
    assert cfg["kind"] == "pretrain" and cfg["pretext"] == "nucleus" and cfg["training"]["steps"] == 4
    assert NucleusStats.from_dict(cfg["nucleus_stats"]) == STATS  # kept from the first half


def test_pretexts_are_never_resumed_as_each_other(nucleus_run, tmp_path):
    from napari_genselfdiff.core.train.training import PretrainConfig, pretrain

    straight = nucleus_run[0]
    with pytest.raises(CheckpointError, match="nucleus pretraining, cannot resume it as diffusion"):
        drain(pretrain(_sources(), straight, PretrainConfig(preset="tiny", steps=5, patch=PATCH, batch=2),
                       device="cpu", resume=True))
    diffusion = tmp_path / "diffusion"
    drain(pretrain(_sources(), diffusion, PretrainConfig(preset="tiny", steps=1, patch=PATCH, batch=1,
                                                         checkpoint_every=0), device="cpu"))
    assert ckpt.load_config(diffusion)["pretext"] == "diffusion"
    with pytest.raises(CheckpointError, match="diffusion pretraining"):
        drain(pretrain_nucleus(_sources(), diffusion, replace(CFG, steps=5), device="cpu", resume=True))


@pytest.mark.parametrize("task,boundary", [("nuclei", True), ("glands", False)])
def test_transfer_copies_every_tensor_but_the_head(nucleus_run, task, boundary):
    from napari_genselfdiff.core.train.training import build_segmentation_model

    pretrained = ckpt.load_weights(nucleus_run[0])
    spec = TaskSpec.make(task, boundary)
    model, info, _ = build_segmentation_model(spec, nucleus_run[0], "small", seed=3)
    own = model.state_dict()
    assert own.keys() == pretrained.keys()  # the same architecture: nothing left unused
    body = [k for k in own if not k.startswith("final_conv.")]
    assert body and all(torch.equal(own[k], pretrained[k]) for k in body)
    assert own["final_conv.weight"].shape[0] == spec.num_classes != pretrained["final_conv.weight"].shape[0]
    assert info["init_kind"] == "pretrain"


def test_sample_grid_from_the_checkpoint_and_the_cli(nucleus_run, tmp_path, monuseg_dir):
    from napari_genselfdiff.cli import main

    grid = nucleus_samples(nucleus_run[0], 2, styles=3, real=_real_tiles(monuseg_dir), device="cpu")
    pad = 2
    assert grid.dtype == np.uint8 and grid.shape == (2 * (PATCH + pad) + pad, 6 * (PATCH + pad) + pad, 3)
    out = tmp_path / "grid.png"
    rc = main(["sample", "--model", str(nucleus_run[0]), "--out", str(out), "--n", "2",
               "--images", str(monuseg_dir / "images"), "--device", "cpu"])
    assert rc == 0 and read_image(out).shape[0] == 2 * (PATCH + pad) + pad


def test_pretrain_widget_offers_the_pretext_and_shows_its_grid(make_napari_viewer, qtbot, tmp_path, settings_dir,
                                                               monkeypatch):
    import napari  # noqa: F401
    import pytestqt  # noqa: F401
    from napari_genselfdiff._sample_data import sample_he
    from napari_genselfdiff._widgets.pretrain import NUCLEUS_LAYER, TILES_LAYER, PretrainWidget

    viewer = make_napari_viewer(show=True)
    viewer.add_image(sample_he()[0][0][:192, :192], name="H&E", rgb=True)
    w = PretrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="Pretrain", area="right")
    w.layers.item(0).setSelected(True)
    assert [w.pretext.itemText(i) for i in range(w.pretext.count())] == ["diffusion", "nucleus-aware"]
    w.pretext.setCurrentText("nucleus-aware")
    assert not w.ddim_steps.isEnabled()
    w.preset.setCurrentText("tiny")
    w.patch.setValue(PATCH)
    w.steps.setValue(2)
    w.batch.setValue(2)
    w.device.combo.setCurrentText("cpu")
    out = tmp_path / "nucleus"
    w.out.setText(str(out))
    w.n_tiles.setValue(8)  # two rows
    config = w.nucleus_config
    monkeypatch.setattr(w, "nucleus_config", lambda: replace(config(), stats_tiles=4))  # measure 4 tiles, not 16
    assert w.nucleus_config().steps == 2 and w.nucleus_config().patch == PATCH
    w.start_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=300_000)
    assert ckpt.load_config(out)["pretext"] == "nucleus"
    layer = viewer.layers[NUCLEUS_LAYER]
    assert TILES_LAYER not in viewer.layers
    assert layer.rgb and layer.data.shape == (2 * (PATCH + 2) + 2, 6 * (PATCH + 2) + 2, 3)
    assert NUCLEUS_LAYER in w.progress.status.text()
    assert [w.layers.item(i).text() for i in range(w.layers.count())] == ["H&E"]  # never a source itself
    shots = Path(__file__).resolve().parents[1] / "screenshots"  # git-ignored, for a person to look at
    shots.mkdir(exist_ok=True)
    viewer.reset_view()
    viewer.screenshot(str(shots / "pretrain_widget_nucleus.png"), canvas_only=False)


def test_nucleus_pretext_is_refused_under_torchrun(tmp_path, monkeypatch, capsys):
    """Its GAN trainer has no process group: N torchrun copies would all write one checkpoint."""
    from napari_genselfdiff.cli import main

    img = tmp_path / "tiles"
    img.mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = main(["pretrain", "--pretext", "nucleus", "--images", str(img), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "one process only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
