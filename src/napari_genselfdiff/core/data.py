"""Training data: reading images and masks, patch sampling, augmentation, label fractions.

Everything random takes an explicit ``numpy.random.Generator``; the training loops derive one
generator per step from (seed, step), so a run resumed from a checkpoint sees exactly the batches
it would have seen without the interruption.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from .errors import DataError
from .imagefile import decode

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


# ---------------------------------------------------------------------------------------------
# reading

def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from a small PNG/JPEG/TIFF file, with clear errors."""
    return to_rgb_uint8(decode(path, "image"), path)


def to_rgb_uint8(arr: np.ndarray, source: object = "image") -> np.ndarray:
    """Grayscale -> RGB, RGBA -> RGB on white, 16-bit -> 8-bit; other shapes are an error."""
    while arr.ndim > 3 and arr.shape[0] == 1:  # leading singleton axes only: a 1x1 image stays 2-D
        arr = arr[0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3:
        raise DataError(f"{source}: expected a 2-D RGB image, got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channels first (TIFF planar)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if np.nanmin(arr) < 0 or np.nanmax(arr) > 1:
            raise DataError(f"{source}: float image with values outside [0, 1]; cannot convert safely")
        arr = (np.nan_to_num(arr) * 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise DataError(f"{source}: unsupported pixel type {arr.dtype}")
    if arr.shape[-1] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * a + 255 * (1 - a)).round().astype(np.uint8)
    if arr.shape[-1] != 3:
        raise DataError(f"{source}: expected 1, 3 or 4 channels, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask as stored: 2-D integer array (0/255 binary, class ids or instance ids)."""
    path = Path(path)
    arr = decode(path, "mask")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # an RGB-saved mask: channels must agree
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DataError(f"{path}: colour mask; expected a single-channel label image")
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    while arr.ndim > 2 and arr.shape[0] == 1:  # leading singleton axes only: a 1x1 mask stays 2-D
        arr = arr[0]
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise DataError(f"{path}: expected a 2-D integer mask, got shape {arr.shape} {arr.dtype}")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise DataError(f"{path}: holds negative labels (smallest {int(arr.min())}); a mask has 0 for background "
                        "and positive class or instance ids")
    return arr


# ---------------------------------------------------------------------------------------------
# tasks: from stored masks to training targets

#: The boundary class's default depth in pixels at the model's resolution: a nucleus's 1-px inner
#: boundary (0.5 um/px); a gland's 2-px contour (1.24 um/px), so touching glands' interiors lie 4 px
#: (5 um) apart, as the bundled glands model learned them.
BOUNDARY_WIDTH = {"nuclei": 1, "glands": 2}


@dataclass(frozen=True)
class TaskSpec:
    """What a segmentation model predicts."""

    task: str = "glands"  # glands | nuclei | multiclass
    num_classes: int = 2
    class_names: tuple[str, ...] = ("background", "gland")
    boundary: bool = False  # a third class on object boundaries, to separate touching nuclei / glands
    boundary_width: int = 1  # pixels (at the model's resolution) of each object's inner boundary
    # nuclei with a boundary class: one more output, each nucleus's distance to its own edge over
    # its largest (0..1, :func:`distance_target`), whose peaks are the watershed's markers
    distance: bool = False

    @property
    def out_channels(self) -> int:
        """What the network outputs: the classes' logits, then the distance map's when there is one."""
        return self.num_classes + int(self.distance)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The names of the predictor's output channels: the classes, then ``distance``."""
        return self.class_names + (("distance",) if self.distance else ())

    @classmethod
    def make(cls, task: str, boundary: bool = False, num_classes: int | None = None,
             boundary_width: int | None = None, distance: bool = False) -> "TaskSpec":
        """``boundary_width`` None: the task's :data:`BOUNDARY_WIDTH`."""
        if boundary_width is None:
            boundary_width = BOUNDARY_WIDTH.get(task, 1)
        if distance and not (task == "nuclei" and boundary):
            raise DataError("a distance map is learned for nuclei with a boundary class only "
                            "(its targets are drawn from the nuclei the boundary class separates)")
        if boundary and task in ("glands", "nuclei") and int(boundary_width) < 1:
            raise DataError(f"boundary width must be at least 1 pixel, got {boundary_width}")
        if task == "glands":
            if boundary:  # a contour class, as DCAN: touching glands' interiors stay apart
                return cls("glands", 3, ("background", "gland", "contour"), True, int(boundary_width))
            return cls("glands", 2, ("background", "gland"), False)
        if task == "nuclei":
            if boundary:
                return cls("nuclei", 3, ("background", "nucleus", "boundary"), True, int(boundary_width),
                           bool(distance))
            return cls("nuclei", 2, ("background", "nucleus"), False)
        if task == "multiclass":
            n = num_classes or 2
            return cls("multiclass", n, tuple(["background"] + [f"class{i}" for i in range(1, n)]), False)
        raise DataError(f"unknown task {task!r}: choose glands, nuclei or multiclass")

    def to_dict(self) -> dict:
        d = {"task": self.task, "num_classes": self.num_classes, "class_names": list(self.class_names),
             "boundary": self.boundary}
        if self.boundary:
            d["boundary_width"] = self.boundary_width
        if self.distance:
            d["distance"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        return cls(d["task"], int(d["num_classes"]), tuple(d["class_names"]), bool(d.get("boundary", False)),
                   int(d.get("boundary_width", 1)), bool(d.get("distance", False)))


def mask_to_target(mask: np.ndarray, spec: TaskSpec, source: object = "mask") -> np.ndarray:
    """Turn a stored mask into class ids (uint8) for ``spec``.

    0/255 masks are binary; masks whose values are all < num_classes are class ids (for binary
    tasks any value > 0 is foreground, which also covers instance-id masks). With a boundary class,
    the inner boundaries of objects become 2: of the instances of an instance-id mask, or, for a
    binary mask, of its objects (nuclei: with touching ones split apart, :func:`split_touching`;
    glands: its connected components, a pathologist's touching glands being drawn apart);
    ``spec.boundary_width`` pixels deep (each layer peeled off the object before the next; past
    the first, only while the object keeps some interior, which its watershed marker needs).
    """
    mask = np.asarray(mask)
    values = np.unique(mask)
    if spec.task == "multiclass":
        if values.max(initial=0) >= spec.num_classes:
            if set(values.tolist()) <= {0, 255}:
                return (mask > 0).astype(np.uint8)
            raise DataError(f"{source}: value {values.max()} is not a class id below {spec.num_classes}")
        return mask.astype(np.uint8)
    fg = mask > 0
    if not spec.boundary:
        return fg.astype(np.uint8)
    return boundary_target(mask if len(values) > 2 else objects_of_mask(fg, spec.task), spec.boundary_width)


def objects_of_mask(fg: np.ndarray, task: str) -> np.ndarray:
    """The objects (int32 ids) of a binary mask: nuclei with touching ones split apart
    (:func:`split_touching`); glands (and other tasks) its 8-connected components, a pathologist's
    touching glands being drawn apart."""
    if task == "nuclei":
        return split_touching(fg)
    return ndi.label(np.asarray(fg) > 0, structure=np.ones((3, 3), bool))[0].astype(np.int32)


def boundary_target(instances: np.ndarray, width: int = 1) -> np.ndarray:
    """Class ids (0 background, 1 nucleus, 2 boundary) of an instance-id map: each object's inner
    boundary ``width`` pixels deep (each layer peeled off before the next; past the first, only
    while the object keeps some interior, which its watershed marker needs)."""
    from skimage.segmentation import find_boundaries

    inst = np.array(instances)
    fg = inst > 0
    target = fg.astype(np.uint8)
    for layer in range(width):
        edge = find_boundaries(inst, mode="inner") & (inst > 0)
        if layer:  # past the first layer, an object is peeled only while some interior remains
            kept = np.zeros(int(inst.max()) + 1, bool)
            kept[np.unique(np.where(edge, 0, inst))] = True
            edge &= kept[inst]
        target[edge & fg] = 2
        inst[edge] = 0
    return target


def target_instances(target: np.ndarray, grow: int = 2) -> np.ndarray:
    """The objects of a class map with a boundary class (0 background, 1 nucleus or gland, 2 its
    boundary): the 4-connected interiors grown back over their boundary pixels (up to ``grow``
    pixels, within the foreground), so touching objects, whose interiors the boundary class keeps
    apart, stay apart."""
    from skimage.segmentation import expand_labels

    interiors, n = ndi.label(target == 1, structure=ndi.generate_binary_structure(2, 1))
    nuclei = expand_labels(interiors, grow)
    nuclei[target == 0] = 0
    rest, _ = ndi.label((target > 0) & (nuclei == 0))  # a nucleus all boundary: an object of its own
    nuclei[rest > 0] = rest[rest > 0] + n
    return nuclei


def distance_target(targets: np.ndarray) -> np.ndarray:
    """(B, H, W) float32 in [0, 1]: for targets with a boundary class (0 background, 1 nucleus,
    2 boundary), each nucleus's Euclidean distance to its own edge divided by its largest.

    The nuclei are the 4-connected interiors (class 1) grown back over their boundary pixels (up to
    two pixels, within the foreground), so touching nuclei, whose interiors the boundary class
    keeps apart, each get their own peak and meet at a valley. Computed on the training patches
    themselves (a nucleus cut by the patch edge is measured within the patch)."""
    t = np.asarray(targets)
    squeeze = t.ndim == 2
    t = t[None] if squeeze else t
    out = np.zeros(t.shape, np.float32)
    for b in range(t.shape[0]):
        nuclei = target_instances(t[b])
        for i, box in enumerate(ndi.find_objects(nuclei), 1):
            if box is None:
                continue
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            own = nuclei[box] == i
            d = ndi.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
            out[b][box][own] = (d / d.max())[own]
    return out[0] if squeeze else out


def split_touching(fg: np.ndarray, h: float = 0.4, sigma: float = 0.5) -> np.ndarray:
    """Instances from a binary mask whose touching objects (nuclei drawn as one blob) are split at
    the necks of their distance map: markers are the ``h``-maxima of the (lightly smoothed)
    distance transform, flooded by watershed within the mask. On the 13 MoNuSeg tiles that also
    have true instance labels (0.5 um/px) this raises the AJI of the binary mask against the true
    instances from 0.55 (connected components) to 0.83."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    fg = np.asarray(fg, bool)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), sigma)
    markers, n = ndi.label(h_maxima(dist, h) & fg)
    inst = watershed(-dist, markers, mask=fg).astype(np.int32)
    rest, m = ndi.label(fg & (inst == 0))  # objects too thin for a marker stay whole
    inst[rest > 0] = rest[rest > 0] + n
    return inst


# ---------------------------------------------------------------------------------------------
# folders

def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    return files


def pair_images_and_masks(images_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Match images to masks by file stem (a mask may add ``_mask``/``_anno``/``_label``)."""
    images = list_images(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_EXTS))})")
    masks = {p.stem: p for p in list_images(masks_dir)}
    pairs = []
    for img in images:
        for stem in (img.stem, img.stem + "_mask", img.stem + "_anno", img.stem + "_label", img.stem + "_labels"):
            if stem in masks:
                pairs.append((img, masks[stem]))
                break
        else:
            raise DataError(f"{img}: no mask for this image in {masks_dir}")
    return pairs


@dataclass
class LabeledImage:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    target: np.ndarray  # (H, W) uint8 class ids
    instances: np.ndarray | None = None


def load_labeled_folder(images_dir, masks_dir, spec: TaskSpec) -> list[LabeledImage]:
    out = []
    for img_path, mask_path in pair_images_and_masks(images_dir, masks_dir):
        image = read_image(img_path)
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{img_path.name} is {image.shape[1]}x{image.shape[0]}")
        out.append(LabeledImage(img_path.stem, image, mask_to_target(mask, spec, mask_path)))
    return out


def downscale_item(item: LabeledImage, factor: float) -> LabeledImage:
    """The labeled image at 1/``factor`` resolution (area-averaged image, nearest-neighbour mask):
    gland models see more context per pixel at half resolution."""
    if factor == 1:
        return item
    from skimage.transform import rescale

    img = rescale(item.image, 1 / factor, channel_axis=2, anti_aliasing=True, preserve_range=True)
    tgt = rescale(item.target, 1 / factor, order=0, anti_aliasing=False, preserve_range=True)
    return LabeledImage(item.name, np.round(img).astype(np.uint8), tgt.astype(item.target.dtype))


def select_fraction(items: Sequence, fraction: float, seed: int) -> list:
    """A deterministic subset with ``round(fraction * n)`` items (at least one)."""
    if not 0 < fraction <= 1:
        raise DataError(f"label fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(fraction * len(items))))
    idx = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in idx]


def select_fraction_from_names(items: Sequence[LabeledImage], names: list[str] | None) -> list[LabeledImage]:
    """On resume, train on exactly the images the run started with."""
    if not names:
        return list(items)
    by_name = {it.name: it for it in items}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"cannot resume: training images {missing[:3]} are no longer in the labeled set")
    return [by_name[n] for n in names]


def split_items(items: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split by item (by image, never by patch) into (train, validation)."""
    if val_fraction <= 0:
        return list(items), []
    n_val = max(1, int(round(val_fraction * len(items))))
    if n_val >= len(items):
        raise DataError(f"validation fraction {val_fraction} leaves no training images out of {len(items)}")
    perm = np.random.default_rng(seed + 7919).permutation(len(items))
    val = set(perm[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# ---------------------------------------------------------------------------------------------
# unlabeled sources (slides and lazy arrays: slide.sources, which also builds sources from paths)

class UnlabeledSource:
    """Something tiles can be drawn from: ``sample(rng, size) -> (size, size, 3) uint8``."""

    name: str = "source"

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class ImageSource(UnlabeledSource):
    image: np.ndarray
    name: str = "image"

    def sample(self, rng, size):
        return random_crop(self.image, None, rng, size)[0]


# ---------------------------------------------------------------------------------------------
# patches and augmentation

def random_crop(image: np.ndarray, target: np.ndarray | None, rng: np.random.Generator, size: int):
    """A random ``size`` x ``size`` crop; images smaller than that are reflect-padded first."""
    h, w = image.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        image = np.pad(image, pad + ((0, 0),), mode="reflect")
        if target is not None:
            target = np.pad(target, pad, mode="reflect")
        h, w = image.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    crop = image[y:y + size, x:x + size]
    return crop, (None if target is None else target[y:y + size, x:x + size])


@dataclass(frozen=True)
class AugmentConfig:
    flips: bool = True
    rot90: bool = True
    blur_p: float = 0.2
    color_jitter: float = 0.1  # brightness / contrast / saturation amplitude
    stain_sigma: float = 0.05  # H&E stain perturbation in HED space (Tellez et al. 2018)
    stain_p: float = 0.5
    # labeled patches drawn at a random scale, log-uniform in [1 / (1 + scale), 1 + scale] (0: off);
    # tissue is magnified or shrunk, its labels resampled so that a boundary class stays 1 px wide
    scale: float = 0.0

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(False, False, 0.0, 0.0, 0.0, 0.0, 0.0)


def augment(image: np.ndarray, target: np.ndarray | None, rng: np.random.Generator,
            cfg: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray | None]:
    """Geometric transforms hit image and target alike; photometric ones only the image."""
    if cfg.flips and rng.random() < 0.5:
        image, target = image[:, ::-1], (None if target is None else target[:, ::-1])
    if cfg.flips and rng.random() < 0.5:
        image, target = image[::-1], (None if target is None else target[::-1])
    if cfg.rot90:
        k = int(rng.integers(4))
        image, target = np.rot90(image, k), (None if target is None else np.rot90(target, k))
    img = image.astype(np.float32) / 255.0
    if cfg.stain_sigma > 0 and rng.random() < cfg.stain_p:
        img = stain_augment(img, rng, cfg.stain_sigma)
    if cfg.color_jitter > 0:
        a = cfg.color_jitter
        img = img * (1 + rng.uniform(-a, a))  # brightness
        mean = img.mean()
        img = (img - mean) * (1 + rng.uniform(-a, a)) + mean  # contrast
        grey = img.mean(axis=2, keepdims=True)
        img = (img - grey) * (1 + rng.uniform(-a, a)) + grey  # saturation
    if cfg.blur_p > 0 and rng.random() < cfg.blur_p:
        img = ndi.gaussian_filter(img, sigma=(rng.uniform(0.3, 1.2),) * 2 + (0,))
    out = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return out, (None if target is None else np.ascontiguousarray(target))


def stain_augment(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Scale and shift each stain channel (haematoxylin, eosin, DAB) of a [0, 1] RGB image."""
    from skimage.color import hed2rgb, rgb2hed
    hed = rgb2hed(np.clip(img, 1e-3, 1))
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-sigma, sigma, size=3) * np.abs(hed).reshape(-1, 3).max(axis=0).clip(1e-3)
    return hed2rgb(hed * alpha + beta).astype(np.float32)


def to_model_input(batch_uint8: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]: the one normalisation used for both
    pretraining and fine-tuning (recorded in checkpoints as ``"minus_one_one"``)."""
    return np.ascontiguousarray(batch_uint8.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0


NORMALIZATION = "minus_one_one"


def sample_unlabeled_batch(sources: Sequence[UnlabeledSource], rng: np.random.Generator, batch: int, size: int,
                           aug: AugmentConfig) -> np.ndarray:
    tiles = []
    for _ in range(batch):
        src = sources[int(rng.integers(len(sources)))]
        tiles.append(augment(src.sample(rng, size), None, rng, aug)[0])
    return np.stack(tiles)


def sample_labeled_batch(items: Sequence[LabeledImage], rng: np.random.Generator, batch: int, size: int,
                         aug: AugmentConfig, boundary_width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` augmented (patch, target) pairs; ``boundary_width`` > 0: the targets have a boundary
    class that many pixels deep, redrawn at the new scale when ``aug.scale`` resamples a patch."""
    imgs, tgts = [], []
    for _ in range(batch):
        item = items[int(rng.integers(len(items)))]
        if aug.scale > 0:
            s = float(np.exp(rng.uniform(-np.log1p(aug.scale), np.log1p(aug.scale))))
            img, tgt = random_crop(item.image, item.target, rng, max(8, int(round(size / s))))
            img, tgt = rescale_patch(img, tgt, size, boundary_width)
        else:
            img, tgt = random_crop(item.image, item.target, rng, size)
        img, tgt = augment(img, tgt, rng, aug)
        imgs.append(img)
        tgts.append(tgt)
    return np.stack(imgs), np.stack(tgts)


def rescale_patch(image: np.ndarray, target: np.ndarray, size: int,
                  boundary_width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A square patch and its class ids resampled to ``size`` x ``size``: the image bilinearly
    (area-smoothed when shrunk), the classes by nearest neighbour; with ``boundary_width`` > 0 the
    nuclei are resampled as instances and their boundary class drawn again at the new scale (a
    1-px boundary resampled as classes would break into gaps when shrunk and thicken when grown)."""
    from skimage.transform import resize

    if image.shape[0] == size and image.shape[1] == size:
        return image, target
    shrink = image.shape[0] > size
    img = resize(image, (size, size), order=1, anti_aliasing=shrink, preserve_range=True)
    labels = target_instances(target, max(2, boundary_width)) if boundary_width > 0 else target
    lab = resize(labels, (size, size), order=0, anti_aliasing=False, preserve_range=True).astype(labels.dtype)
    tgt = boundary_target(lab, boundary_width) if boundary_width > 0 else lab
    return np.round(img).astype(np.uint8), tgt


# ---------------------------------------------------------------------------------------------
# validation split of a single labeled image

QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def quadrants(item: LabeledImage) -> list[LabeledImage]:
    """Cut a labeled image into its four quadrants (the validation unit for a single image)."""
    h, w = item.target.shape
    cy, cx = h // 2, w // 2
    boxes = [(0, cy, 0, cx), (0, cy, cx, w), (cy, h, 0, cx), (cy, h, cx, w)]
    return [LabeledImage(f"{item.name} [{q}]", item.image[y0:y1, x0:x1], item.target[y0:y1, x0:x1])
            for q, (y0, y1, x0, x1) in zip(QUADRANTS, boxes, strict=True)]


def split_for_validation(items: list[LabeledImage], fraction: float, single_pair: bool,
                         seed: int = 0) -> tuple[list[LabeledImage], list[LabeledImage]]:
    """(train, validation); a single image is split by quadrants, several by image."""
    if fraction <= 0:
        return items, []
    if single_pair:
        items = quadrants(items[0])
    train, val = split_items(items, fraction, seed)
    if all(not (it.target > 0).any() for it in train):
        raise DataError("the labels all fall in the held-out validation part: paint more, or set the "
                        "validation fraction to 0")
    return train, val
