"""Checkpoints: a folder with ``model.safetensors`` + ``config.json`` (and, while training,
``training_state.safetensors`` + ``training_state.json`` for resuming).

Nothing here unpickles: tensors go through safetensors, everything else through JSON. A save
writes a complete new folder next to the target (a hidden ``.NAME.<random>.tmp``) and swaps it in
with renames (the previous checkpoint is moved aside to a hidden ``.NAME.<random>.old`` and
deleted once the new one is in place), so a crash leaves either the old checkpoint or the new one,
never a mixture. A crash between the two renames leaves only the ``.old`` copy, which
:func:`resolve` recovers; the next save removes the leftovers of killed saves
(:func:`~.atomic.clean_stale_temps`). Nothing else next to the checkpoint is ever touched.

:func:`is_our_checkpoint` is what ``--force`` may replace: a folder holding nothing but our files.

``config.json`` records the SHA-256 of ``model.safetensors`` (``weights_sha256``); loading verifies
it, and refuses weights that are not finite, so damaged bytes never turn into silent NaN output.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory, normal_permissions, temp_name_pattern
from .errors import CheckpointError
from .nets.unet import UNet, UNetConfig

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
STATE_PREFIX = "training_state."
MODEL_CARD = "MODEL_CARD.md"
#: what a checkpoint folder of ours may hold (besides ``training_state.*``)
OUR_FILES = frozenset({MODEL_FILE, CONFIG_FILE, MODEL_CARD})


def versions() -> dict[str, str]:
    from .. import __version__
    return {"napari_genselfdiff": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _is_checkpoint_folder(path: Path) -> bool:
    return (path.is_dir() and not path.is_symlink() and (path / CONFIG_FILE).is_file()
            and (path / MODEL_FILE).is_file())


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint folder at ``path``, recovering an interrupted swap if needed: when nothing
    is at ``path`` but a save's moved-aside copy is (``.NAME.<random>.old``, or ``NAME.old`` as
    earlier versions named it), the newest such checkpoint folder is renamed back."""
    path = Path(path)
    if os.path.lexists(path) or not path.parent.is_dir():
        return path
    pattern = temp_name_pattern(path.name)
    try:
        names = [e.name for e in os.scandir(path.parent)]
    except OSError:
        return path
    candidates = [path.parent / n for n in names
                  if n == path.name + ".old" or ((m := pattern.fullmatch(n)) and m.group(1) == "old")]
    candidates = [c for c in candidates if _is_checkpoint_folder(c)]
    if candidates:
        newest = max(candidates, key=lambda c: (c / CONFIG_FILE).stat().st_mtime)
        try:
            newest.rename(path)
        except OSError:  # another process recovered it first, or a read-only folder: read it there
            return path if path.exists() else newest
    return path


def foreign_files(path: str | os.PathLike) -> list[str]:
    """The names in the folder ``path`` that no checkpoint of ours holds (anything but plain
    ``model.safetensors``, ``config.json``, ``training_state.*`` and ``MODEL_CARD.md`` files:
    sub-folders and links included), sorted; ``["."]`` when the folder cannot be listed."""
    try:
        return sorted(e.name for e in os.scandir(path)
                      if not (e.name in OUR_FILES or e.name.startswith(STATE_PREFIX))
                      or e.is_symlink() or not e.is_file(follow_symlinks=False))
    except OSError:
        return ["."]


def is_our_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint folder written by genselfdiff and nothing else: a real
    folder (not a link) whose ``config.json`` is a JSON object with a ``kind``, with
    ``model.safetensors``, and holding only plain files of ours (``model.safetensors``,
    ``config.json``, ``training_state.*``, ``MODEL_CARD.md``). Only such a folder may be replaced
    by ``--force``: a user's folder, or a checkpoint they put their own files into, never is."""
    path = Path(path)
    if not _is_checkpoint_folder(path) or foreign_files(path):
        return False
    try:
        if (path / CONFIG_FILE).stat().st_size > 1 << 24:
            return False
        cfg = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("kind"), str)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: dict,
                    training_state: dict | None = None) -> Path:
    """Write ``model``'s weights and ``config`` (plus an optional resumable training state).

    ``training_state`` may hold tensors at any depth of dicts/lists: they are flattened into
    ``training_state.safetensors``; everything else must be JSON-serialisable.

    Written with :func:`~.atomic.atomic_directory`: the leftovers of killed saves to ``path``
    (``.NAME.<random>.tmp`` / ``.old`` nothing has touched for ten minutes) are removed first,
    the previous checkpoint is moved aside to a hidden ``.NAME.<random>.old`` and deleted only
    once the new one is in place. Whether ``path`` may be replaced at all is the caller's
    question (:func:`is_our_checkpoint`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        _save_tensors(state, tmp / MODEL_FILE, path)
        if training_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            skeleton = _split_tensors(training_state, "", tensors)
            _save_tensors(tensors, tmp / STATE_TENSORS, path)
            _write_json(tmp / STATE_JSON, skeleton)
        _write_json(tmp / CONFIG_FILE, {**config, "format_version": FORMAT_VERSION,
                                        "weights_sha256": file_sha256(tmp / MODEL_FILE)})
        normal_permissions(tmp)  # safetensors writes 0600 files
    return path


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path, target: Path) -> None:
    """``save_file``, its I/O failures (safetensors' own error type: a full disk says "No space left
    on device (os error 28)") raised as the OSError they are, naming the checkpoint being saved."""
    try:
        save_file(tensors, str(file))
    except SafetensorError as e:
        import errno
        import re

        code = re.search(r"os error (\d+)", str(e))
        raise OSError(int(code.group(1)) if code else errno.EIO, f"cannot save the checkpoint ({e})",
                      str(target)) from None


def _split_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace tensors by ``{"__tensor__": key}`` placeholders, collecting them in ``out``."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}" if prefix else str(k), out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            name = obj["__tensor__"]
            if not isinstance(name, str) or name not in tensors:
                raise KeyError(f"it names a tensor {name!r} that {STATE_TENSORS} does not hold")
            return tensors[name]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def bundled_models_dir() -> Path:
    """Where the package's own models lie (``resources/models``, a data folder): training never
    writes there."""
    from importlib.resources import files

    return Path(str(files("napari_genselfdiff.resources"))) / "models"


def load_config(path: str | os.PathLike) -> dict:
    path = resolve(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not cfg_file.is_file() or not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (needs {MODEL_FILE} and {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable config ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{cfg_file}: unreadable config (nested too deeply)") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{cfg_file}: config lacks the model architecture ('model')")
    version = cfg.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{cfg_file}: format_version {version!r} is not a whole number (edited?)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer napari-genselfdiff (format {version})")
    return cfg


def load_weights(path: str | os.PathLike, config: dict | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking them against the recorded checksum (when the config
    has one: checkpoints written before it was recorded load unchecked) and that they are finite."""
    path = resolve(path)
    cfg = config if config is not None else load_config(path)
    want = cfg.get("weights_sha256")
    if want and file_sha256(path / MODEL_FILE) != want:
        raise CheckpointError(f"{path / MODEL_FILE}: damaged weights (checksum differs from the one in "
                              f"{CONFIG_FILE}); copy the model again")
    try:
        weights = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / MODEL_FILE}: unreadable weights ({e})") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path / MODEL_FILE}: damaged weights ({len(bad)} tensor(s) hold NaN or "
                              f"infinite values, e.g. {bad[0]!r})")
    return weights


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Build the U-Net described by the checkpoint's config and load its weights. The weights are
    checked first (checksum, finite) and the architecture is laid out on the meta device, where it
    costs no memory, and compared tensor by tensor with them before anything is allocated: an
    edited config (say a width of 100000) is one CheckpointError, never a 160 GB allocation."""
    cfg = load_config(path)
    weights = load_weights(path, cfg)
    try:
        ucfg = UNetConfig.from_dict(cfg["model"])
        with torch.device("meta"):
            layout = {k: tuple(v.shape) for k, v in UNet(ucfg).state_dict().items()}
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: {CONFIG_FILE} describes no valid architecture ({e})") from None
    have = {k: tuple(v.shape) for k, v in weights.items()}
    if have != layout:
        diff = sorted(set(have) ^ set(layout)) or [k for k in layout if layout[k] != have[k]]
        k = diff[0]
        raise CheckpointError(f"{path}: weights do not match the architecture in {CONFIG_FILE} (e.g. {k!r}: "
                              f"config {layout.get(k, 'absent')}, weights {have.get(k, 'absent')}); edited or "
                              "from another model?")
    model = UNet(ucfg)
    model.load_state_dict(weights)
    return model.to(device), cfg


def load_training_state(path: str | os.PathLike) -> dict | None:
    """The resumable state saved with the checkpoint, or None if it has none."""
    path = resolve(path)
    if not (path / STATE_JSON).is_file():
        return None
    try:
        skeleton = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS)) if (path / STATE_TENSORS).is_file() else {}
    except (json.JSONDecodeError, SafetensorError, OSError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({e})") from None
    problem = _training_state_problem(skeleton)
    if problem:
        raise CheckpointError(f"{path}: {STATE_JSON} was edited or damaged ({problem}); start the run again "
                              "with --force instead of --resume")
    try:
        return _join_tensors(skeleton, tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: {STATE_JSON} was edited or damaged ({e.args[0]}); start the run again "
                              "with --force instead of --resume") from None


def _training_state_problem(state: Any) -> str | None:
    """What is wrong with a training state's layout (None: nothing): the step, the optimizer's
    state and parameter groups, the run's settings, as training saves them."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__} instead of an object"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= 10**9:
        return f"step {step!r} is not a whole number from 0 to 10^9"
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        return "the optimizer's state is not the object training writes"
    if not all(isinstance(k, str) and k.isdigit() and isinstance(v, dict) for k, v in opt["state"].items()):
        return "the optimizer's state has entries that are not parameter numbers"
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]):
        return "the optimizer's parameter groups are not lists of parameters"
    if not isinstance(state.get("run", {}), dict):
        return "the run's settings are not an object"
    return None


def optimizer_state_from_json(state: dict) -> dict:
    """Undo JSON's stringification of the optimizer's integer parameter ids."""
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
