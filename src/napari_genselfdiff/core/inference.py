"""A trained segmentation model as a predictor: uint8 RGB tiles in, class probabilities out.

:class:`TorchPredictor` satisfies the tiler's ``Predictor`` protocol (``slide/tiler.py``), so the
same object drives whole-slide prediction, the napari overlay and ``evaluate``.
:func:`predict_padded_batch` is the one way to run any predictor on tiles of any size (padded to
its multiple and cropped back); :func:`cached_predictor` the one predictor cache (a job keeps
the model loaded between calls until its weights change).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .checkpoint import load_model
from .data import NORMALIZATION, TaskSpec, to_model_input
from .device import KEEP_MB, pick_device, tune_allocator
from .errors import CheckpointError, DataError
from .nets.unet import UNet, fused_for_inference
from .precision import autocast, resolve_precision


def checkpoint_task(config: dict, source: object = "checkpoint") -> TaskSpec:
    """The task a segmentation checkpoint's config describes; a :class:`CheckpointError` naming
    ``source`` when its ``task`` entry is missing or malformed (the one check every reader of
    ``config["task"]`` goes through)."""
    task = config.get("task")
    try:
        spec = TaskSpec.from_dict(task)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{source}: config.json has no valid 'task' entry (task, num_classes, "
                              "class_names): not a complete segmentation checkpoint") from None
    if spec.num_classes < 2 or len(spec.class_names) != spec.num_classes:
        raise CheckpointError(f"{source}: config.json's task has {spec.num_classes} classes but "
                              f"{len(spec.class_names)} class names")
    return spec


DEFAULT_OVERLAP = 64
MAX_HALO = 4096  # a recorded overlap beyond this is not a receptive field of ours (an edited config)


#: Test-time augmentation: (flip rows, flip columns, turn 90 degrees) of each view.
TTA_VIEWS = {1: [(False, False, False)],
             2: [(False, False, False), (False, True, False)],
             4: [(False, False, False), (True, False, False), (False, True, False), (True, True, False)],
             8: [(h, w, t) for t in (False, True) for h in (False, True) for w in (False, True)]}


CPU_FORWARD_TILES = 1  # see TorchPredictor.forward_tiles


def as_probabilities(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The network's output as the predictor returns it: softmax over the first ``num_classes``
    channels, a sigmoid on each channel after them (a distance map)."""
    if logits.shape[1] == num_classes:
        return logits.softmax(dim=1)
    return torch.cat([logits[:, :num_classes].softmax(dim=1), logits[:, num_classes:].sigmoid()], dim=1)


class TorchPredictor:
    """Wraps a segmentation U-Net and its checkpoint config. ``source`` names the model in
    errors (the checkpoint folder when loaded with :meth:`from_checkpoint`). ``precision``
    (auto / fp32 / bf16, core/precision.py) chooses the arithmetic: ``auto`` is bf16 where the
    device computes it natively, fp32 elsewhere; ``amp=False`` is fp32. ``self.precision`` says
    which ran and why."""

    def __init__(self, model: torch.nn.Module, config: dict, device: torch.device | str = "cpu",
                 amp: bool = True, batch_size: int = 8, source: str | os.PathLike | None = None,
                 tta: int = 1, fuse: bool = True, precision: str = "auto"):
        self.source = str(source) if source is not None else "the model"
        if config.get("kind") != "segmentation":
            raise CheckpointError(f"{self.source}: a pretraining (diffusion) model, not a segmentation "
                                  "model: fine-tune it first (genselfdiff finetune --init ...)")
        norm = config.get("normalization", NORMALIZATION)
        if norm != NORMALIZATION:
            raise CheckpointError(f"{self.source}: unsupported input normalisation {norm!r} in checkpoint")
        spec = checkpoint_task(config, self.source)
        out_channels = getattr(getattr(model, "config", None), "out_channels", spec.out_channels)
        if out_channels != spec.out_channels:
            raise CheckpointError(f"{self.source}: the network has {out_channels} outputs but config.json's "
                                  f"task has {spec.out_channels}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            tune_allocator(KEEP_MB["predict"])  # tiles without fresh page faults (core/device.py)
        # what runs the forward passes: the same function with frozen BatchNorm folded into the
        # convolutions (core/nets/unet.fused_for_inference), in channels_last layout (on the 2-core CPU:
        # 0.38 -> 0.6-0.7 Mpx/s, benchmarks/speed.py --ceiling); the model itself is left as it is
        self.network, self.channels_last = self.model, False
        if fuse and isinstance(self.model, UNet):
            self.network = fused_for_inference(self.model)
            if self.network is not self.model:
                self.network = self.network.to(memory_format=torch.channels_last)
                self.channels_last = True
        self.precision = resolve_precision(precision if amp else "fp32", self.device)
        # bf16 on the CPU: the fused copy's weights are cast once and activations stay bf16 from
        # input to logits (no per-call weight casts); an unfused model (GroupNorm) runs under autocast
        self.input_dtype = None
        if self.precision.name == "bf16" and self.device.type == "cpu" and self.network is not self.model:
            self.network = self.network.to(torch.bfloat16)
            self.input_dtype = torch.bfloat16
        self.config = config
        self.amp = amp
        self.batch_size = batch_size
        self._threads: int | None = None  # torch's threads before share_cpu took some
        # tiles per forward pass: on a CPU one at a time is faster per pixel than several at once
        # (512-px tiles on the 2-core machine: 1.27 vs 0.92 Mpx/s for 4; the activations of one tile
        # stay in cache); callers still hand over ``batch_size`` tiles per call
        self.forward_tiles = batch_size if self.device.type != "cpu" else min(batch_size, CPU_FORWARD_TILES)
        self.num_classes = spec.num_classes
        self.class_names = list(spec.class_names)
        # output channels: the class probabilities, then (nuclei models that learned one) the
        # distance map, each nucleus's distance to its edge over its largest, in [0, 1]
        self.channels = spec.out_channels
        self.channel_names = list(spec.channel_names)
        self.task = spec.task
        self.tile_multiple = self.model.config.multiple
        self.mpp = config.get("mpp")
        if self.mpp is not None and (isinstance(self.mpp, bool) or not isinstance(self.mpp, (int, float))
                                     or not 0.01 <= self.mpp <= 100):
            raise CheckpointError(f"{self.source}: config.json's mpp {self.mpp!r} is not a pixel size from 0.01 to "
                                  "100 µm/px (edited?)")
        # tile overlap derived from the trained network's effective receptive field (core/nets/receptive.py),
        # recorded by benchmarks/train_defaults.py; checkpoints without one get the old default
        halo = config.get("halo")
        if halo is not None and (type(halo) is not int or not 0 <= halo <= MAX_HALO):
            raise CheckpointError(f"{self.source}: config.json's halo {halo!r} is not a tile overlap from 0 to "
                                  f"{MAX_HALO} px (edited?)")
        self.overlap = int(halo or DEFAULT_OVERLAP)
        # instance rules tuned on the validation images at the end of fine-tuning (core/eval/tuning.py)
        from .eval.postprocess import check_options, options_for
        try:
            raw = config.get("postprocess")
            if raw is not None and not isinstance(raw, dict):
                raise ValueError(f"an object of settings was expected, got {type(raw).__name__}")
            check_options(raw or {})
            self.postprocess_options = options_for(self.task, raw, self.mpp)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.source}: config.json's postprocess settings are invalid ({e}; "
                                  "edited?)") from None
        if tta not in TTA_VIEWS:
            raise ValueError(f"test-time augmentation takes 1, 2, 4 or 8 views, not {tta!r}")
        self.tta = tta

    def overlap_for(self, tile: int, requested: int | None = None) -> tuple[int, str | None]:
        """The overlap to tile with: ``requested`` when the user chose one (>= 0), else the model's
        default for ``tile``-pixel tiles, with a line for the user when that does not fit (then half
        the tile, to the model's multiple: tiling may change the answer a little)."""
        if requested is not None and requested >= 0:
            return requested, None
        if self.overlap < tile:
            return self.overlap, None
        m = self.tile_multiple
        fit = max(0, (tile // 2) // m * m)
        return fit, (f"tile {tile} is too small for this model's overlap of {self.overlap} px (its receptive field): "
                     f"using {fit}; tiles larger than {self.overlap} px (e.g. 512) give the exact answer")

    def share_cpu(self, cores: int) -> None:
        """Leave ``cores`` CPU cores to other work (the labelling of a slide beside its prediction,
        slide/labeller.py) by running on that many fewer threads, at least one; 0 gives them back.
        Two threads fighting a labelling process for two cores ran a tile 2.9x slower than alone,
        one thread beside it 1.7x (benchmarks/RESULTS.md, session 22). torch's thread count is the process's:
        nothing else should run torch meanwhile. Nothing changes on a GPU."""
        if self.device.type != "cpu":
            return
        if cores > 0:
            self._threads = self._threads or torch.get_num_threads()
            torch.set_num_threads(max(1, self._threads - int(cores)))
        elif self._threads:
            torch.set_num_threads(self._threads)
            self._threads = None

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the network on ``x``, averaged over the ``tta`` flipped / turned views
        (each view's prediction turned back first); 1 view = the plain forward pass."""
        total = None
        for flip_h, flip_w, turn in TTA_VIEWS[self.tta]:
            v = x
            if flip_h:
                v = v.flip(2)
            if flip_w:
                v = v.flip(3)
            if turn:
                v = v.rot90(1, (2, 3))
            if self.input_dtype is not None:
                v = v.to(self.input_dtype)
            if self.channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, None if self.input_dtype is not None else self.precision):
                logits = self.network(v)
            p = as_probabilities(logits.float(), self.num_classes)
            if turn:
                p = p.rot90(-1, (2, 3))
            if flip_w:
                p = p.flip(3)
            if flip_h:
                p = p.flip(2)
            total = p if total is None else total + p
        return total / len(TTA_VIEWS[self.tta])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", **kw) -> "TorchPredictor":
        dev, _ = pick_device(device)
        model, cfg = load_model(path, dev)
        kw.setdefault("source", path)
        return cls(model, cfg, dev, **kw)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, channels, H, W) float32: the probabilities of the
        ``num_classes`` classes (softmax), then the distance map of models that have one. Output
        that is not finite (NaN / inf: damaged weights) is a CheckpointError naming the model,
        never a silent all-background prediction."""
        out = []
        for i in range(0, len(tiles), self.forward_tiles):
            x = torch.from_numpy(to_model_input(np.asarray(tiles[i:i + self.forward_tiles]))).to(self.device)
            probs = self._probabilities(x)
            if not bool(torch.isfinite(probs).all()):
                raise CheckpointError(f"{self.source}: the model's output holds NaN or infinite values "
                                      "(damaged or diverged weights); copy the model again or retrain it")
            out.append(probs.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.channels) + tiles.shape[1:3], np.float32)


def predict_padded_batch(predictor, tiles: np.ndarray) -> np.ndarray:
    """Probabilities (B, C, H, W) of a batch of (B, H, W, 3) uint8 tiles of any size: reflect-padded
    to the predictor's ``tile_multiple`` (when it has one) and cropped back. ``predictor`` is a
    :class:`TorchPredictor` or any callable doing the same; a result of the wrong shape is a
    DataError."""
    m = int(getattr(predictor, "tile_multiple", 1) or 1)
    h, w = tiles.shape[1:3]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        tiles = np.pad(tiles, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    probs = np.asarray(predictor(tiles), dtype=np.float32)
    if probs.ndim != 4 or probs.shape[0] != len(tiles):
        raise DataError(f"the predictor returned shape {probs.shape}; expected (B, C, H, W) for {len(tiles)} tiles")
    return probs[:, :, :h, :w]


def predict_image(predictor, image: np.ndarray) -> np.ndarray:
    """Probabilities (C, H, W) for an image small enough to run in one piece (reflect-padded to
    the model's multiple). Whole slides go through ``slide.tiler`` instead."""
    return predict_padded_batch(predictor, np.asarray(image)[None])[0]


class PredictorCache(NamedTuple):
    """A loaded predictor and what it was loaded from: (model folder, device, weights mtime)."""

    key: tuple
    predictor: TorchPredictor


def cached_predictor(model: str | os.PathLike, device: str, cache: PredictorCache | None,
                     **options) -> PredictorCache:
    """A :class:`TorchPredictor` for ``model`` on ``device``, reusing ``cache`` unless it holds
    another model or device, or the weights were rewritten since (a model fine-tuned again into
    the same folder). Pass the returned cache to the next call. ``options`` (``batch_size``,
    ``tta``) go to :meth:`TorchPredictor.from_checkpoint` and are part of the key."""
    weights = Path(model, "model.safetensors")
    key = (os.path.abspath(model), device, weights.stat().st_mtime_ns if weights.is_file() else None,
           *sorted(options.items()))
    if cache is not None and cache.key == key:
        return cache
    return PredictorCache(key, TorchPredictor.from_checkpoint(model, device=device, **options))
