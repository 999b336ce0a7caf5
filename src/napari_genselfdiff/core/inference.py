"""A trained segmentation model as a predictor: uint8 RGB tiles in, class probabilities out.

:class:`TorchPredictor` satisfies the tiler's ``Predictor`` protocol (``slide/tiler.py``), so the
same object drives whole-slide prediction, the napari overlay and ``evaluate``.
:func:`predict_padded_batch` is the one way to run any predictor on tiles of any size (padded to
its multiple and cropped back); :func:`cached_predictor` the one predictor cache (a job keeps
the model loaded between calls until its weights change).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .checkpoint import load_model
from .data import NORMALIZATION, to_model_input
from .device import pick_device
from .errors import CheckpointError, DataError


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA GPUs that support it (fp16 otherwise); nothing on CPU/MPS."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class TorchPredictor:
    """Wraps a segmentation U-Net and its checkpoint config."""

    def __init__(self, model: torch.nn.Module, config: dict, device: torch.device | str = "cpu",
                 amp: bool = True, batch_size: int = 8):
        if config.get("kind") != "segmentation":
            raise CheckpointError("this checkpoint is a pretraining (diffusion) model, not a segmentation "
                                  "model: fine-tune it first (genselfdiff finetune --init ...)")
        norm = config.get("normalization", NORMALIZATION)
        if norm != NORMALIZATION:
            raise CheckpointError(f"unsupported input normalisation {norm!r} in checkpoint")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.amp = amp
        self.batch_size = batch_size
        self.num_classes = int(config["task"]["num_classes"])
        self.class_names = list(config["task"]["class_names"])
        self.task = config["task"]["task"]
        self.tile_multiple = self.model.config.multiple
        self.mpp = config.get("mpp")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto", **kw) -> "TorchPredictor":
        dev, _ = pick_device(device)
        model, cfg = load_model(path, dev)
        return cls(model, cfg, dev, **kw)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, C, H, W) float32 probabilities (softmax over C)."""
        out = []
        for i in range(0, len(tiles), self.batch_size):
            x = torch.from_numpy(to_model_input(np.asarray(tiles[i:i + self.batch_size]))).to(self.device)
            with autocast_for(self.device, self.amp):
                logits = self.model(x)
            out.append(logits.float().softmax(dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_classes) + tiles.shape[1:3], np.float32)


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


def cached_predictor(model: str | os.PathLike, device: str, cache: PredictorCache | None) -> PredictorCache:
    """A :class:`TorchPredictor` for ``model`` on ``device``, reusing ``cache`` unless it holds
    another model or device, or the weights were rewritten since (a model fine-tuned again into
    the same folder). Pass the returned cache to the next call."""
    weights = Path(model, "model.safetensors")
    key = (os.path.abspath(model), device, weights.stat().st_mtime_ns if weights.is_file() else None)
    if cache is not None and cache.key == key:
        return cache
    return PredictorCache(key, TorchPredictor.from_checkpoint(model, device=device))
