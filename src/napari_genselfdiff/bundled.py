"""The models and sample data shipped inside the package (``resources/``), found without network."""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from .core.errors import CheckpointError


def resources_dir() -> Path:
    return Path(str(files("napari_genselfdiff.resources")))


def sample_image_path() -> Path:
    return resources_dir() / "sample_he.tif"


BACKBONE = "pretrained"  # the pretrained backbone fine-tuning starts from (not a segmentation model)


def _bundled() -> dict[str, Path]:
    """Name -> folder of everything shipped in ``resources/models``: the models and the backbone."""
    from .core.checkpoint import bundled_models_dir

    root = bundled_models_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def bundled_models() -> dict[str, Path]:
    """Name -> checkpoint folder for each default segmentation model shipped in ``resources/models``
    (what Predict and Refine offer; the pretrained backbone is not one of them)."""
    return {name: p for name, p in _bundled().items() if name != BACKBONE}


def bundled_backbone() -> Path | None:
    """The shipped pretrained backbone (``finetune --init pretrained``), if installed."""
    return _bundled().get(BACKBONE)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A bundled model's name ('glands', 'nuclei', 'pretrained') or a checkpoint folder -> the folder."""
    if not str(name_or_path).strip():
        raise CheckpointError("the model is empty: give a checkpoint folder or a bundled model's name")
    models = _bundled()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    from .core.checkpoint import resolve  # a save killed mid-swap: its moved-aside copy is renamed back

    path = resolve(Path(name_or_path))
    if path.is_dir():
        return path
    known = ", ".join(models) or "none are installed"
    raise CheckpointError(f"{name_or_path}: neither a checkpoint folder nor a bundled model ({known})")
