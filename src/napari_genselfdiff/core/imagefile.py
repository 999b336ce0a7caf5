"""Decoding an image file in one piece (PNG, JPEG, BMP, GIF; TIFF through tifffile), with one
clear line naming the file when it cannot be: what it is, or that it needs more memory than the
machine has free.

Pillow refuses images above its decompression-bomb limit (about 179 Mpx) as an attack; a
pathologist's exported region or stitched scan can be that large and is their own file. Here the
limit is the memory the decoded pixels need against the memory available, not a pixel count.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError

#: File signatures of the formats read here, to say what a file that fails to decode is.
IMAGE_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"GIF8": "GIF", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF", b"II+\x00": "TIFF", b"MM\x00+": "TIFF"}
_SUFFIX_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
_PILLOW_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is one global of Pillow's


def decode(path: str | os.PathLike, what: str) -> np.ndarray:
    """Pixels of a PNG/JPEG/BMP/TIFF file read in one piece; a one-line DataError naming the file
    when it can't be read (the decoders' own messages, e.g. imageio's multi-line plugin hints, are
    not shown)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({(e.strerror or str(e)).lower()})") from None
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile
            return np.asarray(tifffile.imread(path))
        return decode_large(path)
    except (MemoryError, DataError):
        raise
    except Exception:  # every decoder has its own exception types
        raise DataError(f"{path}: cannot read {what}: {undecodable(path, head)}") from None


def decode_large(path: Path) -> np.ndarray:
    """A plain image through imageio, Pillow's pixel-count limit replaced by a memory check:
    :class:`DataError` when the decoded pixels would not fit in the memory available."""
    import imageio.v3 as iio
    from PIL import Image

    with _no_pixel_limit():
        with Image.open(path) as im:  # the header only
            (width, height), bands = im.size, len(im.getbands())
            depth = 2 if im.mode.startswith("I;16") else 4 if im.mode in ("I", "F") else 1
        need = 2 * width * height * bands * depth  # the decoded pixels and one converted copy
        free = available_memory()
        if free is not None and need > free:
            raise DataError(f"{path}: {width}x{height} px ({width * height / 1e6:.0f} Mpx) needs about "
                            f"{need / 2**30:.1f} GiB to decode in one piece, more than the {free / 2**30:.1f} "
                            "GiB free; save it as a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid) "
                            "and open that")
        return np.asarray(iio.imread(path))


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    from PIL import Image

    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping (Linux's MemAvailable;
    elsewhere the free pages), or None where the system does not say."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def undecodable(path: Path, head: bytes) -> str:
    """Why a file whose first bytes are ``head`` could not be decoded, in words."""
    actual = next((fmt for magic, fmt in IMAGE_MAGIC.items() if head.startswith(magic)), None)
    if not head:
        return "the file is empty"
    if actual is None:
        expected = _SUFFIX_FORMAT.get(path.suffix.lower(), "an image")
        return f"not a {expected} file (nor another image format read here)"
    return f"not a readable {actual} image (truncated or damaged)"
