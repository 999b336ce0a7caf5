"""What the per-object measurements cost: the one-pass table (formats/measurements.shape_table) against
scikit-image's regionprops called per object (what the GeoJSON export did before, session 16), on
the real nuclei of MoNuSeg's instance labels, in one run.

    python benchmarks/measurements.py [--tiles 4]

Prints objects, seconds per 1,000 objects each way and their ratio, and checks that area, centroid,
perimeter and eccentricity agree object by object (solidity is QuPath's definition in ours, not
regionprops' convex-image one: its mean difference is printed).
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


if __name__ == "__main__":
    main()
