import math

import pytest
import torch

from napari_genselfdiff.core.train.losses import (build_loss, cross_entropy_loss, dice_loss, focal_loss, parse_loss,
                                                  ssl_loss, tversky_loss)


def _target(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, h, w, generator=g) > 0.6).long()


def test_focal_on_uniform_logits():
    # p_t = 0.5 everywhere: focal = -(1 - 0.5)^2 * ln 0.5 = 0.25 * 0.6931 = 0.17329
    logits = torch.zeros(1, 2, 4, 4)
    target = _target(1, 4, 4)
    assert focal_loss(logits, target).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    # gamma = 0 is cross-entropy
    logits = torch.randn(2, 3, 5, 5)
    t = torch.randint(0, 3, (2, 5, 5))
    assert focal_loss(logits, t, gamma=0).item() == pytest.approx(cross_entropy_loss(logits, t).item(), rel=1e-6)


def test_focal_hand_case_two_pixels():
    # pixel 1: logits (ln 3, 0) -> p(class0) = 3/4, target 0: -(1/4)^2 ln(3/4) = 0.0179797
    # pixel 2: same logits, target 1 -> p_t = 1/4: -(3/4)^2 ln(1/4) = 0.7797905
    logits = torch.tensor([[[[math.log(3), math.log(3)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    expected = (0.0625 * -math.log(0.75) + 0.5625 * -math.log(0.25)) / 2
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def _perfect_logits(target, n=2, scale=20.0):
    return torch.nn.functional.one_hot(target, n).permute(0, 3, 1, 2).float() * scale


def test_dice_and_tversky_extremes():
    t = _target()
    assert dice_loss(_perfect_logits(t), t).item() < 1e-3
    assert dice_loss(_perfect_logits(1 - t), t).item() > 0.95
    logits = torch.randn(2, 2, 16, 16)
    # alpha = beta = 0.5 makes Tversky equal to Dice
    assert tversky_loss(logits, t, 0.5, 0.5, smooth=0.0).item() == pytest.approx(dice_loss(logits, t, smooth=0.0).item(), rel=1e-6)


def test_dice_hand_case():
    # probabilities 0.5 everywhere on 4 pixels, 2 of them foreground: tp = 1, fp = 1, fn = 1
    # soft dice with smooth 0: 2*1 / (2*1 + 1 + 1) = 0.5
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[1, 0], [1, 0]]])
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.5)


def test_ssl_small_for_perfect_large_for_wrong_and_selects_hard_pixels():
    t = _target()
    perfect = ssl_loss(_perfect_logits(t, scale=12), t).item()
    wrong = ssl_loss(_perfect_logits(1 - t, scale=12), t).item()
    assert perfect < 1e-3 < 1.0 < wrong


def test_ssl_hand_case_uniform_prediction():
    # y = [1, 0] on two pixels, p = 0.5 everywhere (logits 0), C = 0.01.
    # class channel 1: mu_y = .5, sd_y = .5; mu_p = .5, sd_p = 0, so the p term is (0 + .01)/.01 = 1.
    #   pixel0: |(1 - .5 + .01)/.51 - 1| = |1 - 1| = 0
    #   pixel1: |(0 - .5 + .01)/.51 - 1| = |-.9608 - 1| = 1.9608
    # class channel 0 mirrors it. e_max = 1.9608; beta = .1 keeps the 2 entries with e = 1.9608
    # (e = 0 is not > 0.196); bce = ln 2 at every entry. loss = (2 * 1.9608 * ln 2) / 2.
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    e_big = abs((-0.5 + 0.01) / 0.51 - 1.0)
    assert ssl_loss(logits, target).item() == pytest.approx(e_big * math.log(2), rel=1e-4)
    # a larger C shrinks the normalised difference: C = 1 -> p term (0 + 1)/1 = 1,
    #   pixel0 |(.5 + 1)/1.5 - 1| = 0, pixel1 |(-.5 + 1)/1.5 - 1| = 2/3
    assert ssl_loss(logits, target, C=1.0).item() == pytest.approx(2 / 3 * math.log(2), rel=1e-4)


@pytest.mark.parametrize("name", ["focal", "ssl", "ce", "dice", "tversky", "focal+ssl", "0.5*dice+ce"])
def test_gradients_finite_including_empty_target(name):
    fn = build_loss(name)
    for t in (_target(), torch.zeros(2, 16, 16, dtype=torch.long)):
        logits = torch.randn(2, 2, 16, 16, requires_grad=True)
        loss = fn(logits, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0


def test_parse_and_weighted_sum():
    assert parse_loss("focal+ssl") == [(1.0, "focal"), (1.0, "ssl")]
    assert parse_loss("0.5*dice + CE") == [(0.5, "dice"), (1.0, "ce")]
    assert parse_loss("1e-3*focal+ssl") == [(0.001, "focal"), (1.0, "ssl")]  # scientific notation
    logits, t = torch.randn(2, 2, 8, 8), _target(2, 8, 8)
    combo = build_loss("focal+ssl")(logits, t).item()
    assert combo == pytest.approx(focal_loss(logits, t).item() + ssl_loss(logits, t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="cannot read loss term"):
        parse_loss("focal+banana")


def _two_touching_and_one_alone():
    """Class targets (background 0, nucleus 1, boundary 2) of two 6x6 nuclei side by side and a
    third one apart, drawn by the data module from instance labels."""
    import numpy as np

    from napari_genselfdiff.core.data import TaskSpec, mask_to_target

    inst = np.zeros((20, 24), np.int32)
    inst[2:8, 2:8] = 1
    inst[2:8, 8:14] = 2
    inst[12:18, 16:22] = 3
    return torch.from_numpy(mask_to_target(inst, TaskSpec.make("nuclei", boundary=True)).astype(np.int64))[None]


def test_contact_pixels_are_the_seam_between_touching_nuclei_only():
    from napari_genselfdiff.core.train.losses import contact_pixels

    t = _two_touching_and_one_alone()
    where = contact_pixels(t)[0]
    assert where.any()
    cols = torch.nonzero(where)[:, 1]
    assert cols.min() >= 6 and cols.max() <= 9  # around the shared edge at column 7 | 8
    assert not where[10:, :].any()  # the nucleus on its own has no seam
    assert (t[0][where] > 0).all()  # never background
    # a class map without a boundary class has none
    assert not contact_pixels((t > 0).long()).any()


def test_contact_loss_is_cross_entropy_over_the_seam():
    from napari_genselfdiff.core.train.losses import LOSSES, contact_loss, contact_pixels

    t = _two_touching_and_one_alone()
    logits = torch.randn(1, 3, *t.shape[1:], generator=torch.Generator().manual_seed(3))
    ce = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    assert contact_loss(logits, t).item() == pytest.approx(ce[contact_pixels(t)].mean().item(), rel=1e-6)
    assert contact_loss(logits, t).item() != pytest.approx(ce.mean().item(), rel=1e-3)
    # no seam in the batch: zero, and still differentiable
    lone = t.clone()
    lone[:, :, :16] = 0
    logits.requires_grad_(True)
    z = contact_loss(logits, lone)
    z.backward()
    assert z.item() == 0.0 and logits.grad is not None
    assert "contact" in LOSSES and parse_loss("focal+0.5*contact") == [(1.0, "focal"), (0.5, "contact")]
