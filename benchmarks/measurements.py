"""What the per-object measurements cost: the one-pass table (formats/measurements.shape_table) against
scikit-image's regionprops called per object (what the GeoJSON export did before, session 16), on
the real nuclei of MoNuSeg's instance labels, in one run.

    python benchmarks/measurements.py [--tiles 4] [--mosaic 4]

Prints objects, seconds per 1,000 objects each way and their ratio, and checks that area, centroid,
perimeter and eccentricity agree object by object (solidity is QuPath's definition in ours, not
regionprops' convex-image one: its mean difference is printed).

``--mosaic N``: a whole slide's measurements (``export --csv``, the Predict widget's whole slide),
on an N x N mosaic of those tiles' nuclei in a zarr array chunked as a prediction store's labels:
measured part by part (``iter_measure_label_array``, 1024-px groups, with the optical densities of
an RGB array of the same size) against the one-piece table of the array held whole, in one run; the
tables must be equal.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import data_dir, machine, read_mask  # noqa: E402  (common puts src/ on the path)
from napari_genselfdiff.formats.measurements import shape_table  # noqa: E402


def per_object_regionprops(labels: np.ndarray) -> dict[str, np.ndarray]:
    from skimage.measure import regionprops_table
    from scipy import ndimage as ndi

    rows = []
    for k, box in enumerate(ndi.find_objects(labels), 1):
        if box is None:
            continue
        t = regionprops_table((labels[box] == k).astype(np.uint8),
                              properties=["area", "perimeter", "eccentricity", "solidity"])
        rows.append([t[key][0] for key in ("area", "perimeter", "eccentricity", "solidity")])
    return dict(zip(("area", "perimeter", "eccentricity", "solidity"), np.array(rows).T))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=4, help="MoNuSeg tiles to measure (1000x1000 px each)")
    ap.add_argument("--mosaic", type=int, default=0, help="also time a whole slide: an N x N mosaic of the tiles")
    a = ap.parse_args()
    files = sorted((data_dir() / "monuseg" / "train" / "instances").glob("*.tif"))[:a.tiles]
    n, t_ours, t_ref, diffs = 0, 0.0, 0.0, []
    for f in files:
        labels = read_mask(f).astype(np.int32)
        t0 = time.perf_counter()
        ours = shape_table(labels)
        t1 = time.perf_counter()
        ref = per_object_regionprops(labels)
        t2 = time.perf_counter()
        t_ours, t_ref, n = t_ours + t1 - t0, t_ref + t2 - t1, n + len(ours["label"])
        for key in ("area", "perimeter", "eccentricity"):
            assert np.allclose(ours[key], ref[key], atol=1e-9), (f.name, key)
        diffs.append(ours["solidity"] - ref["solidity"])
    d = np.concatenate(diffs)
    print(f"{machine()}; {len(files)} MoNuSeg tiles, {n} nuclei")
    print(f"one-pass table: {1000 * t_ours / n * 1000:.1f} ms per 1,000 objects; regionprops per object: "
          f"{1000 * t_ref / n * 1000:.1f} ms per 1,000; ratio {t_ref / t_ours:.1f}x")
    print(f"area, perimeter, eccentricity identical; solidity (QuPath's) minus regionprops': mean {d.mean():+.4f}, "
          f"largest |difference| {np.abs(d).max():.3f}")
    if a.mosaic:
        whole_slide(files, a.mosaic)


def whole_slide(files, n: int) -> None:
    """The mosaic measured part by part from zarr against in one piece (module docstring)."""
    import tempfile

    import zarr

    from napari_genselfdiff.core.progress import run_to_end
    from napari_genselfdiff.formats.measurements import iter_measure_label_array, measure_objects

    tiles = [read_mask(f).astype(np.int32) for f in files]
    rows, offset = [], 0
    for i in range(n):
        row = []
        for j in range(n):
            t = tiles[(i * n + j) % len(tiles)]
            row.append(np.where(t > 0, t + offset, 0))
            offset += int(t.max())
        rows.append(np.concatenate(row, axis=1))
    labels = np.concatenate(rows, axis=0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, labels.shape + (3,), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.open_array(f"{tmp}/labels", mode="w", shape=labels.shape, chunks=(1024, 1024), dtype="int32")
        z[...] = labels
        t0 = time.perf_counter()
        parts = run_to_end(iter_measure_label_array(z, chunk=1024, image=image, mpp=0.5))
        t1 = time.perf_counter()
        whole = measure_objects(labels, image=image, mpp=0.5)
        t2 = time.perf_counter()
    for key in whole:
        assert np.allclose(parts[key], whole[key], atol=1e-6), key
    k = len(whole["Object ID"])
    print(f"whole slide: {labels.shape[1]}x{labels.shape[0]} px, {k} nuclei; part by part from zarr "
          f"{t1 - t0:.1f} s ({1000 * (t1 - t0) / k * 1000:.0f} ms per 1,000), in one piece {t2 - t1:.1f} s; "
          f"ratio {(t1 - t0) / (t2 - t1):.2f}; tables equal")


if __name__ == "__main__":
    main()
