"""napari reader: slides (SVS, pyramidal/OME-TIFF, OME-Zarr, and through OpenSlide MRXS / VMS /
VMU / BIF / Philips TIFF) as lazy multiscale RGB image layers,
and a prediction store (``genselfdiff predict``'s .zarr) as its label pyramids and foreground
probability, placed over the slide's level-0 pixels. A store whose run has not finished is shown
as it is, with a warning (napari shows it as a notification) saying how much is missing.
A slide whose pixel size is known is shown in microns (scale um/px, units micrometre, so napari's
scale bar speaks microns), and so is a store of it (``_widgets.geometry.slide_scale``)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".btf", ".scn", ".zarr", ".mrxs", ".vms", ".vmu", ".bif")


def napari_get_reader(path: str | list[str]) -> Callable[[str], list[tuple]] | None:
    """The slide reader when ``path`` is one slide file or .zarr folder, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    name = str(path).lower().rstrip("/\\")
    return read_slide if name.endswith(SLIDE_SUFFIXES) else None


def read_slide(path: str | list[str]) -> list[tuple]:
    """One image layer: the slide's pyramid (lazy dask arrays), with its mpp in the metadata; or
    the layers of a prediction store (:func:`read_prediction_store`)."""
    from .core.errors import DataError
    from .slide.reader import open_slide
    from .slide.store import PredictionStore

    path = path[0] if isinstance(path, list) else path
    if str(path).lower().rstrip("/\\").endswith(".zarr"):
        try:
            store = PredictionStore.open(path)
        except DataError:
            store = None  # an OME-Zarr image, or not ours: the slide reader says what it is
        if store is not None:
            return read_prediction_store(store)
    slide = open_slide(path)
    multiscale = len(slide.levels) > 1
    name = Path(str(path).rstrip("/\\")).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    meta = {"path": str(path), "mpp": slide.mpp, "downsamples": list(slide.downsamples), "notes": list(slide.notes)}
    data = slide.levels if multiscale else slide.levels[0]
    from ._widgets.geometry import slide_scale

    return [(data, {"name": name, "rgb": True, "multiscale": multiscale, "metadata": meta, **slide_scale(slide.mpp)},
             "image")]


def read_prediction_store(store) -> list[tuple]:
    """A :class:`~.slide.store.PredictionStore`'s label sets (Labels, with their pyramid) and
    foreground probability (Image), scaled to the slide's level-0 pixels. An unfinished run is
    shown as far as it got, with a warning naming the store and what is missing."""
    import dask.array as da

    from ._widgets.geometry import Grid, placement, slide_scale
    from ._widgets.legend import PROBABILITY_COLORMAP
    from .core.errors import GenSelfDiffWarning

    missing = store.unfinished()
    if missing:
        warnings.warn(f"{store.path}: the prediction is not finished ({missing}); showing what is there "
                      "(run the same prediction again to resume)", GenSelfDiffWarning, stacklevel=2)
    d = float(store.downsample)
    place = placement(Grid(**slide_scale(store.meta.get("slide_mpp"))), d)  # over the slide as read_slide shows it
    slide_mpp = store.meta.get("slide_mpp")  # the GeoJSON writer's and the region counts' microns
    grid = {"genselfdiff": {"downsample": d, "offset": [0, 0], **({"mpp": float(slide_mpp)} if slide_mpp else {})}}
    layers: list[tuple] = []
    for name in store.label_names():
        levels = [da.from_zarr(lv) for lv in store.label_levels(name)]
        complete = store.labels_complete(name)
        if not complete and not missing:
            warnings.warn(f"{store.path}: label set {name!r} is unfinished; showing what is there",
                          GenSelfDiffWarning, stacklevel=2)
        layers.append((levels if len(levels) > 1 else levels[0],
                       {"name": name, "multiscale": len(levels) > 1, **_styled(name, store.class_names, grid), **place},
                       "labels"))
    if len(store.class_names) > 1:  # named and drawn as the live result's probability layer
        fg = store.foreground_dask()
        name = store.label_names()[0] if store.label_names() else Path(str(store.path)).name
        layers.append((fg, {"name": f"{name} probability", "colormap": PROBABILITY_COLORMAP,
                            "opacity": 0.5, "blending": "additive", "contrast_limits": (0, 255), **place},
                       "image"))
    return layers


def _styled(name: str, class_names: list, grid: dict) -> dict:
    """``add_labels`` keywords of a stored label set: drawn as the Predict widget draws the live
    result (glands filled, nuclei outlined, in the task's colour; the legend entry in the metadata),
    a label set of another name in napari's own colours."""
    from ._widgets.legend import LEGEND_KEY, instance_style

    if name not in ("glands", "nuclei"):
        return {"opacity": 0.5, "metadata": grid}
    style = instance_style(name, str(class_names[1]) if len(class_names) > 1 else name)
    meta = {**grid, LEGEND_KEY: style.pop("legend")}
    if style.get("contour"):  # not a layer keyword: set once napari has added the layer
        meta[CONTOUR_KEY] = style.pop("contour")
        _outline_when_added()
    return {"opacity": 0.5, **style, "metadata": meta}


#: Metadata key of a stored label set to draw as outlines this many pixels wide (nuclei).
CONTOUR_KEY = "genselfdiff_contour"


def _outline_when_added() -> None:
    """Outline, right after napari adds them, the Labels layers this reader marked with
    :data:`CONTOUR_KEY` (a reader returns layer data only, and ``contour`` is not a Labels keyword)."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    if QApplication.instance() is None:  # read without a viewer: nothing to outline
        return

    def outline() -> None:
        import napari

        viewer = napari.current_viewer()
        for layer in viewer.layers if viewer is not None else []:
            width = (layer.metadata or {}).get(CONTOUR_KEY)
            if width and getattr(layer, "contour", None) == 0:
                layer.contour = int(width)

    QTimer.singleShot(0, outline)
