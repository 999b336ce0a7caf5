import math

import numpy as np
import pytest
import torch

from napari_genselfdiff.core.pretext.diffusion import Diffusion, ScheduleConfig, make_betas


def test_quadratic_schedule_closed_form():
    cfg = ScheduleConfig()
    betas = make_betas(cfg).numpy()
    # betas = linspace(sqrt(1e-4), sqrt(0.02), 1000)^2, computed independently here
    expected = np.linspace(math.sqrt(1e-4), math.sqrt(0.02), 1000) ** 2
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    d = Diffusion(cfg)
    abar = np.cumprod(1 - expected)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-5)
    # alpha-bar at the end = exp(sum log(1 - beta)); sum(beta) ~ 1000 * (a^2 + ab + b^2) / 3 ~ 7.17
    assert abar[-1] == pytest.approx(math.exp(np.log1p(-expected).sum()), rel=1e-9)
    assert 1e-4 < abar[-1] < 2e-3
    assert np.all(np.diff(d.alphas_cumprod.numpy()) < 0)


def test_p2_weight_is_one_over_one_plus_snr():
    d = Diffusion(ScheduleConfig())
    abar = torch.cumprod(1 - make_betas(ScheduleConfig()), 0)  # float64 reference
    snr = abar / (1 - abar)
    np.testing.assert_allclose(d.p2_weight.numpy(), (1 / (1 + snr)).numpy(), rtol=1e-5)
    # where SNR crosses 1 the weight crosses 1/2
    t = int(torch.argmin((snr - 1).abs()))
    assert d.p2_weight[t].item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_other_schedules_valid(kind):
    betas = make_betas(ScheduleConfig(kind=kind))
    assert betas.shape == (1000,) and (betas > 0).all() and (betas <= 0.999).all()
    abar = torch.cumprod(1 - betas, 0)
    assert abar[0] > 0.99 and abar[-1] < 0.01


def test_q_sample_statistics():
    d = Diffusion(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.5)
    for ti in (10, 300, 900):
        t = torch.full((n,), ti, dtype=torch.long)
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = d.alphas_cumprod[ti].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - abar, abs=0.01)


class _Oracle(torch.nn.Module):
    """The ideal noise predictor when all data is one image x*: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""

    def __init__(self, d, target):
        super().__init__()
        self.d, self.target = d, target

    def forward(self, x, t):
        sa = self.d.sqrt_abar[t][:, None, None, None]
        s1 = self.d.sqrt_one_minus_abar[t][:, None, None, None]
        return (x - sa * self.target) / s1


def test_samplers_recover_single_point_distribution():
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).reshape(1, 3, 8, 8)
    d = Diffusion(ScheduleConfig(timesteps=100))
    oracle = _Oracle(d, target)
    g = torch.Generator().manual_seed(1)
    x = d.sample_ddim(oracle, (2, 3, 8, 8), steps=10, generator=g)
    torch.testing.assert_close(x, target.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    x = d.sample_ddpm(oracle, (2, 3, 8, 8), generator=g)
    torch.testing.assert_close(x, target.expand(2, -1, -1, -1), atol=1e-3, rtol=0)


def test_loss_is_reproducible_with_generator_and_positive():
    d = Diffusion(ScheduleConfig())
    model = torch.nn.Conv2d(3, 3, 1)
    model_t = lambda x, t: model(x)  # noqa: E731
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    l1 = d.loss(model_t, x0, generator=torch.Generator().manual_seed(3))
    l2 = d.loss(model_t, x0, generator=torch.Generator().manual_seed(3))
    assert l1.item() == l2.item() and l1.item() > 0
    l1.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_what_generated_tiles_mean_depends_on_how_long_the_pretraining_ran():
    from napari_genselfdiff.core.pretext.sampling import SHORT_PRETRAINING, samples_note

    assert "after only 300 steps" in samples_note(300) and "not a fault" in samples_note(300)
    for steps in (SHORT_PRETRAINING, 6613, None):
        assert "not a fault" not in samples_note(steps) and "H&E-like colour" in samples_note(steps)
