import pytest
import torch

from napari_genselfdiff.core.nets.unet import (PRESETS, UNet, UNetConfig, count_parameters, segmentation_config,
                                               transfer_pretrained)


def test_tiny_shapes_and_time_conditioning():
    torch.manual_seed(0)
    m = UNet(UNetConfig.from_preset("tiny", out_channels=3)).eval()
    x = torch.randn(2, 3, 32, 48)
    y0 = m(x, torch.zeros(2))
    y1 = m(x, torch.full((2,), 500))
    assert y0.shape == (2, 3, 32, 48)
    assert not torch.allclose(y0, y1), "the time input must change the output"
    torch.testing.assert_close(m(x), y0)  # t=None means t=0


def test_presets_sizes():
    sizes = {name: count_parameters(UNet(UNetConfig.from_preset(name))) for name in PRESETS}
    assert sizes["tiny"] < 1e6 < sizes["small"] < 2e7 < sizes["paper"] < 6e7
    assert 3.5 * sizes["tiny"] < sizes["wide"] < sizes["small"]  # twice tiny's width
    paper = UNetConfig.from_preset("paper")
    assert (paper.base, paper.mults, paper.blocks, paper.groups) == (64, (1, 2, 4, 8), 2, 8)


def test_bad_input_size():
    m = UNet(UNetConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="multiple of 8"):
        m(torch.randn(1, 3, 36, 32))


def test_config_roundtrip():
    cfg = UNetConfig.from_preset("small", out_channels=2)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_transfer_copies_everything_but_the_head():
    torch.manual_seed(0)
    pre = UNet(UNetConfig.from_preset("tiny", out_channels=3))
    seg = UNet(UNetConfig.from_preset("tiny", out_channels=2))
    report = transfer_pretrained(pre.state_dict(), seg)
    assert sorted(report["skipped"]) == ["final_conv.bias", "final_conv.weight"]
    pre_sd, seg_sd = pre.state_dict(), seg.state_dict()
    assert len(report["copied"]) == len(seg_sd) - 2
    for name in report["copied"]:
        assert torch.equal(pre_sd[name], seg_sd[name]), name
    assert seg_sd["final_conv.weight"].shape == (2, 16, 1, 1)
    assert pre_sd["final_conv.weight"].shape == (3, 16, 1, 1)


def test_transfer_refuses_other_architecture():
    pre = UNet(UNetConfig.from_preset("tiny"))
    other = UNet(UNetConfig.from_preset("tiny", base=8, groups=4, out_channels=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        transfer_pretrained(pre.state_dict(), other)


def test_transfer_into_tile_invariant_network():
    """GroupNorm affine weights land on BatchNorm, the attention weights are left unused, BatchNorm's
    running statistics start fresh; every convolution is copied."""
    torch.manual_seed(0)
    pre = UNet(UNetConfig.from_preset("small", out_channels=3))  # small has linear + full attention
    seg = UNet(segmentation_config(pre.config, 2))
    assert seg.config.tile_invariant and not pre.config.tile_invariant
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in seg.modules())
    report = transfer_pretrained(pre.state_dict(), seg)
    pre_sd, seg_sd = pre.state_dict(), seg.state_dict()
    for name in report["copied"]:
        assert torch.equal(pre_sd[name], seg_sd[name]), name
    assert report["initialised"] and all(n.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                                         for n in report["initialised"])
    assert report["unused"] and all("attn" in n for n in report["unused"])
    convs = [n for n in seg_sd if "conv" in n and not n.startswith("final_conv")]
    assert set(convs) <= set(report["copied"])


def test_tile_invariant_network_is_local_in_eval_mode():
    """In eval mode the output at a pixel does not change when far-away input changes, and does
    not depend on the batch it is in: what tiling needs. The GroupNorm + attention network fails
    the same check."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 256, 256)
    far = x.clone()
    far[..., 200:, 200:] = torch.randn(1, 3, 56, 56) * 3
    for cfg, local in ((segmentation_config(UNetConfig.from_preset("tiny"), 2), True),
                       (UNetConfig.from_preset("tiny", out_channels=2), False)):
        net = UNet(cfg)
        if cfg.norm == "batch":  # give BatchNorm some running statistics first
            net.train()
            with torch.no_grad():
                net(torch.randn(4, 3, 64, 64))
        net.eval()
        with torch.no_grad():
            a, b = net(x)[..., :32, :32], net(far)[..., :32, :32]
            alone = net(torch.cat([x, far]))[:1, :, :32, :32]
        assert torch.equal(a, b) == local, cfg
        if local:
            torch.testing.assert_close(alone, a)


def test_old_configs_load_as_groupnorm():
    d = UNetConfig.from_preset("tiny").to_dict()
    d.pop("norm")
    assert UNetConfig.from_dict(d).norm == "group"
    with pytest.raises(ValueError, match="normalisation"):
        UNetConfig(norm="instance")


def test_fused_for_inference_computes_the_same_function_and_leaves_the_model_alone():
    import torch
    from napari_genselfdiff.core.nets.unet import (ResBlock, UNet, UNetConfig, fused_for_inference,
                                                   segmentation_config)

    torch.manual_seed(0)
    net = UNet(segmentation_config(UNetConfig.from_preset("tiny", in_channels=3, out_channels=3), 3))
    for m in net.modules():  # statistics and affine parameters that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fused_for_inference(net)
    assert not any(isinstance(m, ResBlock) for m in fused.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and m is b.norm2
                   for b in fused.modules() if hasattr(b, "norm2") for m in [b.norm2])
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():  # in-place activations (no gradient kept)
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-4)
    xg = x.clone().requires_grad_(True)  # and with a gradient: not in place, backward works
    out = fused(xg)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), net(x), rtol=1e-4, atol=1e-4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(isinstance(m, ResBlock) for m in net.modules())
    group = UNet(UNetConfig.from_preset("tiny", in_channels=3, out_channels=2))
    assert fused_for_inference(group) is group  # GroupNorm: nothing to fold


def test_cli_preset_choices_are_the_presets():
    from napari_genselfdiff.cli import build_parser

    for cmd in ("pretrain", "finetune"):
        action = next(a for a in build_parser()._subparsers._group_actions[0].choices[cmd]._actions
                      if a.dest == "preset")
        assert set(action.choices) == set(PRESETS)


def test_space_to_depth_stem_runs_nothing_at_full_resolution_and_stays_shift_equivariant():
    """The ``s2d`` preset (issue 32 item 6): the stem folds 2x2 pixels into channels and the head
    unfolds them, so no convolution sees a full-resolution input, the output has the input's size,
    and (eval mode) shifting the input by the model's multiple shifts the output by the same: what
    tiling relies on. A shift by 1 pixel changes the answer (the 2x2 phase matters), which is why
    tiles start at multiples."""
    from napari_genselfdiff.core.nets.unet import fused_for_inference

    torch.manual_seed(0)
    cfg = segmentation_config(UNetConfig.from_preset("s2d", out_channels=3), 2)
    assert cfg.stem == "s2d" and cfg.tile_invariant and cfg.multiple == 8
    net = UNet(cfg)
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 64, 64))  # BatchNorm statistics
    net.eval()
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: sizes.append(inp[0].shape[-1]))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.randn(1, 3, 192, 192)
    with torch.no_grad():
        full = net(x)
    for h in hooks:
        h.remove()
    assert full.shape == (1, 2, 192, 192)
    assert sizes and max(sizes) == 96, "a convolution ran at full resolution"
    with torch.no_grad():
        shifted = net(x[..., 8:, 16:])
        by_one = net(x[..., 1:185, :184])
    torch.testing.assert_close(shifted[..., 40:120, 40:120], full[..., 48:128, 56:136], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(by_one[..., 40:120, 40:120], full[..., 41:121, 40:120], atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(fused_for_inference(net)(x), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="stem"):
        UNetConfig(stem="strided")
    assert UNetConfig.from_dict({k: v for k, v in UNetConfig().to_dict().items() if k != "stem"}).stem == "conv"


def test_space_to_depth_preset_goes_from_pretext_to_prediction(tmp_path):
    """``--preset s2d`` end to end at toy size: the diffusion pretext trains it (the noise predicted
    at full resolution through the depth-to-space head), fine-tuning takes every pretrained tensor
    but the head, and the saved model predicts an image whose size is not a multiple of 8."""
    import numpy as np

    from conftest import random_labeled, random_sources
    from napari_genselfdiff.core import checkpoint as ck
    from napari_genselfdiff.core.data import TaskSpec
    from napari_genselfdiff.core.inference import TorchPredictor, predict_image
    from napari_genselfdiff.core.progress import drain
    from napari_genselfdiff.core.train.segmenter import build_segmentation_model
    from napari_genselfdiff.core.train.training import FinetuneConfig, PretrainConfig, finetune, pretrain

    torch.set_num_threads(1)
    pre = tmp_path / "pre"
    drain(pretrain(random_sources(), pre, PretrainConfig(preset="s2d", steps=2, patch=32, batch=2, lr=1e-3, warmup=1,
                                                          checkpoint_every=0), device="cpu"))
    weights = ck.load_weights(pre)
    assert weights["final_conv.weight"].shape[0] == 3 * 4  # RGB noise, 2x2 positions per output
    model, _, _ = build_segmentation_model(TaskSpec.make("nuclei", boundary=True), pre, "tiny", seed=0)
    assert model.config.stem == "s2d"
    own = model.state_dict()
    assert own["final_conv.weight"].shape[0] == 3 * 4
    for k in own:
        if not k.startswith("final_conv.") and k in weights:
            assert torch.equal(own[k], weights[k].to(own[k].dtype)), k
    ft = tmp_path / "ft"
    drain(finetune(random_labeled(), ft, FinetuneConfig(steps=2, patch=32, batch=2, lr=1e-3, warmup=1,
                                                         checkpoint_every=0, val_every=0), init=pre, device="cpu"))
    pred = TorchPredictor.from_checkpoint(ft, device="cpu")
    assert pred.tile_multiple == 8
    probs = predict_image(pred, np.random.default_rng(0).integers(0, 255, (44, 52, 3), dtype=np.uint8))
    assert probs.shape[-2:] == (44, 52) and np.isfinite(probs).all()
