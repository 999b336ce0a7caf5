"""Build a pyramidal, tiled BigTIFF test slide without ever holding the full image in memory.

The slide is a mosaic of square cells: cells inside an irregular blob are tissue (crops of the
shared GlaS / MoNuSeg H&E images, or synthetic H&E-like texture with ``--source none``), the
rest is white glass, so tissue detection has something to skip. Every level of the SubIFD
pyramid is rendered tile by tile straight from the (small) per-cell images, which are kept in
memory at every pyramid scale; memory therefore depends on the cell size and the number of
source images, not on the slide size. The file is written next to its destination under a
temporary name and renamed when complete.

    python scripts/make_test_slide.py --out /tmp/slide.tif --size 16384 [--tile 512]
        [--mpp 0.5] [--source /path/to/shared/data | none] [--compression jpeg|zlib]

Test slides are built into temporary folders by the tests and benchmarks, never committed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

# same convention as tests/conftest.py: $GENSELFDIFF_DATA, else ../shared/data next to the repo
DEFAULT_SOURCE = Path(os.environ.get("GENSELFDIFF_DATA")
                      or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def load_sources(source: Path | None, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``count`` RGB uint8 images from GlaS and MoNuSeg under ``source``; synthetic
    H&E-like textures when ``source`` is None or holds no images."""
    files: list[Path] = []
    if source is not None:
        for sub in ("glas/train/images", "monuseg/train/images"):
            files += sorted((source / sub).glob("*.png"))
    if not files:
        return [_synthetic_texture(512, rng) for _ in range(count)]
    import skimage.io

    pick = rng.choice(len(files), size=min(count, len(files)), replace=False)
    return [np.asarray(skimage.io.imread(files[i]))[..., :3].astype(np.uint8) for i in sorted(pick)]


def _synthetic_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Pink stroma with purple nucleus-like blobs (only used without real data)."""
    from scipy import ndimage as ndi

    noise = ndi.gaussian_filter(rng.random((size, size)), 6)
    noise = (noise - noise.min()) / max(np.ptp(noise), 1e-6)
    nuclei = ndi.gaussian_filter((rng.random((size, size)) > 0.997).astype(float), 3) > 0.02
    pink, purple = np.array([232, 170, 200.0]), np.array([110, 60, 150.0])
    img = pink[None, None] * (0.85 + 0.15 * noise[..., None])
    img[nuclei] = purple
    return np.clip(img, 0, 255).astype(np.uint8)


def _fit(img: np.ndarray, cell: int, rng: np.random.Generator) -> np.ndarray:
    """A (cell, cell) crop of ``img`` at a random offset, mirror-padded when it is smaller."""
    h, w = img.shape[:2]
    if h < cell or w < cell:
        img = np.pad(img, ((0, max(cell - h, 0)), (0, max(cell - w, 0)), (0, 0)), mode="symmetric")
        h, w = img.shape[:2]
    y, x = rng.integers(0, h - cell + 1), rng.integers(0, w - cell + 1)
    return np.ascontiguousarray(img[y:y + cell, x:x + cell])


def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded) of an image with even sides."""
    f = img.astype(np.float32)
    f = (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2]) / 4.0
    return np.rint(f).astype(np.uint8)


class Mosaic:
    """The slide as a function: ``tile(level, y, x, t)`` renders any tile of any level.

    ``layout[cy, cx]`` is the cell's image index, or -1 for white glass."""

    def __init__(self, size: int, levels: int, sources: list[np.ndarray], seed: int = 0,
                 cell: int | None = None, tissue_fraction: float = 0.35) -> None:
        rng = np.random.default_rng(seed)
        self.size = size
        self.cell = cell or int(min(1024, max(64, 2 ** int(np.log2(max(size // 8, 1))))))
        if self.cell % (2 ** (levels - 1)):
            raise ValueError(f"cell {self.cell} must be divisible by 2**(levels-1)")
        n = -(-size // self.cell)
        yy, xx = np.mgrid[0:n, 0:n] / max(n - 1, 1)
        # an ellipse of about ``tissue_fraction`` of the area (area = pi * 0.38 * 0.30 * a^2),
        # with a few cells left out; the centre cell is always tissue
        a = np.sqrt(max(tissue_fraction, 0.0) / (np.pi * 0.38 * 0.30))
        blob = ((yy - 0.5) / (0.38 * a + 1e-9)) ** 2 + ((xx - 0.5) / (0.30 * a + 1e-9)) ** 2 <= 1
        blob &= rng.random((n, n)) > 0.1
        blob[n // 2, n // 2] = tissue_fraction > 0
        # a fixed set of cell images (one random crop per source, at every pyramid scale),
        # shared by all cells: memory depends on the cell size, not on the slide size
        self.variants: list[list[np.ndarray]] = []
        for src in sources:
            scales = [_fit(src, self.cell, rng)]
            for _ in range(1, levels):
                scales.append(_halve(scales[-1]))
            self.variants.append(scales)
        self.layout = np.where(blob, rng.integers(0, len(sources), (n, n)), -1)

    def level_shape(self, level: int) -> tuple[int, int]:
        s = -(-self.size // 2 ** level)
        return s, s

    def tile(self, level: int, y: int, x: int, t: int) -> np.ndarray:
        """Pixels [y, y+t) x [x, x+t) of ``level`` (white outside the slide and on glass)."""
        out = np.full((t, t, 3), 255, np.uint8)
        c = self.cell >> level
        h, w = self.level_shape(level)
        n = self.layout.shape[0]
        for cy in range(y // c, min((y + t - 1) // c, n - 1) + 1):
            for cx in range(x // c, min((x + t - 1) // c, n - 1) + 1):
                if self.layout[cy, cx] < 0:
                    continue
                img = self.variants[self.layout[cy, cx]]
                y0, y1 = max(y, cy * c), min(y + t, (cy + 1) * c, h)
                x0, x1 = max(x, cx * c), min(x + t, (cx + 1) * c, w)
                if y1 > y0 and x1 > x0:
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = img[level][y0 - cy * c:y1 - cy * c,
                                                                   x0 - cx * c:x1 - cx * c]
        return out


def _tiles(mosaic: Mosaic, level: int, t: int) -> Iterator[np.ndarray]:
    h, w = mosaic.level_shape(level)
    for y in range(0, h, t):
        for x in range(0, w, t):
            yield mosaic.tile(level, y, x, t)


def make_test_slide(out: str | Path, size: int = 16384, *, tile: int = 512, mpp: float = 0.5,
                    source: Path | None = DEFAULT_SOURCE, compression: str = "jpeg",
                    seed: int = 0, n_sources: int = 16, tissue_fraction: float = 0.35) -> Path:
    """Write the slide to ``out`` (atomically) and return its path. ``tissue_fraction`` is
    roughly the share of the slide covered by tissue cells (the rest is white glass)."""
    import tifffile

    out = Path(out)
    levels = 1
    while size // 2 ** levels >= max(tile, 256) and levels < 6:
        levels += 1
    rng = np.random.default_rng(seed)
    mosaic = Mosaic(size, levels, load_sources(source, n_sources, rng), seed=seed,
                    tissue_fraction=tissue_fraction)
    opts = {"tile": (tile, tile), "photometric": "rgb", "dtype": np.uint8,
            "compression": compression, "resolutionunit": "CENTIMETER"}
    if compression == "jpeg":
        opts["compressionargs"] = {"level": 90}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            for level in range(levels):
                h, w = mosaic.level_shape(level)
                res = 1e4 / (mpp * 2 ** level)
                extra = {"subifds": levels - 1} if level == 0 else {"subfiletype": 1}
                tw.write(_tiles(mosaic, level, tile), shape=(h, w, 3), resolution=(res, res),
                         **opts, **extra)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output .tif path")
    ap.add_argument("--size", type=int, default=16384, help="side of the square slide (pixels)")
    ap.add_argument("--tile", type=int, default=512, help="TIFF tile size")
    ap.add_argument("--mpp", type=float, default=0.5, help="microns per pixel at level 0")
    ap.add_argument("--source", default=str(DEFAULT_SOURCE),
                    help="shared data folder with glas/ and monuseg/, or 'none' for synthetic")
    ap.add_argument("--compression", choices=("jpeg", "zlib"), default="jpeg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tissue-fraction", type=float, default=0.35,
                    help="approximate share of the slide covered by tissue")
    args = ap.parse_args(argv)
    source = None if args.source.lower() == "none" else Path(args.source)
    if source is not None and not source.is_dir():
        print(f"error: source folder {source} not found (use --source none for synthetic)",
              file=sys.stderr)
        return 2
    path = make_test_slide(args.out, args.size, tile=args.tile, mpp=args.mpp, source=source,
                           compression=args.compression, seed=args.seed,
                           tissue_fraction=args.tissue_fraction)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
