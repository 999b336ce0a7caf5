"""Dock widget: fine-tune a segmentation model on a few labeled images, in the background.

Training data is an image layer with the Labels layer painted on it, or folders of image/mask
pairs. With one layer pair, a validation split is made by cutting the image into four quadrants
and holding some out, so a validation Dice can be reported while training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QWidget

from ..bundled import BACKBONE, bundled_backbone, resolve_model
from ..core.data import LabeledImage, TaskSpec, load_labeled_folder, mask_to_target, split_for_validation
from ..core.errors import DataError, GenSelfDiffError
from ..core.nets.unet import PRESETS
from ..core.progress import Progress, relay_last
from ..core.train.losses import LOSSES, parse_loss
from ..core.train.training import FinetuneConfig, finetune
from .inputs import (LayerChoices, PathEdit, add_training_rows, explain_labels, is_labels, is_rgb_image, layer_to_rgb,
                     pixel_size_spin, pinned_footer, scrolling_column, why_not_rgb)
from .jobs import JobRunner, StopsJobsOnClose
from .pixelsize import pixel_size_of
from .progress import TrainingControls
from .settings import Settings, remember_model

LAYERS, FOLDERS = "image + labels layers", "folders of image/mask pairs"


def layer_pair_items(image_layer, labels_layer, spec: TaskSpec) -> LabeledImage:
    """The image layer and its painted Labels layer as one training item, checked for the user."""
    if image_layer is None or labels_layer is None:
        raise DataError("choose an image layer and the Labels layer painted on it")
    if image_layer.multiscale or labels_layer.multiscale:
        raise DataError("fine-tuning needs single-scale layers: crop a region of the slide into a new layer, "
                        "or use folders of image/mask pairs")
    image = layer_to_rgb(image_layer.data, image_layer.name)
    labels = np.asarray(labels_layer.data)
    if labels.shape != image.shape[:2]:
        raise DataError(f"Labels layer {labels_layer.name!r} is {labels.shape[1]}x{labels.shape[0]} but image "
                        f"layer {image_layer.name!r} is {image.shape[1]}x{image.shape[0]}")
    if not (labels > 0).any():
        raise DataError(f"Labels layer {labels_layer.name!r} is empty: paint some {spec.task} first")
    return LabeledImage(image_layer.name, image, mask_to_target(labels, spec, f"layer {labels_layer.name!r}"))


def finetune_job(items: list[LabeledImage], out: str, cfg: FinetuneConfig, init: str | None,
                 val_items: list[LabeledImage], device: str, resume: bool) -> Iterator[Progress]:
    """Fine-tune (yielding the core's events); returns the final checkpoint folder."""
    last = yield from relay_last(finetune(items, out, cfg, init=init, val_items=val_items, device=device,
                                          resume=resume))
    return last.checkpoint if last is not None and last.done else None


class FinetuneWidget(QWidget):
    """Choose labeled data, a task and a starting point, then fine-tune in the background."""

    def __init__(self, napari_viewer, settings: Settings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings or Settings("finetune")
        self.runner = JobRunner("fine-tuning", self)
        self.stops_jobs = StopsJobsOnClose(self, [self.runner])
        self._build()
        explain_labels(self)  # a row's label explains its field on hover, as the field does
        self.runner.result.connect(self._on_done)

    def _build(self) -> None:
        lay = scrolling_column(self)

        data = QGroupBox("Labeled data")
        form = self._data_form = QFormLayout(data)
        self.source = QComboBox()
        self.source.addItems([LAYERS, FOLDERS])
        self.source.setToolTip("where the labelled examples come from: an image layer with a Labels layer drawn "
                               "over it, or folders of image and mask files with the same names")
        form.addRow("From", self.source)
        self.image_layer, self.labels_layer = QComboBox(), QComboBox()
        self.image_layer.setToolTip("the H&E image layer the labels were drawn on")
        self.labels_layer.setToolTip("the Labels layer: each object (gland, nucleus) its own id, 0 = background")
        self.image_choices = LayerChoices(self.viewer, is_rgb_image, self.image_layer, why_not_rgb)
        self.labels_choices = LayerChoices(self.viewer, is_labels, self.labels_layer)
        self.images_dir, self.masks_dir = PathEdit("dir", "folder of images"), PathEdit("dir", "folder of masks")
        for label, w in [("Image layer", self.image_layer), ("Labels layer", self.labels_layer),
                         ("Images folder", self.images_dir), ("Masks folder", self.masks_dir)]:
            form.addRow(label, w)
        self.source.currentTextChanged.connect(self._show_source_rows)
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.5)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.0)
        self.val_fraction.setToolTip("part held out to report a validation Dice (one layer pair: by quadrant; "
                                     "folders: by image); 0 = no validation")
        form.addRow("Validation fraction", self.val_fraction)
        self.mpp = pixel_size_spin("microns per pixel of the training images, used when the image layer or files do "
                                   "not say (0.25 at 40x, 0.5 at 20x): the model records it, so Predict and projects "
                                   "run it at the resolution it learned")
        form.addRow("Pixel size", self.mpp)
        lay.addWidget(data)

        task = QGroupBox("Model")
        form = self._model_form = QFormLayout(task)
        self.task = QComboBox()
        self.task.addItems(["glands", "nuclei"])
        self.task.setToolTip("glands: each gland an object; nuclei: each nucleus; a boundary class separates "
                             "touching ones")
        form.addRow("Task", self.task)
        self.boundary = QCheckBox("boundary class (separates touching nuclei)")
        self.boundary.setToolTip("a third class on each object's edge: touching objects' interiors stay apart "
                                 "(nuclei: their inner boundary; glands: a contour, as DCAN)")
        form.addRow("", self.boundary)
        self.distance = QCheckBox("distance map (its peaks mark each nucleus)")
        self.distance.setToolTip("also learn each nucleus's distance to its edge; the watershed starts from its "
                                 "peaks (needs the boundary class)")
        form.addRow("", self.distance)
        self.task.currentTextChanged.connect(self._enable_nuclei_options)
        self.boundary.toggled.connect(self._enable_nuclei_options)
        self.init = PathEdit("dir", "empty: train from scratch")
        self.init.setText(BACKBONE if bundled_backbone() is not None else "")
        self.init.setToolTip(f"'{BACKBONE}': the backbone shipped with the plugin (recommended), a pretraining "
                             "checkpoint folder, or a segmentation model to continue; empty: random weights")
        form.addRow("Start from", self.init)
        self.freeze = QCheckBox("train the head only (frozen features; fast, for a handful of labels)")
        self.freeze.setToolTip("keep the pretrained network as it is and train only its last block and classifier")
        form.addRow("", self.freeze)
        self.init.edit.textChanged.connect(lambda text: self.freeze.setEnabled(bool(text.strip())))
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS))
        self.preset.setCurrentText("small")
        self.preset.setToolTip("model size when training from scratch (a pretrained model brings its own)")
        form.addRow("Size if from scratch", self.preset)
        self.loss = QComboBox()
        self.loss.setEditable(True)
        self.loss.addItems(["focal+ssl", "ce+dice", "focal", "ce", "dice", "tversky"])
        self.loss.setToolTip(f"what training minimises, a weighted sum of {', '.join(LOSSES)}: focal (per pixel, "
                             "hard pixels weigh more), ssl (structural similarity of the probability map), ce "
                             "(cross-entropy), dice / tversky (overlap), contact (apart touching nuclei); focal+ssl "
                             "is the paper's, 0.5*dice+ce another")
        form.addRow("Loss", self.loss)
        rows = add_training_rows(form, patch_tip="training tile size in pixels", steps=500, steps_step=50,
                                 out_tip="folder for the model",
                                 out_default=Path.home() / "genselfdiff" / "segmentation", resume=False)
        self.patch, self.steps, self.batch = rows.patch, rows.steps, rows.batch
        self.device, self.out, self.resume = rows.device, rows.out, rows.resume
        lay.addWidget(task)

        self.controls = TrainingControls(lay, self.runner, "Start fine-tuning", self.start, self.out, self.resume,
                                         footer=pinned_footer(self))
        self.start_btn, self.cancel_btn, self.progress = (self.controls.start_btn, self.controls.cancel_btn,
                                                          self.controls.progress)

        self.settings.bind_all({"source": self.source, "images_dir": self.images_dir, "masks_dir": self.masks_dir,
                                "val_fraction": self.val_fraction, "task": self.task, "boundary": self.boundary,
                                "distance": self.distance, "mpp": self.mpp,
                                "init": self.init, "freeze": self.freeze, "preset": self.preset, "loss": self.loss,
                                "patch": self.patch,
                                "steps": self.steps, "batch": self.batch, "device": self.device.combo,
                                "out": self.out, "resume": self.resume})
        self._enable_nuclei_options()
        self.freeze.setEnabled(bool(self.init.text()))  # as the remembered start says
        self._show_source_rows()

    def _enable_nuclei_options(self, *_: object) -> None:
        """The boundary class separates touching nuclei or (as a contour class) glands; the distance
        map is for nuclei with a boundary class."""
        nuclei = self.task.currentText() == "nuclei"
        self.boundary.setText("boundary class (separates touching nuclei)" if nuclei
                              else "contour class (separates touching glands)")
        self.distance.setEnabled(nuclei and self.boundary.isChecked())
        self._model_form.setRowVisible(self.distance, nuclei)  # glands have no distance map

    def _show_source_rows(self) -> None:
        """Layer choosers or folder fields, whichever the "From" choice needs."""
        layers = self.source.currentText() == LAYERS
        for w, visible in [(self.image_layer, layers), (self.labels_layer, layers),
                           (self.images_dir, not layers), (self.masks_dir, not layers)]:
            self._data_form.setRowVisible(w, visible)

    # -- actions ---------------------------------------------------------------------------

    def spec(self) -> TaskSpec:
        boundary = self.boundary.isChecked() and self.boundary.isEnabled()
        return TaskSpec.make(self.task.currentText(), boundary,
                             distance=boundary and self.distance.isChecked() and self.distance.isEnabled())

    def training_data(self) -> tuple[list[LabeledImage], list[LabeledImage]]:
        """(train, validation) items from the chosen layers or folders."""
        spec = self.spec()
        if self.source.currentText() == LAYERS:
            items = [layer_pair_items(self.image_choices.by_name(self.image_layer.currentText()),
                                      self.labels_choices.by_name(self.labels_layer.currentText()), spec)]
        else:
            if not self.images_dir.text() or not self.masks_dir.text():
                raise DataError("choose the folder of images and the folder of masks")
            items = load_labeled_folder(self.images_dir.text(), self.masks_dir.text(), spec)
            if all(not (it.target > 0).any() for it in items):
                raise DataError(f"{self.masks_dir.text()}: every mask is empty, there is nothing to learn")
        return split_for_validation(items, self.val_fraction.value(), self.source.currentText() == LAYERS)

    def config(self) -> FinetuneConfig:
        spec = self.spec()
        steps = self.steps.value()
        return FinetuneConfig(task=spec.task, boundary=spec.boundary, boundary_width=spec.boundary_width,
                              distance=spec.distance,
                              preset=self.preset.currentText(), steps=steps,
                              patch=self.patch.value(), batch=self.batch.value(), loss=self.loss.currentText().strip(),
                              checkpoint_every=max(1, min(100, steps // 5)), val_every=max(1, min(100, steps // 5)),
                              freeze_backbone=self.freeze.isChecked() and bool(self.init.text()),
                              mpp=self.pixel_size())

    def pixel_size(self) -> float | None:
        """µm/px of the training pixels: the Pixel size row, else the image layer's (its file's, or
        the one given for it: asked once when nobody knows, :mod:`.pixelsize`), else unknown."""
        if self.source.currentText() == LAYERS and self.image_layer.currentText():
            layer = self.image_choices.by_name(self.image_layer.currentText())
            if layer is not None:
                return pixel_size_of(self, layer, self.mpp.value() or None)
        return float(self.mpp.value()) if self.mpp.value() else None

    def start(self) -> None:
        try:
            cfg = self.config()
            parse_loss(cfg.loss)
            out = self.controls.checked_output_folder("model")
            init = str(resolve_model(self.init.text())) if self.init.text() else None
            train, val = self.training_data()
        except (GenSelfDiffError, ValueError) as e:
            show_error(str(e))
            return
        self.controls.begin(f"fine-tuning on {len(train)} image(s)" + (f", validating on {len(val)}" if val else ""))
        self.runner.start(finetune_job, train, out, cfg, init, val, self.device.device,
                          self.resume.isChecked())

    def _on_done(self, checkpoint: str | None) -> None:
        if not checkpoint:
            return
        remember_model(checkpoint, self.settings.path)
        metrics = self.controls.metrics
        dice = f" (validation Dice {metrics['val_dice']:.3f})" if "val_dice" in metrics else ""
        self.progress.set_status(f"done: model saved in {checkpoint}{dice}; it is listed in the Predict widget")
