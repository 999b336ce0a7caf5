"""The nucleus-aware pretext as a training generator, beside diffusion's (:func:`.training.pretrain`).

Unpaired translation between unlabeled H&E tiles and pseudo masks drawn from nucleus statistics
measured on those tiles (:mod:`..pretext.pseudomask`, networks and losses in
:mod:`..pretext.translation`). It runs on the pretraining machinery of :mod:`.training`: the same
:class:`~..progress.Progress` events, lr schedule, periodic checkpoints, cancel-by-closing (the
``finally`` saves) and exact resume (each step's tiles, pseudo masks, style codes and noise come
from generators seeded with (seed, step)).

The checkpoint is a pretraining checkpoint like diffusion's (``kind: "pretrain"``) with
``pretext: "nucleus"``: ``model.safetensors`` holds the H&E -> mask translator, a tile-invariant
segmentation U-Net, so ``finetune --init`` copies every tensor of it but the head; the config
records the nucleus statistics (measured once, at the start of a run) and the other networks'
architecture; the training state holds the generator, style encoder, discriminators and both
optimizers. :func:`nucleus_samples` draws the pretext's visual check from a checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..data import NORMALIZATION, AugmentConfig, UnlabeledSource, sample_unlabeled_batch, to_model_input
from ..device import pick_device
from ..errors import CheckpointError, DataError, GenSelfDiffError
from ..nets.unet import PRESETS, UNetConfig, seeded_model
from ..precision import Precision, autocast, precision_of, resolve_precision
from ..pretext.pseudomask import NucleusStats, draw_batch, measure_tile, render_mask, summarise
from ..pretext.translation import (LossWeights, TranslationConfig, TranslationNets, discriminator_loss,
                                   generator_losses, translator_config)
from ..progress import Progress
from .outdir import prepare_out, start_note
from .stops import StopChecks
from .training import _now, _run, _step_rngs

PRETEXT = "nucleus"
#: terms reported per step (``last_losses``) and recorded in the checkpoint
TERMS = ("total", "adversarial", "cycle_he", "cycle_mask", "instance", "kl", "discriminator")


@dataclass
class NucleusPretrainConfig:
    """Settings of a nucleus-aware pretraining. ``preset`` sizes every network (the translator is
    that U-Net preset's segmentation network; tiny and small train on a CPU at 64-128 px, paper
    wants a GPU at 256 px)."""

    preset: str = "small"
    steps: int = 1000
    patch: int = 128
    batch: int = 4
    lr: float = 2e-4
    warmup: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    amp: bool = True  # False: fp32 whatever ``precision`` says
    precision: str = "auto"  # auto / fp32 / bf16 autocast (core/precision.py); never fp16 (no loss scaling)
    stats_tiles: int = 16  # unlabeled tiles the nucleus statistics are measured on
    stats_size: int = 128  # their size (at least the patch): nuclei cut by a tile's edge are not measured
    weights: LossWeights = field(default_factory=LossWeights)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(blur_p=0.0, color_jitter=0.05, stain_p=0.3))


def _seeded_nets(ucfg: UNetConfig, tcfg: TranslationConfig, seed: int) -> TranslationNets:
    translator = seeded_model(ucfg, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return TranslationNets(translator, tcfg)


class _GanTrainer:
    """Two optimizers (generator side: translator, generator, style encoder; discriminator side)
    behind the interface :func:`.training._run` drives (``model``, ``set_lr``, ``step``,
    ``state``). ``step`` takes a callable returning the step's batch, does one generator update
    then one discriminator update, and returns the generator side's total loss."""

    def __init__(self, nets: TranslationNets, device: torch.device, lr: float, precision: str, weights: LossWeights):
        self.nets = nets.to(device)
        self.stops = StopChecks(self.nets)  # Cancel stops inside a step (core.progress.stoppable)
        self.model = self.net = nets.translator
        self.group, self.stream, self.main = None, None, True  # one process (no torchrun / DDP here)
        self.device, self.weights = device, weights
        self.opt = torch.optim.Adam(nets.generator_side(), lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(nets.discriminator_side(), lr=lr, betas=(0.5, 0.999))
        self.precision = resolve_precision(precision, device)
        if self.precision.name == "fp16":  # bf16 needs no loss scaling; fp16 would, for two optimizers
            self.precision = Precision("fp32", "fp32 (this GPU has no bf16; the pretext takes no fp16)")
        self.last: dict[str, float] = {}

    def set_lr(self, lr: float) -> None:
        for opt in (self.opt, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params, grad_clip: float) -> None:
        if not torch.isfinite(loss):
            raise GenSelfDiffError(f"training diverged (loss {loss.item()}); lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()

    def step(self, batch: Callable[[], tuple], grad_clip: float) -> float:
        he, mask, target, gen = batch()
        nets = self.nets.train()
        discs = nets.discriminator_side()
        try:
            for p in discs:  # the generator step needs no discriminator gradients
                p.requires_grad_(False)
            try:
                # Cancel stops the step only before its first update: a step is taken whole or not at all
                with self.stops.armed():
                    with autocast(self.device, self.precision):
                        g = generator_losses(nets, he, mask, target, gen, self.weights)
                    self._update(self.opt, g["total"], nets.generator_side(), grad_clip)
            finally:
                for p in discs:
                    p.requires_grad_(True)
            with autocast(self.device, self.precision):
                d = discriminator_loss(nets, he, mask, g["fake_he"], g["fake_mask"])
            self._update(self.opt_d, d, discs, grad_clip)
        except torch.OutOfMemoryError:
            raise GenSelfDiffError(f"out of memory on {self.device}: lower the batch size or the patch size "
                                   "(the last checkpoint is kept)") from None
        self.last = {k: float(g[k].detach()) for k in TERMS if k in g}
        self.last["discriminator"] = float(d.detach())
        return self.last["total"]

    def state(self, step: int, run: dict) -> dict:
        return {"step": step, "optimizer": self.opt.state_dict(), "optimizer_d": self.opt_d.state_dict(),
                "scaler": None, "run": run, "nets": self.nets.auxiliary_state()}

    def restore(self, state: dict, source: object) -> int:
        own = self.nets.state_dict()
        aux = state.get("nets") or {}
        missing = sorted(k for k in own if not k.startswith("translator.") and k not in aux)
        if missing or any(aux[k].shape != own[k].shape for k in aux if k in own):
            raise CheckpointError(f"{source}: its training state does not fit the nucleus-aware networks "
                                  f"(missing {missing[:2]} or shapes differ)")
        self.nets.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in aux.items() if k in own}})
        self.opt.load_state_dict(ckpt.optimizer_state_from_json(state["optimizer"]))
        self.opt_d.load_state_dict(ckpt.optimizer_state_from_json(state["optimizer_d"]))
        return int(state["step"])


def iter_measure(sources: Sequence[UnlabeledSource], n: int, size: int, seed: int) -> Iterator[tuple[int, int]]:
    """Measure nucleus statistics on ``n`` seeded tiles of ``size`` px; yields (done, n) after each
    tile and returns the :class:`NucleusStats`."""
    rng = np.random.default_rng([seed, 104729])
    measured = []
    for k in range(n):
        tile = sources[int(rng.integers(len(sources)))].sample(rng, size)
        measured.append(measure_tile(tile))
        yield k + 1, n
    return summarise(measured)


def pretrain_nucleus(sources: Sequence[UnlabeledSource], out: str | os.PathLike,
                     cfg: NucleusPretrainConfig = NucleusPretrainConfig(), *, device: str = "auto",
                     resume: bool = False, overwrite: bool = False, stats: NucleusStats | None = None,
                     inputs: Sequence = ()) -> Iterator[Progress]:
    """Train the nucleus-aware pretext on unlabeled tiles; yields :class:`Progress` events like
    :func:`.training.pretrain`. ``stats`` skips measuring the nucleus statistics (a fresh run
    measures them on ``cfg.stats_tiles`` tiles first; a resumed one reads them from the checkpoint)."""
    if not sources:
        raise DataError("no unlabeled images to pretrain on")
    if cfg.preset not in PRESETS:
        raise DataError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out)
    dev, why = pick_device(device)
    state = prepare_out(out, resume, overwrite, "pretrain", inputs)
    if state is not None:
        pretext = state.get("run", {}).get("pretext", "diffusion")
        if pretext != PRETEXT:
            raise CheckpointError(f"{out}: is a {pretext} pretraining, cannot resume it as {PRETEXT}-aware")
        saved = ckpt.load_config(out)
        ucfg = UNetConfig.from_dict(saved["model"])
        tcfg = TranslationConfig.from_dict(saved["translation"])
        stats = NucleusStats.from_dict(saved["nucleus_stats"])
    else:
        ucfg, tcfg = translator_config(cfg.preset), TranslationConfig.from_preset(cfg.preset)
    multiple = max(ucfg.multiple, 2 ** tcfg.levels)
    if cfg.patch % multiple:
        raise DataError(f"patch size {cfg.patch} must be a multiple of {multiple} for this model")
    if stats is None:
        gen = iter_measure(sources, cfg.stats_tiles, max(cfg.patch, cfg.stats_size), cfg.seed)
        while True:
            try:
                k, n = next(gen)
            except StopIteration as stop:
                stats = stop.value
                break
            yield Progress("pretrain", 0, cfg.steps, activity=f"measuring nuclei {k}/{n}")
    nets = _seeded_nets(ucfg, tcfg, cfg.seed)
    if state is not None:
        nets.translator.load_state_dict(ckpt.load_model(out)[0].state_dict())
    trainer = _GanTrainer(nets, dev, cfg.lr, precision_of(cfg), cfg.weights)
    start = trainer.restore(state, out) if state is not None else 0
    run = {"stage": "pretrain", "pretext": PRETEXT, **asdict(cfg)}
    source_names = [s.name for s in sources]

    def loss_at(step: int):
        rng, gen = _step_rngs(cfg.seed, step, dev)
        tiles = sample_unlabeled_batch(sources, rng, cfg.batch, cfg.patch, cfg.augment)
        masks, targets, _ = draw_batch(stats, rng, cfg.batch, cfg.patch)
        he = torch.from_numpy(to_model_input(tiles)).to(dev)
        return lambda: (he, torch.from_numpy(masks).to(dev), torch.from_numpy(targets).to(dev), gen)

    def save(step: int) -> Path:
        config = {"kind": "pretrain", "pretext": PRETEXT, "model": ucfg.to_dict(), "translation": tcfg.to_dict(),
                  "nucleus_stats": stats.to_dict(), "loss_weights": cfg.weights.to_dict(),
                  "normalization": NORMALIZATION, "patch_size": cfg.patch,
                  "training": {"stage": "pretrain", "pretext": PRETEXT, "steps": step, "seed": cfg.seed,
                               "batch": cfg.batch, "lr": cfg.lr, "losses": dict(trainer.last),
                               "sources": source_names[:50], "n_sources": len(source_names),
                               "device": str(dev), "precision": trainer.precision.name, "time": _now()},
                  "versions": ckpt.versions()}
        return ckpt.save_checkpoint(out, trainer.model, config, trainer.state(step, run))

    msg = (f"nucleus-aware pretraining ({cfg.preset}) on {len(sources)} source(s): pseudo masks of "
           f"~{stats.mean_area:.0f} px nuclei, {stats.density_mean:.1f} per 10,000 px; {why}, {trainer.precision.why}")
    msg += start_note(start, resume, out)
    yield from _run("pretrain", trainer, total=cfg.steps, start=start, lr=cfg.lr, warmup=cfg.warmup,
                    batch=cfg.batch, grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
                    loss_at=loss_at, save=save, message=msg)


def pretext_of(config: dict) -> str:
    """Which pretext a pretraining checkpoint's config was trained with (none recorded: diffusion)."""
    return config.get("pretext") or config.get("training", {}).get("pretext") or "diffusion"


def load_nucleus_nets(path: str | os.PathLike, device: torch.device | str = "cpu"
                      ) -> tuple[TranslationNets, dict]:
    """All the networks of a nucleus-aware checkpoint (the generator side from its training state)."""
    translator, config = ckpt.load_model(path)
    if config.get("kind") != "pretrain" or pretext_of(config) != PRETEXT:
        raise CheckpointError(f"{path}: not a nucleus-aware pretraining checkpoint")
    state = ckpt.load_training_state(path)
    if state is None or not state.get("nets"):
        raise CheckpointError(f"{path}: holds no generator weights (its training state is missing)")
    try:
        tcfg = TranslationConfig.from_dict(config["translation"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: config.json lacks the translation networks ({e})") from None
    nets = TranslationNets(translator, tcfg)
    aux = state["nets"]
    own = nets.state_dict()
    if set(aux) != {k for k in own if not k.startswith("translator.")} or \
            any(aux[k].shape != own[k].shape for k in aux):
        raise CheckpointError(f"{path}: generator weights do not match the architecture in config.json")
    nets.load_state_dict({**own, **aux})
    return nets.to(device).eval(), config


@torch.no_grad()
def nucleus_samples(path: str | os.PathLike, n: int = 4, *, styles: int = 3, size: int | None = None,
                    real: np.ndarray | None = None, seed: int = 0, device: str = "auto") -> np.ndarray:
    """The pretext's visual check as one RGB uint8 picture: ``n`` rows of a pseudo mask followed by
    ``styles`` H&E tiles generated from it with random styles, then (when ``real`` tiles (m, S, S, 3)
    are given) a real tile and the mask the translator predicts for it."""
    from ..pretext.sampling import tile_grid

    dev, _ = pick_device(device)
    nets, config = load_nucleus_nets(path, dev)
    stats = NucleusStats.from_dict(config["nucleus_stats"])
    multiple = max(nets.translator.config.multiple, nets.generator.multiple)
    size = size or (real.shape[1] if real is not None else int(config.get("patch_size", 128)))
    size = max(multiple, size - size % multiple)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    masks, _, _ = draw_batch(stats, rng, n, size)
    m = torch.from_numpy(masks).to(dev)
    cells = []
    with autocast(dev, resolve_precision("auto", dev)):
        fakes = [nets.generator(m, torch.randn(n, nets.cfg.style_dim, device=dev, generator=gen), gen)
                 for _ in range(styles)]
        predicted = None
        if real is not None:
            crops = np.stack([_fit(t, size) for t in real[:n]])
            predicted = nets.translator(torch.from_numpy(to_model_input(crops)).to(dev))[:, :3].argmax(1)
    for i in range(n):
        row = [render_mask(masks[i])] + [_to_uint8(f[i]) for f in fakes]
        if predicted is not None:
            row += ([crops[i], render_mask(predicted[i].cpu().numpy())] if i < len(crops)
                    else [np.full((size, size, 3), 255, np.uint8)] * 2)
        cells += row
    return tile_grid(np.stack(cells), cols=len(cells) // n)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _fit(tile: np.ndarray, size: int) -> np.ndarray:
    """A real tile cropped (centre) or edge-padded to ``size`` x ``size``."""
    h, w = tile.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    tile = tile[y:y + size, x:x + size]
    ph, pw = size - tile.shape[0], size - tile.shape[1]
    return np.pad(tile, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else tile
