"""``genselfdiff import``: QuPath GeoJSON objects -> a label TIFF with one id per object (in the
file's order, later objects over earlier ones), the same reading and drawing as the napari
GeoJSON import (:mod:`..formats.geojson`).

The image size comes from ``--like IMAGE`` (a slide or image: its level-0 size and microns per
pixel) or ``--shape H W``. Objects reaching outside the image are clipped, objects entirely
outside are skipped (both counted in one warning line); when none is left the command says so
instead of writing an empty image. The TIFF is drawn tile by tile from the objects
(:class:`~..formats.geojson.FeatureRaster`), so a whole slide's labels take a tile of memory.
The output is never the GeoJSON or the image, and an existing file is replaced only with
``--force`` and only when it is a label TIFF genselfdiff wrote."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.atomic import check_target
from ..core.errors import DataError
from ..core.progress import run_to_end


def import_cli(a: argparse.Namespace) -> int:
    from ..formats.geojson import FeatureRaster, iter_read_geojson
    from ..formats.tiff import is_our_tiff, write_label_tiff

    inputs = [a.geojson, a.like]
    check_target(a.out, kind="label TIFF", force=a.force, ours=is_our_tiff, inputs=inputs)
    shape, mpp = image_size(a)
    result = run_to_end(iter_read_geojson(a.geojson, image_shape=shape))
    if result.warnings:
        more = f" (and {len(result.warnings) - 2} more)" if len(result.warnings) > 2 else ""
        print(f"{a.geojson}: {len(result.warnings)} warning(s): " + "; ".join(result.warnings[:2]) + more,
              file=sys.stderr)
    if not result.features:
        why = f" ({result.warnings[0]})" if result.warnings else ""
        raise DataError(f"{a.geojson}: no polygon object lies inside the {shape[1]}x{shape[0]} image{why}; "
                        "nothing written")
    write_label_tiff(a.out, FeatureRaster(result, shape), mpp=mpp, force=a.force, inputs=inputs)
    print(f"{len(result.features)} objects -> {a.out} ({shape[1]}x{shape[0]} pixels, ids 1..{len(result.features)})")
    return 0


def image_size(a: argparse.Namespace) -> tuple[tuple[int, int], float | None]:
    """((height, width), mpp) of the label image: from ``--like`` or ``--shape`` / ``--mpp``."""
    if a.like:
        from ..slide.reader import open_slide

        if not Path(a.like).exists():
            raise DataError(f"{a.like}: no such image (--like)")
        with open_slide(a.like) as slide:
            h, w = slide.shape[:2]
            return (int(h), int(w)), (a.mpp if a.mpp is not None else slide.mpp)
    h, w = a.shape
    return (int(h), int(w)), a.mpp
