"""Slides open with our reader from File > Open: napari's reader preference, set once.

napari's own builtins also claim ``.svs`` / ``.tif`` / ..., so File > Open asks which plugin to use
each time, and the builtins give a flat image in pixels, without the pyramid or the microns a
slide has. When a pathologist opens one of our widgets, the slide extensions our reader claims
that have no preference yet are given ours (napari's Preferences > Plugins > "File extension
readers", where it can be changed back); a choice the user made is never replaced.
"""
from __future__ import annotations

from typing import Any

PLUGIN = "napari-genselfdiff"
#: Our reader's patterns that are slides (napari.yaml); ``*.zarr`` folders are asked about as before
SLIDE_PATTERNS = ("*.svs", "*.tif", "*.tiff", "*.ndpi", "*.btf", "*.scn", "*.mrxs", "*.vms", "*.vmu", "*.bif")


def prefer_our_reader(settings: Any | None = None) -> list[str]:
    """Give the slide patterns with no reader preference to our reader; returns those it set."""
    if settings is None:
        from napari.settings import get_settings
        settings = get_settings()
    current = dict(settings.plugins.extension2reader)
    new = [p for p in SLIDE_PATTERNS if p not in current]
    if new:
        settings.plugins.extension2reader = {**current, **{p: PLUGIN for p in new}}
    return new


def say_reader_preference(new: list[str]) -> None:
    """One napari notification for what :func:`prefer_our_reader` set (nothing when nothing was)."""
    if not new:
        return
    from napari.utils.notifications import show_info
    show_info(f"Slides ({', '.join(p.lstrip('*') for p in new)}) now open with {PLUGIN}: a pyramid in microns. "
              "Change it in Preferences > Plugins > File extension readers.")
