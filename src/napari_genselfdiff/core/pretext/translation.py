"""The networks and losses of the nucleus-aware pretext: unpaired translation between H&E tiles
and pseudo masks (:mod:`.pseudomask`).

After Song et al. (UNITPathSSL, IEEE TMI 2023, arXiv 2309.07394), at a size that trains on a CPU:

* **mask -> H&E**, :class:`MaskToHE`: a small convolutional encoder-decoder taking a mask image
  (foreground, boundary, distance; :func:`.pseudomask.mask_image`) whose every feature map is
  modulated by a style code (adaptive normalisation: normalise, then a per-channel scale and shift
  computed from the code) and given per-pixel noise. The code is *conditional* when
  :class:`StyleEncoder` takes it from a real tile (mean and log-variance, sampled as in a VAE) and
  *stochastic* when drawn from N(0, 1): one mask yields many stainings.
* **H&E -> mask**: the tile-invariant segmentation U-Net (:func:`..nets.unet.segmentation_config`),
  so fine-tuning inherits every tensor of it but the head. Its head predicts 4 channels: logits of
  background / nucleus / boundary, and the normalised distance to the nucleus' edge.
* a PatchGAN discriminator per domain (:class:`PatchDiscriminator`).

Losses (:func:`generator_losses`, :func:`discriminator_loss`): least-squares adversarial, L1
cycle-consistency both ways (H&E -> mask -> H&E with the tile's own style; mask -> H&E -> mask),
and the instance guidance: on generated H&E the translator must recover the source pseudo mask's
instances (cross-entropy over background / nucleus / boundary plus L1 on the distance inside the
nuclei), with a small KL term keeping encoded styles close to N(0, 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.unet import PRESETS, UNet, UNetConfig, segmentation_config

MASK_CHANNELS = 3  # foreground, boundary, distance
TRANSLATOR_OUTPUTS = 4  # background / nucleus / boundary logits + distance

#: network widths per preset (the translator's own size is the U-Net preset of the same name)
NETWORK_PRESETS: dict[str, dict] = {
    "tiny": dict(gen_base=16, disc_base=16, style_dim=8),
    "small": dict(gen_base=32, disc_base=32, style_dim=16),
    "paper": dict(gen_base=64, disc_base=64, style_dim=64),
}


@dataclass(frozen=True)
class TranslationConfig:
    """Architecture of the generator, style encoder and discriminators (stored in checkpoints)."""

    gen_base: int = 32
    disc_base: int = 32
    style_dim: int = 16
    levels: int = 2  # stride-2 stages of the generator and style encoder

    @classmethod
    def from_preset(cls, name: str) -> "TranslationConfig":
        """The widths listed for ``name``; other U-Net presets (wide, backbone, s2d) give their own
        base width to the generator and discriminators."""
        if name in NETWORK_PRESETS:
            return cls(**NETWORK_PRESETS[name])
        base = PRESETS[name]["base"]
        return cls(gen_base=base, disc_base=base, style_dim=max(8, base // 2))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TranslationConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LossWeights:
    adversarial: float = 1.0
    cycle_he: float = 10.0
    cycle_mask: float = 5.0
    instance: float = 2.0
    kl: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


def translator_config(unet_preset: str) -> UNetConfig:
    """The H&E -> mask network: the tile-invariant segmentation U-Net of ``unet_preset``."""
    base = UNetConfig.from_preset(unet_preset, in_channels=3, out_channels=3)
    return segmentation_config(base, TRANSLATOR_OUTPUTS)


class ModulatedBlock(nn.Module):
    """conv3x3 -> per-pixel noise -> normalise -> style scale and shift -> LeakyReLU."""

    def __init__(self, cin: int, cout: int, style_dim: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(1 if cout % 8 else 8, cout, affine=False)
        self.style = nn.Linear(style_dim, 2 * cout)
        self.noise_gain = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        h = self.conv(x)
        noise = torch.randn(h.shape[0], 1, *h.shape[2:], device=h.device, dtype=h.dtype, generator=generator)
        h = self.norm(h + self.noise_gain * noise)
        scale, shift = self.style(z)[:, :, None, None].chunk(2, dim=1)
        return F.leaky_relu(h * (1 + scale) + shift, 0.2)


class MaskToHE(nn.Module):
    """Mask image (B, 3, H, W) + style code (B, style_dim) -> H&E tile (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: TranslationConfig):
        super().__init__()
        self.cfg = cfg
        c, s = cfg.gen_base, cfg.style_dim
        self.mapping = nn.Sequential(nn.Linear(s, s), nn.LeakyReLU(0.2), nn.Linear(s, s))
        self.stem = ModulatedBlock(MASK_CHANNELS, c, s)
        chans = [c * 2 ** (i + 1) for i in range(cfg.levels)]
        self.down = nn.ModuleList()
        ch = c
        for cout in chans:
            self.down.append(ModulatedBlock(ch, cout, s, stride=2))
            ch = cout
        self.mid = nn.ModuleList([ModulatedBlock(ch, ch, s), ModulatedBlock(ch, ch, s)])
        self.up = nn.ModuleList()
        for skip in reversed([c] + chans[:-1]):
            self.up.append(ModulatedBlock(ch + skip, skip, s))
            ch = skip
        self.out = nn.Conv2d(ch, 3, 1)

    @property
    def multiple(self) -> int:
        return 2 ** self.cfg.levels

    def forward(self, mask: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        w = self.mapping(z)
        h = self.stem(mask, w, generator)
        skips = [h]
        for block in self.down:
            h = block(h, w, generator)
            skips.append(h)
        skips.pop()
        for block in self.mid:
            h = h + block(h, w, generator)
        for block in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), w, generator)
        return torch.tanh(self.out(h))


class StyleEncoder(nn.Module):
    """H&E tile -> (mean, log-variance) of its style code: the conditional style."""

    def __init__(self, cfg: TranslationConfig):
        super().__init__()
        c = cfg.gen_base
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.LeakyReLU(0.2)]
        for i in range(cfg.levels + 1):
            layers += [nn.Conv2d(c * 2 ** i, c * 2 ** (i + 1), 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * 2 ** (cfg.levels + 1), 2 * cfg.style_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.features(x).mean(dim=(2, 3))).chunk(2, dim=1)
        return mu, logvar.clamp(-8, 8)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: a score per overlapping patch (70 px receptive field at 3 layers)."""

    def __init__(self, in_channels: int, base: int):
        super().__init__()
        c = base
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(1, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 4, stride=1, padding=1), nn.GroupNorm(1, 4 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 4, stride=1, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TranslationNets(nn.Module):
    """Everything the pretext trains: ``translator`` (the U-Net that is transferred), ``generator``,
    ``style`` and the two discriminators ``d_he`` / ``d_mask``."""

    def __init__(self, translator: UNet, cfg: TranslationConfig):
        super().__init__()
        self.cfg = cfg
        self.translator = translator
        self.generator = MaskToHE(cfg)
        self.style = StyleEncoder(cfg)
        self.d_he = PatchDiscriminator(3, cfg.disc_base)
        self.d_mask = PatchDiscriminator(MASK_CHANNELS, cfg.disc_base)

    def generator_side(self) -> list[nn.Parameter]:
        return [p for m in (self.translator, self.generator, self.style) for p in m.parameters()]

    def discriminator_side(self) -> list[nn.Parameter]:
        return [p for m in (self.d_he, self.d_mask) for p in m.parameters()]

    def auxiliary_state(self) -> dict[str, torch.Tensor]:
        """The tensors of everything but the translator (kept in the checkpoint's training state)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("translator.")}


def soft_mask(out: torch.Tensor) -> torch.Tensor:
    """The translator's 4-channel output as a differentiable mask image in [-1, 1] (foreground =
    P(nucleus) + P(boundary), boundary = P(boundary), distance = sigmoid)."""
    p = out[:, :3].float().softmax(dim=1)
    dist = torch.sigmoid(out[:, 3].float())
    return torch.stack([p[:, 1] + p[:, 2], p[:, 2], dist], dim=1) * 2 - 1


def instance_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Instance guidance: cross-entropy of the class logits against the pseudo mask's classes,
    plus L1 on the distance channel inside the nuclei."""
    ce = F.cross_entropy(out[:, :3].float(), target)
    fg = (mask[:, 0] > 0).float()
    dist_target = (mask[:, 2] + 1) / 2
    l1 = ((torch.sigmoid(out[:, 3].float()) - dist_target).abs() * fg).sum() / fg.sum().clamp(min=1.0)
    return ce + l1


def _lsgan(score: torch.Tensor, real: bool) -> torch.Tensor:
    return ((score.float() - (1.0 if real else 0.0)) ** 2).mean()


def generator_losses(nets: TranslationNets, he: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                     generator: torch.Generator | None, w: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """The generator side's losses for a batch of real H&E ``he`` (B, 3, S, S) and unpaired pseudo
    masks ``mask`` (B, 3, S, S) with class targets ``target`` (B, S, S). Returns each term and their
    weighted ``total``; ``fake_he`` / ``fake_mask`` are the detached translations (for the
    discriminators)."""
    b, dim = he.shape[0], nets.cfg.style_dim
    # H&E -> mask -> H&E, with the tile's own (conditional) style
    out_real = nets.translator(he)
    fake_mask = soft_mask(out_real).to(he.dtype)
    mu, logvar = nets.style(he)
    eps = torch.randn(b, dim, device=he.device, dtype=mu.dtype, generator=generator)
    z_real = mu + eps * torch.exp(0.5 * logvar)
    cycle_he = (nets.generator(fake_mask, z_real, generator).float() - he.float()).abs().mean()
    # mask -> H&E -> mask, with a random (stochastic) style
    z = torch.randn(b, dim, device=he.device, dtype=mu.dtype, generator=generator)
    fake_he = nets.generator(mask, z, generator)
    out_fake = nets.translator(fake_he)
    cycle_mask = (soft_mask(out_fake) - mask.float()).abs().mean()
    inst = instance_loss(out_fake, target, mask)
    adv = _lsgan(nets.d_he(fake_he), True) + _lsgan(nets.d_mask(fake_mask), True)
    kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum(dim=1).mean()
    total = (w.adversarial * adv + w.cycle_he * cycle_he + w.cycle_mask * cycle_mask + w.instance * inst
             + w.kl * kl)
    return {"total": total, "adversarial": adv, "cycle_he": cycle_he, "cycle_mask": cycle_mask,
            "instance": inst, "kl": kl, "fake_he": fake_he.detach(), "fake_mask": fake_mask.detach()}


def discriminator_loss(nets: TranslationNets, he: torch.Tensor, mask: torch.Tensor, fake_he: torch.Tensor,
                       fake_mask: torch.Tensor) -> torch.Tensor:
    """Least-squares loss of both discriminators: real H&E and real pseudo masks towards 1, the
    translations towards 0."""
    d_he = _lsgan(nets.d_he(he), True) + _lsgan(nets.d_he(fake_he), False)
    d_mask = _lsgan(nets.d_mask(mask), True) + _lsgan(nets.d_mask(fake_mask), False)
    return 0.5 * (d_he + d_mask)
