"""The model chooser Predict and Refine share: bundled models, recently trained ones and any
checkpoint folder, each listed with what it is -- task, the resolution it runs at (um/px and
the magnification that is), validation Dice, training date -- and its model card
(``MODEL_CARD.md`` in the model folder, when there is one) a button away.

:class:`ModelInfo` reads a checkpoint's ``config.json`` without loading weights; a folder it
cannot read is listed with the reason instead of the facts.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (QComboBox, QDialog, QFileDialog, QPushButton, QTextBrowser, QVBoxLayout, QWidget)

from ..core.errors import describe_json_error
from .inputs import info_label, row

MODEL_CARD = "MODEL_CARD.md"
#: Microns per pixel of a 10x objective's image (so 0.25 um/px is about 40x, 0.5 about 20x).
MPP_AT_10X = 1.0


def magnification(mpp: float) -> str:
    """The objective an image of ``mpp`` microns per pixel is usually scanned with: '~20x'."""
    mag = 10.0 * MPP_AT_10X / mpp
    return f"~{mag:.0f}x" if mag >= 2 else f"~{mag:.1f}x"


def fmt_mpp(mpp: float | None) -> str:
    """A resolution as a person reads it: '0.50 um/px (~20x)'; 'unknown resolution' for None."""
    if not mpp:
        return "unknown resolution"
    return f"{mpp:.2f} µm/px ({magnification(mpp)})"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint folder says about itself (from its ``config.json``)."""

    path: Path
    name: str  # as listed: the folder name, or '<name> (bundled)'
    kind: str | None = None  # 'segmentation' or 'pretrain'
    task: str | None = None
    mpp: float | None = None
    val_dice: float | None = None
    n_val: int | None = None
    val_unit: str = "images"  # or "crops" (fine-tuning validates on fixed crops by default)
    test_dice: float | None = None
    date: str | None = None  # the day it was trained (YYYY-MM-DD)
    card: Path | None = None
    problem: str | None = None  # why the config could not be read

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> ModelInfo:
        path = Path(path)
        name = name or display_name(path)
        card = path / MODEL_CARD if (path / MODEL_CARD).is_file() else None
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as e:
            return cls(path, name, card=card, problem=f"config.json unreadable ({describe_json_error(e)})")
        task = cfg.get("task")
        task = task.get("task") if isinstance(task, dict) else task
        validation = cfg.get("validation") if isinstance(cfg.get("validation"), dict) else {}
        tests = cfg.get("test_metrics") if isinstance(cfg.get("test_metrics"), dict) else {}
        training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
        date = training.get("time")
        if not isinstance(date, str) or len(date) < 10:
            weights = path / "model.safetensors"
            date = datetime.fromtimestamp(weights.stat().st_mtime).isoformat() if weights.is_file() else None
        n_val = validation.get("n_val")
        return cls(path, name, kind=cfg.get("kind"), task=task if isinstance(task, str) else None,
                   mpp=_number(cfg.get("mpp")), val_dice=_number(validation.get("val_dice")),
                   n_val=int(n_val) if isinstance(n_val, (int, float)) else None,
                   val_unit="crops" if validation.get("val_crop") else "images",
                   test_dice=_number(tests.get("dice")), date=date[:10] if date else None, card=card)

    @property
    def segments(self) -> bool:
        return self.kind == "segmentation"

    def summary(self) -> str:
        """One line for the list: 'glands · 1.24 um/px (~8x) · Dice 0.85 · 2026-12-01'."""
        if self.problem:
            return self.problem
        if self.kind == "pretrain":
            return "no segmentation yet: Refine learns it from the regions you label"
        if not self.segments:
            return f"{self.kind or 'unknown'} model (not a segmentation model)"
        parts = [self.task or "task unknown", fmt_mpp(self.mpp)]
        if self.val_dice is not None:
            parts.append(f"Dice {self.val_dice:.2f}")
        if self.date:
            parts.append(self.date)
        return " · ".join(parts)

    def details(self) -> str:
        """The facts under the chooser (rich text)."""
        if self.problem:
            return f"<b>{html.escape(self.name)}</b>: {html.escape(self.problem)}"
        what = "pretrained backbone" if self.kind == "pretrain" else self.task or self.kind or "model"
        lines = [f"<b>{html.escape(what)}</b>"
                 + (f", runs at {fmt_mpp(self.mpp)}" if self.segments else f" ({html.escape(self.summary())})")]
        scores = []
        if self.val_dice is not None:
            scores.append(f"validation Dice {self.val_dice:.3f}" + (f" ({self.n_val} {self.val_unit})" if self.n_val else ""))
        if self.test_dice is not None:
            scores.append(f"test Dice {self.test_dice:.3f}")
        lines.append(" · ".join(scores) or "no validation score recorded")
        lines.append(f"trained {self.date}" if self.date else "training date unknown")
        return "<br>".join(lines)

    def listed(self) -> str:
        return f"{self.name} — {self.summary()}"


def display_name(path: Path) -> str:
    """A checkpoint folder's name in a list: a project's refined models are all called
    ``refine-<n>``, so theirs carries the project's name ('study-A / refine-1')."""
    parent = path.parent
    if parent.name == "models" and (parent.parent / "project.json").is_file():
        return f"{parent.parent.name} / {path.name}"
    return path.name


class ModelCardDialog(QDialog):
    """A model's ``MODEL_CARD.md``, rendered (non-modal: the viewer stays usable)."""

    def __init__(self, info: ModelInfo, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(f"Model card: {info.name}")
        self.text = QTextBrowser()
        self.text.setOpenExternalLinks(True)
        self.text.setMarkdown(info.card.read_text(encoding="utf-8", errors="replace"))
        lay = QVBoxLayout(self)
        lay.addWidget(self.text)
        self.resize(640, 720)


class ModelChooser(QWidget):
    """A list of models with what each is, a "…" button for any checkpoint folder and a *Model
    card* button. ``changed(path or None)`` follows the choice.

    ``allow_none`` puts a first entry without a model (a project may start without one). For
    the places that used a path field, :meth:`text` / :meth:`setText` take a folder, a bundled
    model's name or '' (no model).
    """

    changed = Signal(object)

    def __init__(self, allow_none: bool = False, none_text: str = "(no model)", parent: QWidget | None = None):
        super().__init__(parent)
        self.allow_none, self.none_text = allow_none, none_text
        self._bundled: dict[str, Path] = {}
        self._infos: dict[str, ModelInfo] = {}
        self.card_dialog: ModelCardDialog | None = None
        self.combo = QComboBox()
        self.combo.setToolTip("a bundled model, a recently trained one, or any checkpoint folder (…)")
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(16)
        self.browse = QPushButton("…")
        self.browse.setFixedWidth(30)
        self.browse.setToolTip("choose a checkpoint folder")
        self.browse.clicked.connect(self._browse)
        self.card_btn = QPushButton("Model card")
        self.card_btn.setToolTip(f"what the model is, how it was trained and its limits ({MODEL_CARD})")
        self.card_btn.clicked.connect(lambda: self.show_card())
        self.info = info_label()
        top = row(self.combo, self.browse, self.card_btn)
        top.layout().setStretch(0, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(top)
        lay.addWidget(self.info)
        self.combo.currentIndexChanged.connect(self._on_index)
        self._on_index()

    # -- the list ----------------------------------------------------------------------------

    def fill(self, bundled: dict[str, Path], recent: list[str] = ()) -> None:
        """The bundled models, then the recent ones that still exist (the choice is kept if it
        is still offered)."""
        current = self.model_path()
        self.combo.blockSignals(True)
        self.combo.clear()
        self._infos.clear()
        self._bundled = {name: Path(p) for name, p in bundled.items()}
        if self.allow_none:
            self.combo.addItem(self.none_text, None)
        for name, path in self._bundled.items():
            self._add(str(path), f"{name} (bundled)")
        for path in recent:
            if Path(path, "config.json").is_file():
                self._add(path)
        i = self.combo.findData(current)
        self.combo.setCurrentIndex(max(i, 0))
        self.combo.blockSignals(False)
        self._on_index()

    def _add(self, path: str, name: str | None = None) -> int:
        i = self.combo.findData(path)
        if i >= 0:
            return i
        info = ModelInfo.read(path, name)
        self._infos[path] = info
        self.combo.addItem(info.listed(), path)
        i = self.combo.count() - 1
        self.combo.setItemData(i, f"{path}\n{info.summary()}", Qt.ItemDataRole.ToolTipRole)
        return i

    def add_model(self, path: str, select: bool = True) -> None:
        """Offer the checkpoint folder ``path`` (once) and, by default, choose it."""
        i = self._add(str(path))
        if select:
            self.combo.setCurrentIndex(i)

    def model_path(self) -> str | None:
        return self.combo.currentData()

    def info_of(self, path: str | None = None) -> ModelInfo | None:
        """What the chosen model (or the one at ``path``) is."""
        path = self.model_path() if path is None else path
        return self._infos.get(path) if path else None

    def bundled_for(self, task: str) -> str | None:
        """The bundled model of ``task``, if one is offered."""
        return next((str(p) for p in self._bundled.values()
                     if self.info_of(str(p)) and self.info_of(str(p)).task == task), None)

    def prefer_task(self, task: str) -> None:
        """When a bundled model of another task is chosen, choose the one of ``task`` instead."""
        info = self.info_of()
        if info is not None and str(info.path) in {str(p) for p in self._bundled.values()} and info.task != task:
            other = self.bundled_for(task)
            if other:
                self.combo.setCurrentIndex(self.combo.findData(other))

    # -- the path-field face (Refine's model used to be one) ----------------------------------

    def text(self) -> str:
        return self.model_path() or ""

    def setText(self, value: str) -> None:  # noqa: N802 (the path field's name)
        """Choose a checkpoint folder or a bundled model by name; '' chooses no model."""
        if not value:
            if self.allow_none:
                self.combo.setCurrentIndex(0)
            return
        if value in self._bundled:
            value = str(self._bundled[value])
        self.add_model(value)

    def restore_and_follow(self, settings, key: str) -> None:
        """Choose the remembered model (a folder that still is a checkpoint, or a bundled name),
        then remember every choice (``Settings.bind`` calls this)."""
        value = settings.get(key)
        if isinstance(value, str) and (value in self._bundled or Path(value, "config.json").is_file()):
            self.setText(value)
        self.changed.connect(lambda path: settings.set(key, path or ""))

    # -- what the choice is ----------------------------------------------------------------------

    def _on_index(self, *_) -> None:
        info = self.info_of()
        if info is None:
            self.info.setText("no model chosen" if self.combo.count() else "no model found: choose a checkpoint "
                              "folder (…)")
        else:
            self.info.setText(info.details())
        self.info.setToolTip("" if info is None else str(info.path))
        self.card_btn.setEnabled(info is not None and info.card is not None)
        self.card_btn.setToolTip(f"open {info.card}" if info is not None and info.card else
                                 f"this model has no {MODEL_CARD}")
        self.changed.emit(self.model_path())

    def show_card(self) -> ModelCardDialog | None:
        """Open the chosen model's card (None when it has none)."""
        info = self.info_of()
        if info is None or info.card is None:
            return None
        if self.card_dialog is not None:
            self.card_dialog.close()
        self.card_dialog = ModelCardDialog(info, self)
        self.card_dialog.show()
        return self.card_dialog

    def _browse(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, "Choose a model (checkpoint folder)", str(Path.home()))
        if chosen:
            self.add_model(chosen)
