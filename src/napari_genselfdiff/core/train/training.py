"""The two training stages as generators that yield :class:`Progress` events.

The CLI, the napari widgets (through ``thread_worker``) and the tests all drive these same
generators. Cancelling is closing the generator (``gen.close()``, or just dropping it): its
``finally`` saves a checkpoint with everything learned so far, so nothing is lost, and
``resume=True`` continues the same run. Each step draws its batch, timesteps and noise from
random generators seeded with (seed, step), so an interrupted-and-resumed run computes the same
steps as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..data import (NORMALIZATION, AugmentConfig, LabeledImage, TaskSpec, UnlabeledSource, distance_target,
                    sample_labeled_batch, sample_unlabeled_batch, select_fraction, select_fraction_from_names,
                    to_model_input)
from ..device import channels_last_for, tune_allocator
from ..errors import CheckpointError, DataError, GenSelfDiffError
from ..inference import TorchPredictor
from ..nets.unet import PRESETS, UNet, UNetConfig, iter_recalibrate_batchnorm, seeded_model
from ..precision import Precision, autocast, precision_of, resolve_precision
from ..pretext.diffusion import Diffusion, ScheduleConfig
from ..progress import Progress, StopRequested, relay, run_to_end
from ..stain import training_stain
from .stops import StopChecks
from . import ddp
from .losses import build_loss, parse_loss
from .memory import check_step_fits
from .outdir import prepare_out, start_note
from .segmenter import build_segmentation_model, freeze_backbone
from .validation import (VAL_CROP, VAL_CROPS, describe, iter_evaluate_dice, iter_tune_on, pass_cost,
                         validation_crops, validations_left)


@dataclass
class PretrainConfig:
    preset: str = "small"
    steps: int = 1000
    patch: int = 256
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    amp: bool = True  # False: fp32 whatever ``precision`` says
    precision: str = "auto"  # auto / fp32 / bf16 autocast of the forward pass (core/precision.py)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # photometric augmentation is mild for the pretext: the model should learn real H&E colours
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(blur_p=0.0, color_jitter=0.05, stain_p=0.3))


@dataclass
class FinetuneConfig:
    task: str = "glands"
    boundary: bool = False
    boundary_width: int = 1  # pixels of the boundary class the targets were drawn with (recorded)
    distance: bool = False  # nuclei with a boundary class: also learn each nucleus's distance map
    num_classes: int | None = None  # multiclass only
    preset: str = "small"  # used when training from scratch
    steps: int = 500
    patch: int = 256
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    loss: str = "focal+ssl"
    seed: int = 0
    label_fraction: float = 1.0
    checkpoint_every: int = 100
    val_every: int = 100
    # validation scores at most val_crops fixed crops of at most val_crop px (core/train/validation.py);
    # val_crops = 0 scores the whole validation images
    val_crops: int = VAL_CROPS
    val_crop: int = VAL_CROP
    amp: bool = True  # False: fp32 whatever ``precision`` says
    precision: str = "auto"  # auto / fp32 / bf16 autocast of the forward pass (core/precision.py)
    mpp: float | None = None  # microns per pixel of the training images, if known
    # BatchNorm (frozen at inference) and no attention, so tiling cannot change the answer
    # (core/nets/unet.py); False keeps the pretraining architecture (GroupNorm + attention)
    tile_invariant: bool = True
    tune_postprocess: bool = True  # at the end, choose the instance thresholds on the validation images
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); the average is saved
    # train only the head (the final residual block and the classifier) on the frozen features of
    # the rest: seconds from a pretrained backbone, little to overfit with a handful of labels
    freeze_backbone: bool = False
    feature_t: int = 0  # the diffusion timestep a new network is told (UNetConfig.feature_t)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


BN_CALIBRATION_BATCHES = 16  # seeded training batches that fix BatchNorm's frozen statistics


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _step_rngs(seed: int, step: int, device: torch.device, rank=None) -> tuple[np.random.Generator, torch.Generator]:
    if rank is not None:  # under torchrun: each rank its own stream (core/train/ddp.py)
        return ddp.step_rngs(seed, step, rank, device)
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63))
    return np.random.default_rng([seed, step]), g


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Trainer:
    """Optimizer, mixed precision (autocast forward; fp32 weights and loss), checkpoints and resuming."""

    def __init__(self, model: UNet, device: torch.device, lr: float, weight_decay: float, precision: str,
                 ema: float = 0.0, group: ddp.Group | None = None):
        # channels_last: 1.3-1.4x faster steps on the CPU (benchmarks/speed.py); inputs follow the weights
        self.model = model.to(device, memory_format=channels_last_for(device))
        self.stops = StopChecks(self.model)  # Cancel stops inside a step
        tune_allocator()  # no page faults for every step's activations (core/device.py)
        self.group, self.net = group, ddp.wrap(group, self.model)  # torchrun: DDP averages the gradients
        self.stream, self.main = (None, True) if group is None else (group.rank, group.main)
        # exponential moving average of the parameters (BatchNorm statistics are recalibrated for
        # whatever weights are saved, so only parameters are averaged)
        self.ema_decay, self.ema_updates = ema, 0
        self.ema = [p.detach().clone() for p in model.parameters()] if ema > 0 else None
        self.device = device
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.precision: Precision = resolve_precision(precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.name == "fp16" else None  # bf16: no scaling

    def step(self, loss_fn: Callable[[], torch.Tensor], grad_clip: float) -> float:
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        try:
            with self.stops.armed():  # Cancel stops the forward and backward passes between layers
                with autocast(self.device, self.precision):
                    loss = loss_fn()
                if not torch.isfinite(value := ddp.mean(self.group, loss)):  # torchrun: over ranks, all stop
                    raise GenSelfDiffError(f"training diverged (loss {value.item()}); lower the learning rate")
                if self.scaler is not None and self.scaler.is_enabled():
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.opt)
                else:
                    loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            if self.scaler is not None and self.scaler.is_enabled():
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            if self.ema is not None:
                self.ema_updates += 1
                d = min(self.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1 - d)
        except torch.OutOfMemoryError:
            raise GenSelfDiffError(f"out of memory on {self.device}: lower the batch size or the patch size "
                                   "(the last checkpoint is kept)") from None
        return float(value)

    @contextlib.contextmanager
    def averaged(self):
        """The model with its averaged parameters in place (nothing changes without EMA); the
        trained ones are put back afterwards."""
        if self.ema is None:
            yield self.model
            return
        params = list(self.model.parameters())
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.ema):
                p.copy_(e)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def state(self, step: int, run: dict) -> dict:
        return {"step": step, "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "run": run}

    def restore(self, state: dict) -> int:
        """Continue from a saved state; an edited one (parameters that are not this model's, moment
        tensors of the wrong shape) is one CheckpointError, never the optimizer's traceback."""
        try:
            saved = ckpt.optimizer_state_from_json(state["optimizer"])
            params = [p for g in self.opt.param_groups for p in g["params"]]
            for k, v in saved["state"].items():
                bad = [n for n, t in v.items() if torch.is_tensor(t) and t.dim() and t.shape != params[k].shape]
                if bad:
                    raise ValueError(f"parameter {k}'s {bad[0]} does not fit the model")
                if "step" in v and not (torch.is_tensor(v["step"]) or type(v["step"]) in (int, float)):
                    raise ValueError(f"parameter {k}'s step {v['step']!r} is not a number")
            self.opt.load_state_dict(saved)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise CheckpointError(f"the saved training state does not fit this model ({e}); edited? start the "
                                  "run again with --force instead of --resume") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return int(state["step"])


#: The stage after the last step (predicting the validation images, choosing object thresholds)
#: lasts about this many validation passes: the ETA's guess until it runs (measured: 13.6 s after
#: passes of 6-8 s, GlaS, 2-core CPU).
FINISH_PASSES = 2.0
#: Steps of a stage whose pace the ETA trusts over its guess.
PACE_STEPS = 3


def _run(stage: str, trainer: _Trainer, *, total: int, start: int, lr: float, warmup: int, batch: int,
         grad_clip: float, checkpoint_every: int, loss_at: Callable[[int], Callable[[], torch.Tensor]],
         save: Callable[[int], Path], validate: Callable[[], Iterator] | None = None, val_every: int = 0,
         val_cost: float = 0.0, prepare: Callable[[int], Iterator] | None = None,
         finish: Callable[[int], Iterator] | None = None, message: str = "") -> Iterator[Progress]:
    """The loop both stages share: lr schedule, timing, periodic and final checkpoints.

    ``validate()``, ``prepare(step)`` (work a checkpoint at ``step`` needs first: BatchNorm
    statistics) and ``finish(step)`` (work after the last step: choosing the object thresholds)
    are generators yielding (label, done, total); ``validate`` returns the metrics.
    Each of their steps becomes an event with ``activity`` "<label> done/total", so they show
    progress and can be cancelled between steps. The ETA counts the validation passes still to
    come (at the time the last one took, or before the first at ``val_cost`` training steps each)
    and, until it runs, the finishing stage (:data:`FINISH_PASSES` passes). Images per second
    count training time only."""
    step, saved_at, path = start, start, None
    yield Progress(stage, step, total, message=message)
    train_s, steps_run, images, val_s, rate = 0.0, 0, 0, None, 0.0
    finishing = finish is None  # True once the finishing stage (or none) is under way

    def eta(at: int, this_pass: float = 0.0) -> float:
        per_step = train_s / steps_run if steps_run else float("nan")
        per_val = val_s if val_s is not None else val_cost * per_step
        passes = validations_left(at, total, val_every) if validate is not None else 0
        later = 0.0 if finishing else FINISH_PASSES * per_val
        return (total - at) * per_step + passes * per_val + this_pass + later

    def shown(gen: Iterator, at: int, like: float | None = None, guess: float | None = None):
        """Relay ``gen``'s steps as events. The rest of it lasts ``like`` seconds minus the time
        spent when given; else what the pace of its current part (label) says, once
        :data:`PACE_STEPS` steps have set it when there is a ``guess`` (seconds for the whole
        stage: until then, and when a part has ended, at least the guess minus the time spent)."""
        t0, part_t0, part_label = time.perf_counter(), time.perf_counter(), None

        def event(part: tuple[str, int, int]) -> Progress:
            nonlocal part_t0, part_label
            label, k, n = part
            now = time.perf_counter()
            if label != part_label:  # a new part: its own pace
                part_t0, part_label = now, label
            pace = (now - part_t0) / k * (n - k) if k else 0.0
            if like is not None:
                rest = max(like - (now - t0), 0.0)
            elif guess is None or PACE_STEPS <= k < n:
                rest = pace
            else:  # too few steps to trust, or a finished part (the next one is not known yet)
                rest = max(guess - (now - t0), pace)
            return Progress(stage, at, total, lr=rate, eta_s=eta(at, rest), activity=f"{label} {k}/{n}")
        return (yield from relay(gen, event))

    try:
        while step < total:
            rate = _lr_at(step, total, lr, warmup)
            trainer.set_lr(rate)
            t0 = time.perf_counter()
            try:
                loss = trainer.step(loss_at(step), grad_clip)
            except StopRequested:  # cancelled in the middle of a step: not taken; what was learned is saved
                return
            train_s += time.perf_counter() - t0
            step, steps_run, images = step + 1, steps_run + 1, images + batch
            ips = images / train_s if train_s > 0 else 0.0
            event = Progress(stage, step, total, loss, rate, ips, eta(step))
            if checkpoint_every and step % checkpoint_every == 0 and step < total:
                if prepare is not None:
                    yield from shown(prepare(step), step)
                event.checkpoint, saved_at = str(save(step)), step
            if validate is not None and val_every and (step % val_every == 0 or step == total):
                t_val = time.perf_counter()
                event.metrics = yield from shown(validate(), step, val_s)
                val_s = time.perf_counter() - t_val
                event.eta_s = eta(step)
            yield event
        guess = eta(step)  # no steps or validations left: the finishing stage's guess
        finishing = True
        if finish is not None and step >= total:
            yield from shown(finish(step), step, guess=guess)
        if prepare is not None:
            yield from shown(prepare(step), step)
        yield Progress(stage, step, total, lr=rate, eta_s=eta(step), activity="saving the checkpoint")
        path, saved_at = save(step), step
    finally:
        if step > saved_at:  # cancelled or failed: keep what was learned
            ddp.abandon(trainer.group)  # under torchrun the others may be gone: rank 0 saves alone
            try:
                save(step)
            except Exception as e:  # never mask the original error
                warnings.warn(f"could not save the checkpoint after stopping: {e}")
    yield Progress(stage, step, total, checkpoint=str(path), done=True, message=f"saved {path}")


# ---------------------------------------------------------------------------------------------
# stage 1: diffusion pretraining on unlabeled tiles

def pretrain(sources: Sequence[UnlabeledSource], out: str | os.PathLike, cfg: PretrainConfig = PretrainConfig(), *,
             device: str = "auto", resume: bool = False, overwrite: bool = False,
             model_config: UNetConfig | None = None, inputs: Sequence = ()) -> Iterator[Progress]:
    """Train a U-Net to predict the noise added to unlabeled tiles (the self-supervised pretext)."""
    if not sources:
        raise DataError("no unlabeled images to pretrain on")
    out = Path(out)
    dev, why, group = ddp.place(device, cfg.batch)  # group: None outside torchrun
    state = prepare_out(out, resume, overwrite, "pretrain", inputs)
    if state is not None:
        if state.get("run", {}).get("pretext", "diffusion") != "diffusion":
            raise CheckpointError(f"{out}: is a {state['run']['pretext']} pretraining, cannot resume it as diffusion")
        saved = ckpt.load_config(out)
        ucfg = UNetConfig.from_dict(saved["model"])
        try:
            cfg = replace(cfg, schedule=ScheduleConfig.from_dict(saved.get("schedule", {})))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{out}: config.json's {e} (edited?)") from None
    else:
        ucfg = model_config or UNetConfig.from_preset(cfg.preset, in_channels=3, out_channels=3)
    if cfg.patch % ucfg.multiple:
        raise DataError(f"patch size {cfg.patch} must be a multiple of {ucfg.multiple} for this model")
    # resuming: the saved weights, checked against the saved architecture (one CheckpointError)
    model = ckpt.load_model(out)[0] if state is not None else seeded_model(ucfg, cfg.seed)
    diffusion = Diffusion(cfg.schedule).to(dev)
    trainer = _Trainer(model, dev, cfg.lr, cfg.weight_decay, precision_of(cfg), group=group)
    check_step_fits(model, dev, trainer.precision, ddp.share(group, cfg.batch), cfg.patch, timestep=True)
    start = trainer.restore(state) if state is not None else 0
    run = {"stage": "pretrain", "pretext": "diffusion", **asdict(cfg)}
    source_names = [s.name for s in sources]

    def loss_at(step: int):
        rng, gen = _step_rngs(cfg.seed, step, dev, trainer.stream)
        batch = sample_unlabeled_batch(sources, rng, ddp.share(group, cfg.batch), cfg.patch, cfg.augment)
        x0 = torch.from_numpy(to_model_input(batch)).to(dev)
        return lambda: diffusion.loss(trainer.net, x0, generator=gen)

    def save(step: int) -> Path:
        config = {"kind": "pretrain", "pretext": "diffusion", "model": ucfg.to_dict(), "schedule": cfg.schedule.to_dict(),
                  "normalization": NORMALIZATION, "patch_size": cfg.patch,
                  "training": {"stage": "pretrain", "steps": step, "seed": cfg.seed, "batch": cfg.batch,
                               "lr": cfg.lr, "sources": source_names[:50], "n_sources": len(source_names),
                               "precision": trainer.precision.name, "time": _now(), **ddp.provenance(group, dev)},
                  "versions": ckpt.versions()}
        return ddp.save(group, out, trainer.model, config, trainer.state(step, run))  # torchrun: rank 0 writes

    msg = f"pretraining {ucfg.preset or 'custom'} U-Net on {len(sources)} source(s), {why}, {trainer.precision.why}"
    msg += start_note(start, resume, out)
    if state is not None and model_config is None and cfg.preset in PRESETS and \
            UNetConfig.from_preset(cfg.preset, in_channels=3, out_channels=3) != ucfg:
        msg += (f" with the checkpoint's own architecture (mults {list(ucfg.mults)}, base {ucfg.base}), "
                f"not the {cfg.preset!r} preset asked for")
    yield from _run("pretrain", trainer, total=cfg.steps, start=start, lr=cfg.lr, warmup=cfg.warmup,
                    batch=cfg.batch, grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
                    loss_at=loss_at, save=save, message=msg)


# ---------------------------------------------------------------------------------------------
# stage 2: segmentation fine-tuning on a few labeled tiles

def finetune(items: Sequence[LabeledImage], out: str | os.PathLike, cfg: FinetuneConfig = FinetuneConfig(), *,
             init: str | os.PathLike | None = None, val_items: Sequence[LabeledImage] = (), device: str = "auto",
             resume: bool = False, overwrite: bool = False, val_instances: dict[str, np.ndarray] | None = None,
             inputs: Sequence = ()) -> Iterator[Progress]:
    """Fine-tune for segmentation with ``cfg.loss`` (focal + SSL by default); t = 0 throughout.

    With validation images, the final checkpoint's post-processing thresholds are tuned on them
    (:mod:`..eval.tuning`; ``val_instances`` by image name are their true objects where known, else
    they are recovered from the targets)."""
    spec = TaskSpec.make(cfg.task, cfg.boundary, cfg.num_classes, cfg.boundary_width, cfg.distance)
    parse_loss(cfg.loss)  # fail before any work on a typo
    if not items:
        raise DataError("no labeled images to fine-tune on")
    if all(not (it.target > 0).any() for it in items):
        raise DataError("every training mask is empty: there is nothing to learn (draw some labels first)")
    out = Path(out)
    dev, why, group = ddp.place(device, cfg.batch)  # group: None outside torchrun
    state = prepare_out(out, resume, overwrite, "finetune", [*inputs, init])
    train = items
    if state is None and cfg.label_fraction < 1:
        train = select_fraction(items, cfg.label_fraction, cfg.seed)
    if state is not None:
        model, _ = ckpt.load_model(out)
        saved = ckpt.load_config(out)
        init_info, how = saved["training"].get("init_info", {}), f"resumed {out}"
        train = select_fraction_from_names(items, saved["training"].get("train_images"))
    else:
        model, init_info, how = build_segmentation_model(spec, init, cfg.preset, cfg.seed, cfg.tile_invariant,
                                                         cfg.feature_t)
    if cfg.patch % model.config.multiple:
        raise DataError(f"patch size {cfg.patch} must be a multiple of {model.config.multiple} for this model")
    if cfg.freeze_backbone:
        how += f"; backbone frozen, {freeze_backbone(model)} head parameters trained"
    trainer = _Trainer(model, dev, cfg.lr, cfg.weight_decay, precision_of(cfg), ema=cfg.ema, group=group)
    check_step_fits(model, dev, trainer.precision, ddp.share(group, cfg.batch), cfg.patch)
    start = trainer.restore(state) if state is not None else 0
    loss_fn, bw = build_loss(cfg.loss, spec.num_classes), spec.boundary_width if spec.boundary else 0
    run = {"stage": "finetune", **asdict(cfg)}
    latest: dict = dict(saved.get("validation") or {}) if state is not None else {}  # a resumed run keeps its scores
    # the training images' stain, which --stain-normalize moves other images to (core/stain.py)
    stain_targets = training_stain(train)

    def loss_at(step: int):
        calibrated["trained_to"] = step + 1
        rng, _ = _step_rngs(cfg.seed, step, dev, trainer.stream)
        imgs, tgts = sample_labeled_batch(train, rng, ddp.share(group, cfg.batch), cfg.patch, cfg.augment, bw)
        x = torch.from_numpy(to_model_input(imgs)).to(dev)
        y = torch.from_numpy(tgts.astype(np.int64)).to(dev)
        d = torch.from_numpy(distance_target(tgts)).to(dev) if spec.distance else None
        return lambda: loss_fn(trainer.net(x), y, d)

    def config_at(step: int) -> dict:
        return {"kind": "segmentation", "model": model.config.to_dict(), "normalization": NORMALIZATION,
                "task": spec.to_dict(), "patch_size": cfg.patch, "mpp": cfg.mpp,
                "training": {"stage": "finetune", "steps": step, "seed": cfg.seed, "loss": cfg.loss,
                             "label_fraction": cfg.label_fraction, "train_images": [it.name for it in train],
                             "val_images": [it.name for it in val_items], "init_info": init_info,
                             "batch": cfg.batch, "lr": cfg.lr, "precision": trainer.precision.name, "time": _now(),
                             **ddp.provenance(group, dev)},
                "validation": latest, "stain_targets": stain_targets, "versions": ckpt.versions(), **tuned}

    calibrated = {"step": None, "trained_to": start}

    def iter_calibrate(step: int) -> Iterator[int]:
        """Frozen BatchNorm statistics for the weights at ``step`` (core/nets/unet.recalibrate_batchnorm),
        from fixed, seeded training batches: deterministic, so resuming stays exact. Yields the
        batches done (of BN_CALIBRATION_BATCHES); closed early, the statistics count as not made."""
        if calibrated["step"] == step:
            return
        calibrated["step"] = None

        def batches():
            for k in range(BN_CALIBRATION_BATCHES):
                imgs, _ = sample_labeled_batch(train, np.random.default_rng([cfg.seed, 7919, k]), cfg.batch,
                                               cfg.patch, replace(cfg.augment, scale=0.0))  # at its own scale
                yield torch.from_numpy(to_model_input(imgs)).to(dev)

        gen = iter_recalibrate_batchnorm(trainer.model, batches())
        try:
            while True:
                with autocast(dev, trainer.precision if dev.type == "cuda" else None):  # per batch; CPU: fp32
                    k = next(gen, None)
                if k is None:
                    break
                yield k
        finally:
            gen.close()
        ddp.sync_buffers(group, trainer.model)  # under torchrun: the same everywhere, bit for bit
        calibrated["step"] = step

    def calibrate(step: int) -> None:
        run_to_end(iter_calibrate(step))

    tuned: dict = {}
    tunes = bool(val_items) and cfg.tune_postprocess and spec.task in ("glands", "nuclei") and trainer.main

    def iter_tune(step: int) -> Iterator[tuple[str, int, int]]:
        """Instance thresholds for the final (averaged) weights, chosen on the validation images
        (only rank 0 writes them): a stage of its own, shown step by step."""
        with trainer.averaged():
            calibrated["step"] = None if trainer.ema is not None else calibrated["step"]
            yield from relay(iter_calibrate(step), lambda k: ("BatchNorm statistics", k, BN_CALIBRATION_BATCHES))
            predictor = TorchPredictor(trainer.model, config_at(0), dev, precision=precision_of(cfg))
            options, report = yield from iter_tune_on(predictor, val_items, val_instances, spec.task, cfg.mpp)
        calibrated["averaged"] = step  # the statistics are the averaged weights': the save right after keeps them
        if options:
            tuned.update(postprocess=options, postprocess_tuning=report)

    def save(step: int) -> Path:
        # with EMA the averaged weights are saved (a resumed run continues from them)
        with trainer.averaged():
            if trainer.ema is not None and calibrated.get("averaged") != step:
                calibrated["step"] = None
            calibrate(step)  # (thresholds are chosen in their own stage, iter_tune; cancelled, the defaults stay)
            path = ddp.save(group, out, trainer.model, config_at(step), trainer.state(step, run))
        if trainer.ema is not None:
            calibrated["step"] = None
        return path

    val_set = validation_crops(val_items, cfg.val_crops, cfg.val_crop, cfg.seed)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    val_cost = pass_cost(val_set, cfg.batch * cfg.patch ** 2, BN_CALIBRATION_BATCHES if has_bn else 0)

    def validate() -> Iterator[tuple[str, int, int]]:
        """Validation Dice on ``val_set``; yields ("BatchNorm statistics" | "validating", done, total)."""
        with trainer.averaged():
            if trainer.ema is not None:
                calibrated["step"] = None
            n_bn = BN_CALIBRATION_BATCHES if has_bn and calibrated["step"] != calibrated["trained_to"] else 0
            yield from relay(iter_calibrate(calibrated["trained_to"]), lambda k: ("BatchNorm statistics", k, n_bn))
            predictor = TorchPredictor(trainer.model, config_at(0), dev, precision=precision_of(cfg))
            scores = yield from relay(iter_evaluate_dice(predictor, val_set), lambda kn: ("validating", *kn))
            latest.update(scores, val_crop=cfg.val_crop if cfg.val_crops > 0 else 0)
        if trainer.ema is not None:
            calibrated["step"] = None
        return dict(latest)

    on = f", validating on {describe(val_items, val_set, cfg.val_crops, cfg.val_crop)}" if val_items else ""
    msg = (f"fine-tuning for {spec.task} ({spec.num_classes} classes) on {len(train)} image(s){on}; {how}; {why}, "
           f"{trainer.precision.why}{start_note(0, resume and state is None, out)}")
    yield from _run("finetune", trainer, total=cfg.steps, start=start, lr=cfg.lr, warmup=cfg.warmup,
                    batch=cfg.batch, grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
                    loss_at=loss_at, save=save, validate=validate if val_items else None,
                    val_every=cfg.val_every, val_cost=val_cost, message=msg,
                    prepare=None if trainer.ema is not None else lambda step: relay(
                        iter_calibrate(step), lambda k: ("BatchNorm statistics", k, BN_CALIBRATION_BATCHES)),
                    finish=iter_tune if tunes else None)
