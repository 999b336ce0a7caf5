"""The segmentation network a fine-tuning starts from: random weights, a pretraining (diffusion
backbone, GroupNorm pretext or nucleus-aware pretext: all but the head copied) or an earlier
segmentation model (continued); and the frozen-backbone variant, which trains the head alone."""
from __future__ import annotations

import os
from dataclasses import replace

from .. import checkpoint as ckpt
from ..data import NORMALIZATION, TaskSpec
from ..errors import CheckpointError
from ..inference import checkpoint_task
from ..nets.unet import UNet, UNetConfig, seeded_model, segmentation_config, transfer_pretrained

HEAD_MODULES = ("final_block", "final_conv")  # what a frozen-backbone fine-tuning trains


def build_segmentation_model(spec: TaskSpec, init: str | os.PathLike | None, preset: str,
                             seed: int = 0, tile_invariant: bool = True,
                             feature_t: int = 0) -> tuple[UNet, dict, str]:
    """A segmentation U-Net: from scratch, from a pretrained diffusion model (all but the head
    copied), or continuing a segmentation model (all weights, its own architecture). From scratch or
    from a pretraining the network is the tile-invariant one (``unet.segmentation_config``) unless
    ``tile_invariant`` is False; ``feature_t`` is the timestep a new network is told
    (``UNetConfig.feature_t``; a continued segmentation model keeps its own). Returns (model, init
    info, message)."""
    outputs = spec.out_channels

    def seg_config(cfg: UNetConfig) -> UNetConfig:
        cfg = segmentation_config(cfg, outputs) if tile_invariant else cfg.with_outputs(outputs)
        return replace(cfg, feature_t=int(feature_t))

    if init is None:
        model = seeded_model(seg_config(UNetConfig.from_preset(preset, in_channels=3, out_channels=3)), seed)
        return model, {"init": "scratch"}, f"from scratch ({preset})"
    # the checkpoint as it is (its weights checked against its own architecture: one
    # CheckpointError, never load_state_dict's traceback), then the network to train from it
    loaded, init_cfg = ckpt.load_model(init)
    if init_cfg.get("normalization", NORMALIZATION) != NORMALIZATION:
        raise CheckpointError(f"{init}: unsupported input normalisation {init_cfg.get('normalization')!r}")
    segmentation = init_cfg.get("kind") == "segmentation"
    same_head = segmentation and checkpoint_task(init_cfg, init).out_channels == outputs
    if same_head and loaded.config.out_channels != outputs:
        raise CheckpointError(f"{init}: the network has {loaded.config.out_channels} outputs but "
                              f"config.json's task has {outputs}")
    if same_head:
        model = loaded
        how = f"all weights from segmentation model {init}"
    else:
        saved = loaded.config
        model = seeded_model(saved.with_outputs(outputs) if segmentation else seg_config(saved), seed)
        try:
            report = transfer_pretrained(loaded.state_dict(), model)
        except ValueError as e:
            raise CheckpointError(f"{init}: its weights cannot start this network ({e})") from None
        how = f"{len(report['copied'])} tensors from {init_cfg.get('kind')} model {init}, new {spec.num_classes}-class head"
    info = {"init": str(init), "init_kind": init_cfg.get("kind"), "init_training": init_cfg.get("training")}
    return model, info, how


def freeze_backbone(model: UNet) -> int:
    """Stop gradients everywhere but the head (:data:`HEAD_MODULES`); returns the number of
    parameters left to train. Gradients then stop at the head's input, so a step costs little more
    than the forward pass."""
    trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".", 1)[0] in HEAD_MODULES)
        trained += p.numel() if p.requires_grad else 0
    return trained
