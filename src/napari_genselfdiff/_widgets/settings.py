"""Widget settings remembered between sessions: one JSON file, one section per widget."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from qtpy.QtCore import QStandardPaths, Qt
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

from ..core.atomic import write_json_atomic
from .inputs import PathEdit

log = logging.getLogger(__name__)

CONFIG_ENV = "GENSELFDIFF_CONFIG_DIR"
SETTINGS_FILE = "widgets.json"


def config_dir() -> Path:
    """Where the widgets keep their settings: ``$GENSELFDIFF_CONFIG_DIR`` or the user's config dir."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericConfigLocation)
    return Path(base or Path.home() / ".config") / "napari-genselfdiff"


class Settings:
    """One widget's section of a small JSON file; every change is written at once (atomically)."""

    def __init__(self, section: str, path: Path | None = None):
        self.section = section
        self.path = path or config_dir() / SETTINGS_FILE

    def _read_all(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError, RecursionError):
            return {}  # missing or damaged settings are not worth an error: defaults apply

    def get(self, key: str, default: Any = None) -> Any:
        return self._read_all().get(self.section, {}).get(key, default)

    def set(self, key: str, value: Any) -> None:
        data = self._read_all()
        data.setdefault(self.section, {})[key] = value
        try:
            write_json_atomic(self.path, data)
        except OSError as e:  # a read-only home must not break the widget
            log.warning("could not save settings to %s: %s", self.path, e)

    def bind(self, key: str, widget: QWidget) -> None:
        """Restore ``widget``'s value from the settings, then save it on every change."""
        if callable(getattr(widget, "restore_and_follow", None)):  # e.g. the model chooser
            widget.restore_and_follow(self, key)
            return
        value = self.get(key)
        if isinstance(widget, QSpinBox):
            if isinstance(value, int):
                widget.setValue(value)
            widget.valueChanged.connect(lambda v: self.set(key, int(v)))
        elif isinstance(widget, QDoubleSpinBox):
            if isinstance(value, (int, float)):
                widget.setValue(float(value))
            widget.valueChanged.connect(lambda v: self.set(key, float(v)))
        elif isinstance(widget, QCheckBox):
            if isinstance(value, bool):
                widget.setChecked(value)
            widget.toggled.connect(lambda v: self.set(key, bool(v)))
        elif isinstance(widget, QComboBox):
            if isinstance(value, str):
                i = widget.findText(value)
                enabled = i >= 0 and bool(widget.model().flags(widget.model().index(i, 0)) & Qt.ItemFlag.ItemIsEnabled)
                if enabled:  # e.g. a remembered "cuda" on a machine without a GPU stays "auto"
                    widget.setCurrentIndex(i)
                elif widget.isEditable():
                    widget.setEditText(value)
            widget.currentTextChanged.connect(lambda v: self.set(key, v))
        elif isinstance(widget, (QLineEdit, PathEdit)):
            edit = widget if isinstance(widget, QLineEdit) else widget.edit
            if isinstance(value, str):
                edit.setText(value)
            edit.textChanged.connect(lambda v: self.set(key, v))
        else:
            raise TypeError(f"cannot remember the value of a {type(widget).__name__}")

    def bind_all(self, widgets: dict[str, QWidget]) -> None:
        """:meth:`bind` each ``key: widget``."""
        for key, widget in widgets.items():
            self.bind(key, widget)


#: The "models" section's list of recently trained models (newest first), offered by Predict.
MODELS_SECTION, RECENT_MODELS = "models", "recent_models"


def recent_models(path: Path | None = None) -> list[str]:
    """Recently trained or refined models, newest first."""
    return list(Settings(MODELS_SECTION, path).get(RECENT_MODELS, []))


def remember_model(checkpoint: str, path: Path | None = None, keep: int = 10) -> None:
    """Put ``checkpoint`` first in the recent models (keeping at most ``keep``)."""
    recent = [checkpoint] + [p for p in recent_models(path) if p != checkpoint]
    Settings(MODELS_SECTION, path).set(RECENT_MODELS, recent[:keep])
