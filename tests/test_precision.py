"""Precision (core/precision.py): auto is bf16 only where the processor computes it natively, the
choice reaches every path that runs a model, and bf16 gives the fp32 answer to within rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genselfdiff.core import precision as P
from napari_genselfdiff.core.errors import GenSelfDiffError
from napari_genselfdiff.core.inference import TorchPredictor
from napari_genselfdiff.core.nets.unet import UNet, UNetConfig, segmentation_config


def test_cpuinfo_flags_of_x86_and_arm():
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    zen3 = "flags\t\t: fpu sse avx2 fma\n"
    assert P._cpuinfo_flags(x86) & P.BF16_FLAGS == {"avx512_bf16"}
    assert P._cpuinfo_flags(arm) & P.BF16_FLAGS == {"bf16"}
    assert not P._cpuinfo_flags(zen3) & P.BF16_FLAGS


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: (native, "avx512_bf16" if native else "no avx512_bf16"))
    auto = P.resolve_precision("auto", "cpu")
    assert auto.name == ("bf16" if native else "fp32") and auto.why
    asked = P.resolve_precision("bf16", "cpu")  # asked for: given, and said to be emulated where it is
    assert asked.name == "bf16" and ("emulated" in asked.why) == (not native)
    assert P.resolve_precision("fp32", "cpu").name == "fp32"
    assert P.resolve_precision("auto", "cpu").dtype == (torch.bfloat16 if native else torch.float32)


def test_unknown_precision_is_one_clear_error():
    with pytest.raises(GenSelfDiffError, match="choose auto, fp32 or bf16"):
        P.resolve_precision("fp8", "cpu")


def test_this_machine_is_detected_from_its_own_cpuinfo():
    native, what = P.cpu_bf16_native()
    try:
        flags = P._cpuinfo_flags(open("/proc/cpuinfo").read())
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    assert native == bool(flags & P.BF16_FLAGS) or not torch.backends.mkldnn.is_available()
    assert what


def _bn_model(seed=0) -> tuple[UNet, dict]:
    torch.manual_seed(seed)
    ucfg = segmentation_config(UNetConfig.from_preset("tiny", in_channels=3, out_channels=3), 3)
    model = UNet(ucfg)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so fusing has work to do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    config = {"kind": "segmentation", "model": ucfg.to_dict(), "normalization": "minus_one_one",
              "task": {"task": "nuclei", "num_classes": 3, "class_names": ["background", "nucleus", "boundary"],
                       "boundary": True}}
    return model.eval(), config


def test_bf16_prediction_matches_fp32_to_rounding(he_tile):
    model, config = _bn_model()
    fp32 = TorchPredictor(model, config, "cpu", precision="fp32")
    bf16 = TorchPredictor(model, config, "cpu", precision="bf16")
    assert fp32.precision.name == "fp32" and next(fp32.network.parameters()).dtype == torch.float32
    assert bf16.precision.name == "bf16" and next(bf16.network.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the model itself is left as it is
    a, b = fp32(he_tile[None]), bf16(he_tile[None])
    assert b.dtype == np.float32 and np.allclose(b.sum(axis=1), 1, atol=1e-4)
    diff = np.abs(a - b)
    assert diff.max() < 0.05 and diff.mean() < 0.005, (diff.max(), diff.mean())
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.99


def test_amp_off_means_fp32():
    model, config = _bn_model()
    assert TorchPredictor(model, config, "cpu", amp=False, precision="bf16").precision.name == "fp32"


@pytest.fixture(scope="module")
def he_tile() -> np.ndarray:
    from napari_genselfdiff.bundled import sample_image_path
    from napari_genselfdiff.core.data import read_image

    return np.ascontiguousarray(read_image(sample_image_path())[:128, :128, :3])


def test_training_in_bf16_keeps_fp32_weights_and_says_so(tmp_path, he_tile):
    from napari_genselfdiff.core.checkpoint import load_model
    from napari_genselfdiff.core.data import LabeledImage, TaskSpec, mask_to_target
    from napari_genselfdiff.core.train.training import FinetuneConfig, finetune

    mask = np.zeros(he_tile.shape[:2], np.uint8)
    mask[32:96, 40:100] = 255
    item = LabeledImage("crop", he_tile, mask_to_target(mask, TaskSpec.make("glands")))
    cfg = FinetuneConfig(preset="tiny", steps=2, patch=64, batch=2, checkpoint_every=0, precision="bf16",
                         tune_postprocess=False)
    events = list(finetune([item], tmp_path / "m", cfg, device="cpu"))
    assert any("bf16" in (e.message or "") for e in events)
    losses = [e.loss for e in events if e.step > 0 and e.loss == e.loss]  # NaN: an event without a loss
    assert losses and all(np.isfinite(losses))  # (a non-finite loss would have stopped the run)
    model, config = load_model(tmp_path / "m")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert config["training"]["precision"] == "bf16"  # the checkpoint records what ran


def test_cli_precision_flag(capsys):
    from napari_genselfdiff.cli import build_parser, main

    for cmd in (["predict", "--model", "m", "--input", "x", "--out", "o"],
                ["evaluate", "--model", "m", "--images", "i", "--masks", "k"],
                ["finetune", "--images", "i", "--masks", "k", "--out", "o", "--scratch"],
                ["pretrain", "--images", "i", "--out", "o"]):
        assert build_parser().parse_args(cmd + ["--precision", "fp32"]).precision == "fp32"
        assert build_parser().parse_args(cmd).precision == "auto"
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                  if a.dest == "precision")
    assert tuple(action.choices) == P.CHOICES
    assert main(["predict", "--model", "m", "--input", "x", "--out", "o", "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision" in err[0]
