"""Dock widget: self-supervised pretraining on unlabeled H&E, in the background.

Sources are open image layers, a folder of tiles and/or a slide file. The pretext is diffusion
(GenSelfDiff-HIS) or nucleus-aware (unpaired translation between the tiles and synthetic nucleus
masks, :mod:`..core.train.pretext_nucleus`). At the end the pretext's visual check is added as a layer:
for diffusion a grid of generated tiles ("generated tiles": H&E-like colours and texture mean the
pretext was learned; coloured noise means it needs more steps), for nucleus-aware rows of a pseudo
mask, H&E generated from it in three styles, a real tile and the mask predicted for it
("pseudo masks and generated H&E").
"""
from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Iterator

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QAbstractItemView, QComboBox, QFormLayout, QGroupBox, QListWidget, QWidget

from ..core.data import ImageSource, UnlabeledSource
from ..core.errors import DataError, GenSelfDiffError
from ..core.nets.unet import PRESETS
from ..core.progress import Progress
from ..core.train.training import PretrainConfig, pretrain
from ..slide.sources import LazyArraySource, unlabeled_sources
from .inputs import (LayerChoices, PathEdit, add_training_rows, explain_labels, int_spin, is_rgb_image, layer_to_rgb,
                     pinned_footer, scrolling_column, why_not_rgb)
from .jobs import JobRunner, StopsJobsOnClose
from .progress import TrainingControls
from .settings import Settings

TILES_LAYER = "generated tiles"
NUCLEUS_LAYER = "pseudo masks and generated H&E"
PRETEXTS = {"diffusion": "diffusion", "nucleus-aware": "nucleus"}  # shown -> core name
#: Metadata key marking the generated-tiles layer (our output, never a pretraining source).
GENERATED_KEY = "genselfdiff_generated"


def is_pretraining_source(layer) -> bool:
    """An RGB image layer that is not our own "generated tiles" output."""
    return (is_rgb_image(layer) and layer.name not in (TILES_LAYER, NUCLEUS_LAYER)
            and not layer.metadata.get(GENERATED_KEY))


def layer_source(layer) -> UnlabeledSource:
    """An unlabeled source for an image layer: in memory, or lazily from a multiscale slide."""
    if not layer.multiscale:
        return ImageSource(layer_to_rgb(layer.data, layer.name), layer.name)
    path = layer.source.path or layer.metadata.get("path")
    if path:
        return unlabeled_sources([path])[0]  # a slide: samples tissue tiles at full resolution
    level0 = layer.data[0]
    if level0.dtype != np.uint8 or level0.shape[-1] != 3:
        raise DataError(f"layer {layer.name!r}: multiscale pretraining needs RGB uint8 data, got {level0.dtype}")
    return LazyArraySource(level0, layer.name)


def _finished(events: Iterator[Progress]) -> Iterator[Progress]:
    """Relay a training's events (closing it when the job is cancelled); returns its last event
    when the training finished, else None."""
    last = None
    with closing(events) as gen:
        for last in gen:
            yield last
    return last if last is not None and last.done else None


def pretrain_job(sources: list[UnlabeledSource], out: str, cfg: PretrainConfig, device: str, resume: bool,
                 n_tiles: int, ddim_steps: int) -> Iterator[Progress | str]:
    """Pretrain (yielding the core's events), then say so and return a grid of ``n_tiles``
    generated tiles and a sentence on what they mean after this many steps."""
    from ..core.pretext.sampling import generate_tiles, samples_note, tile_grid

    last = yield from _finished(pretrain(sources, out, cfg, device=device, resume=resume))
    if not n_tiles or last is None:
        return None
    yield f"generating {n_tiles} tiles ({ddim_steps} DDIM steps) to show what the model learned…"
    tiles = generate_tiles(last.checkpoint, n_tiles, size=cfg.patch, steps=ddim_steps, device=device)
    return tile_grid(tiles), samples_note(last.step)


def nucleus_pretrain_job(sources: list[UnlabeledSource], out: str, cfg, device: str, resume: bool,
                         n_tiles: int) -> Iterator[Progress | str]:
    """Nucleus-aware pretraining (yielding the core's events), then the pretext's sample grid:
    ``ceil(n_tiles / 4)`` rows of pseudo mask, three generated stainings, a real tile and its
    predicted mask."""
    from ..core.train.pretext_nucleus import nucleus_samples, pretrain_nucleus

    last = yield from _finished(pretrain_nucleus(sources, out, cfg, device=device, resume=resume))
    if not n_tiles or last is None:
        return None
    rows = -(-n_tiles // 4)
    yield f"drawing {rows} pseudo mask(s) and their generated H&E to show what the model learned…"
    rng = np.random.default_rng(0)
    real = np.stack([sources[int(rng.integers(len(sources)))].sample(rng, cfg.patch) for _ in range(rows)])
    return (nucleus_samples(last.checkpoint, rows, size=cfg.patch, real=real, device=device),
            "generated H&E with dark nuclei where its mask has them, and predicted masks that follow a real "
            "tile's nuclei, mean the pretext was learned")


class PretrainWidget(QWidget):
    """Choose unlabeled sources, a pretext and a model size, then pretrain in the background."""

    def __init__(self, napari_viewer, settings: Settings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings or Settings("pretrain")
        self.runner = JobRunner("pretraining", self)
        self.stops_jobs = StopsJobsOnClose(self, [self.runner])
        self._layer = TILES_LAYER  # the layer the running job's sample grid goes to
        self._build()
        explain_labels(self)  # a row's label explains its field on hover, as the field does
        self.runner.result.connect(self._on_tiles)

    # -- layout ----------------------------------------------------------------------------

    def _build(self) -> None:
        lay = scrolling_column(self)

        src = QGroupBox("Unlabeled images")
        form = QFormLayout(src)
        self.layers = QListWidget()
        self.layers.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.layers.setMaximumHeight(90)
        self.layers.setToolTip("image layers to draw random tiles from (click to select several)")
        self.layer_choices = LayerChoices(self.viewer, is_pretraining_source, self.layers, why_not_rgb)
        form.addRow("Image layers", self.layers)
        self.folder = PathEdit("dir", "optional: a folder of tiles")
        form.addRow("Folder", self.folder)
        self.slide = PathEdit("file", "optional: a slide (.svs, .tif, .zarr)",
                              "Slides (*.svs *.tif *.tiff *.ndpi *.zarr);;All files (*)")
        form.addRow("Slide file", self.slide)
        lay.addWidget(src)

        opts = QGroupBox("Training")
        form = QFormLayout(opts)
        self.pretext = QComboBox()
        self.pretext.addItems(list(PRETEXTS))
        self.pretext.setToolTip("diffusion: learn to denoise the tiles (GenSelfDiff-HIS); nucleus-aware: learn to "
                                "translate the tiles into synthetic nucleus masks and back (UNITPathSSL-like)")
        self.pretext.currentTextChanged.connect(self._on_pretext)
        form.addRow("Pretext", self.pretext)
        self.preset = QComboBox()
        self.preset.addItems(list(PRESETS))
        self.preset.setCurrentText("small")
        self.preset.setToolTip("tiny: seconds, for trying things out; small: a CPU-friendly model; "
                               "paper: the reference size (needs a GPU); backbone: the shipped backbone's network "
                               "(a per-pixel LayerNorm: every pretrained tensor reaches the segmenter unchanged)")
        form.addRow("Model size", self.preset)
        rows = add_training_rows(form, patch_tip="tile size in pixels (a multiple of 32)", steps=1000,
                                 steps_step=100, out_tip="folder for the checkpoint",
                                 out_default=Path.home() / "genselfdiff" / "pretrained", resume=True)
        self.patch, self.steps, self.batch = rows.patch, rows.steps, rows.batch
        self.device, self.out, self.resume = rows.device, rows.out, rows.resume
        self.n_tiles = int_spin(0, 64, 16, 4, "tiles to generate at the end (0: none)")
        form.addRow("Generated tiles", self.n_tiles)
        self.ddim_steps = int_spin(2, 200, 10, 5, "denoising steps that draw each generated tile (DDIM, a fast "
                                  "sampler of diffusion models): more gives finer detail and takes longer")
        form.addRow("Sampling steps", self.ddim_steps)
        lay.addWidget(opts)
        self._on_pretext(self.pretext.currentText())

        self.controls = TrainingControls(lay, self.runner, "Start pretraining", self.start, self.out, self.resume,
                                         footer=pinned_footer(self))
        self.start_btn, self.cancel_btn, self.progress = (self.controls.start_btn, self.controls.cancel_btn,
                                                          self.controls.progress)

        self.settings.bind_all({"pretext": self.pretext, "folder": self.folder, "slide": self.slide, "preset": self.preset,
                                "patch": self.patch, "steps": self.steps, "batch": self.batch,
                                "device": self.device.combo, "out": self.out, "resume": self.resume,
                                "n_tiles": self.n_tiles, "ddim_steps": self.ddim_steps})

    # -- actions ---------------------------------------------------------------------------

    def sources(self) -> list[UnlabeledSource]:
        """Everything the user chose, as core sources (reads in-memory layers now)."""
        chosen = {i.text() for i in self.layers.selectedItems()}
        sources = [layer_source(layer) for layer in self.layer_choices.layers() if layer.name in chosen]
        paths = [p for p in (self.folder.text(), self.slide.text()) if p]
        if paths:
            sources += unlabeled_sources(paths)
        if not sources:
            raise DataError("choose at least one image layer, a folder of tiles or a slide file")
        return sources

    def _on_pretext(self, shown: str) -> None:
        nucleus = PRETEXTS.get(shown) == "nucleus"
        self.ddim_steps.setEnabled(not nucleus)
        self.n_tiles.setToolTip("nucleus-aware: a row of samples per 4 (0: none)" if nucleus
                                else "tiles to generate at the end (0: none)")

    def nucleus(self) -> bool:
        return PRETEXTS.get(self.pretext.currentText()) == "nucleus"

    def nucleus_config(self):
        from ..core.train.pretext_nucleus import NucleusPretrainConfig

        return NucleusPretrainConfig(preset=self.preset.currentText(), steps=self.steps.value(),
                                     patch=self.patch.value(), batch=self.batch.value(),
                                     checkpoint_every=max(1, min(200, self.steps.value() // 5)))

    def config(self) -> PretrainConfig:
        return PretrainConfig(preset=self.preset.currentText(), steps=self.steps.value(), patch=self.patch.value(),
                              batch=self.batch.value(), checkpoint_every=max(1, min(200, self.steps.value() // 5)))

    def start(self) -> None:
        try:
            out = self.controls.checked_output_folder("checkpoint")
            sources = self.sources()
        except GenSelfDiffError as e:
            show_error(str(e))
            return
        self.controls.begin(f"pretraining on {len(sources)} source(s)…")
        self._layer = NUCLEUS_LAYER if self.nucleus() else TILES_LAYER
        if self.nucleus():
            self.runner.start(nucleus_pretrain_job, sources, out, self.nucleus_config(), self.device.device,
                              self.resume.isChecked(), self.n_tiles.value())
            return
        self.runner.start(pretrain_job, sources, out, self.config(), self.device.device, self.resume.isChecked(),
                          self.n_tiles.value(), self.ddim_steps.value())

    def _on_tiles(self, result: tuple[np.ndarray, str] | None) -> None:
        """The job's (sample grid, what it means) as a layer and the status line."""
        if result is None:
            return
        grid, note = result
        name = self._layer
        if name in self.viewer.layers:
            self.viewer.layers[name].data = grid
        else:
            right = self.viewer.layers.extent.world[1][-1] if len(self.viewer.layers) else 0.0
            units = self.viewer.layers[-1].units[-2:] if len(self.viewer.layers) else None  # one world (microns)
            self.viewer.add_image(grid, name=name, rgb=True, translate=(0, right + 0.05 * abs(right)),
                                  metadata={GENERATED_KEY: True}, units=units)
        self.controls.show_last_step()
        what = ("pseudo masks, H&E generated from them and masks predicted for real tiles" if name == NUCLEUS_LAYER
                else "tiles the model generated")
        self.progress.set_status(f"done: checkpoint in {self.out.text()}; the layer '{name}' shows {what}: {note}")
