import pytest
import torch

from napari_genselfdiff.core.unet import PRESETS, UNet, UNetConfig, count_parameters, transfer_pretrained


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
