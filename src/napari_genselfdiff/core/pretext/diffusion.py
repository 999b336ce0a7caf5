"""The diffusion pretext: noise schedules, forward noising, the P2-weighted loss, samplers.

DDPM (Ho et al. 2020) with epsilon prediction. GenSelfDiff-HIS uses T = 1000 and the
"quadratic" schedule betas = linspace(sqrt(1e-4), sqrt(0.02), T) ** 2, and weights the MSE by
P2 weighting (Choi et al. 2022): w_t = 1 / (k + SNR_t) ** gamma with SNR_t = abar_t / (1 - abar_t),
k = 1, gamma = 1, which down-weights the easy, almost noise-free steps. Images live in [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ScheduleConfig:
    timesteps: int = 1000
    kind: str = "quadratic"  # quadratic | linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p2_k: float = 1.0
    p2_gamma: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "ScheduleConfig":
        """A schedule as a checkpoint's config.json records it, checked (never trusted):
        ValueError naming the first field that is not what a schedule can be."""
        if not isinstance(d, dict):
            raise ValueError(f"schedule is not an object but a {type(d).__name__}")
        cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        if type(cfg.timesteps) is not int or not 1 <= cfg.timesteps <= 100_000:
            raise ValueError(f"schedule timesteps {cfg.timesteps!r} is not a whole number from 1 to 100000")
        if cfg.kind not in ("quadratic", "linear", "cosine"):
            raise ValueError(f"schedule kind {cfg.kind!r} is not quadratic, linear or cosine")
        for name in ("beta_start", "beta_end", "p2_k", "p2_gamma"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1e3:
                raise ValueError(f"schedule {name} {v!r} is not a number from 0 to 1000")
        if not 0 < cfg.beta_start <= cfg.beta_end < 1:
            raise ValueError(f"schedule betas {cfg.beta_start!r}..{cfg.beta_end!r} must satisfy 0 < start <= end < 1")
        return cfg


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """Betas in float64, shape (T,)."""
    T = cfg.timesteps
    if cfg.kind == "quadratic":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
    if cfg.kind == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    if cfg.kind == "cosine":  # Nichol & Dhariwal 2021
        s = 0.008
        x = torch.linspace(0, T, T + 1, dtype=torch.float64)
        abar = torch.cos(((x / T) + s) / (1 + s) * math.pi / 2) ** 2
        abar = abar / abar[0]
        return (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown schedule {cfg.kind!r}; choose quadratic, linear or cosine")


class Diffusion(nn.Module):
    """Holds the schedule's buffers (so ``.to(device)`` moves them) and the pretext's maths."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        super().__init__()
        self.cfg = cfg
        betas = make_betas(cfg)
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        snr = abar / (1 - abar)

        def buf(name: str, value: torch.Tensor) -> None:
            self.register_buffer(name, value.float(), persistent=False)

        buf("betas", betas)
        buf("alphas_cumprod", abar)
        buf("alphas_cumprod_prev", abar_prev)
        buf("sqrt_abar", abar.sqrt())
        buf("sqrt_one_minus_abar", (1 - abar).sqrt())
        buf("p2_weight", (cfg.p2_k + snr) ** -cfg.p2_gamma)
        # posterior q(x_{t-1} | x_t, x_0)
        buf("posterior_var", betas * (1 - abar_prev) / (1 - abar))
        buf("posterior_coef_x0", betas * abar_prev.sqrt() / (1 - abar))
        buf("posterior_coef_xt", (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))

    @property
    def T(self) -> int:
        return self.cfg.timesteps

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values.gather(0, t)[:, None, None, None]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self._at(self.sqrt_abar, t) * x0 + self._at(self.sqrt_one_minus_abar, t) * noise

    def loss(self, model: nn.Module, x0: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """P2-weighted epsilon-prediction MSE for a batch of clean images ``x0`` in [-1, 1].

        ``generator`` (on x0's device) makes the timesteps and noise reproducible.
        """
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        pred = model(self.q_sample(x0, t, noise), t)
        mse = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        return (mse * self.p2_weight.gather(0, t)).mean()

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x_t - self._at(self.sqrt_one_minus_abar, t) * eps) / self._at(self.sqrt_abar, t)

    @torch.no_grad()
    def sample_ddpm(self, model: nn.Module, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """Ancestral DDPM sampling over all T steps (slow; the reference)."""
        x = torch.randn(shape, device=device, generator=generator)
        for i in reversed(range(self.T)):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            x0 = self.predict_x0(x, t, model(x, t).float()).clamp(-1, 1)
            mean = self._at(self.posterior_coef_x0, t) * x0 + self._at(self.posterior_coef_xt, t) * x
            if i > 0:
                x = mean + self._at(self.posterior_var, t).sqrt() * torch.randn(shape, device=device, generator=generator)
            else:
                x = mean
        return x

    @torch.no_grad()
    def sample_ddim(self, model: nn.Module, shape: tuple[int, ...], *, steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """DDIM sampling (Song et al. 2021) on ``steps`` evenly spaced timesteps; eta=0 is deterministic."""
        ts = torch.linspace(self.T - 1, 0, steps, device=device).round().long().unique_consecutive()
        x = torch.randn(shape, device=device, generator=generator)
        for j, i in enumerate(ts):
            t = i.repeat(shape[0])
            eps = model(x, t).float()
            x0 = self.predict_x0(x, t, eps).clamp(-1, 1)
            eps = (x - self._at(self.sqrt_abar, t) * x0) / self._at(self.sqrt_one_minus_abar, t)
            abar_next = self.alphas_cumprod[ts[j + 1]] if j + 1 < len(ts) else torch.tensor(1.0, device=device)
            abar_t = self.alphas_cumprod[i]
            sigma = eta * ((1 - abar_next) / (1 - abar_t) * (1 - abar_t / abar_next)).clamp(min=0).sqrt()
            x = abar_next.sqrt() * x0 + (1 - abar_next - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and j + 1 < len(ts):
                x = x + sigma * torch.randn(shape, device=device, generator=generator)
        return x
