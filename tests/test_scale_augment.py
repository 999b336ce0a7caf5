"""Scale augmentation: labeled patches drawn magnified or shrunk, with their labels resampled so
that a nuclei boundary class stays what the network is asked for at inference (1 px wide)."""
import numpy as np

from napari_genselfdiff.core.data import (AugmentConfig, LabeledImage, TaskSpec, boundary_target, mask_to_target,
                                          rescale_patch, sample_labeled_batch, target_instances)

from _shapes import discs


def _lattice(shape=(160, 160), r=7, step=18, touching=True):
    """Instance labels of a lattice of discs; with ``touching`` every other row is shifted so that
    neighbours overlap (nuclei drawn as one blob in a binary mask)."""
    centres = []
    for i, y in enumerate(range(r + 2, shape[0] - r - 2, step)):
        for x in range(r + 2 + (6 if touching and i % 2 else 0), shape[1] - r - 2, step if not touching else 13):
            centres.append((y, x))
    return discs(shape, centres, r)


def _image_of(labels):
    img = np.full(labels.shape + (3,), 230, np.uint8)
    img[labels > 0] = (90, 40, 140)
    return img


def test_the_nuclei_of_a_boundary_target_are_recovered_with_their_boundaries():
    lab = _lattice()
    target = mask_to_target(lab, TaskSpec.make("nuclei", boundary=True))
    inst = target_instances(target)
    assert ((inst > 0) == (lab > 0)).all()
    assert inst.max() == lab.max()  # touching nuclei stay apart
    assert (boundary_target(inst) == target).all()
    # a nucleus so small it is all boundary is an object of its own, not lost
    tiny = np.zeros((9, 9), np.uint8)
    tiny[4, 4:6] = 2
    assert target_instances(tiny).max() == 1


def test_rescaled_patches_keep_a_one_pixel_boundary_and_every_nucleus():
    lab = _lattice()
    target = mask_to_target(lab, TaskSpec.make("nuclei", boundary=True))
    image = _image_of(lab)
    ring = (target == 2).sum() / (target > 0).sum()
    for size, scale in ((240, 1.5), (112, 0.7)):
        img, tgt = rescale_patch(image, target, size, boundary_width=1)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8 and tgt.shape == (size, size)
        inst = target_instances(tgt)
        assert inst.max() == lab.max(), (scale, inst.max(), lab.max())  # no nucleus lost or merged
        # the boundary drawn again, 1 px at the new scale: the target is (up to the few pixels
        # whose nucleus the recovery assigns by distance) the boundary target of its own nuclei
        assert _mismatch(tgt) < 0.01, (scale, _mismatch(tgt))
        # a 1-px ring is a larger share of a smaller nucleus: the share scales like 1 / scale
        share = (tgt == 2).sum() / (tgt > 0).sum()
        assert abs(share * scale / ring - 1) < 0.25, (scale, share, ring)
        # the image follows the labels: nucleus colour where the labels are nuclei
        assert img[tgt == 1][:, 0].mean() < 120 and img[tgt == 0][:, 0].mean() > 200
    # resampled as plain classes, the ring breaks when shrunk and thickens when grown: the method matters
    from skimage.transform import resize
    for size in (112, 240):
        naive = resize(target, (size, size), order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
        assert _mismatch(naive) > 0.02, (size, _mismatch(naive))


def _mismatch(target):
    """Share of a class map's nucleus pixels that differ from the 1-px boundary target of its nuclei."""
    return ((boundary_target(target_instances(target)) != target) & (target > 0)).sum() / (target > 0).sum()


def test_binary_targets_are_resampled_as_classes():
    lab = _lattice(touching=False)
    target = (lab > 0).astype(np.uint8)
    img, tgt = rescale_patch(_image_of(lab), target, 200)
    assert set(np.unique(tgt)) == {0, 1}
    assert abs((tgt > 0).mean() - (target > 0).mean()) < 0.02


def test_scale_augmentation_draws_nuclei_of_many_sizes_reproducibly():
    lab = _lattice((320, 320))
    item = LabeledImage("lattice", _image_of(lab), mask_to_target(lab, TaskSpec.make("nuclei", boundary=True)))

    def largest_nuclei(aug, seed=0):
        imgs, tgts = sample_labeled_batch([item], np.random.default_rng(seed), 12, 96, aug, boundary_width=1)
        assert imgs.shape == (12, 96, 96, 3) and tgts.shape == (12, 96, 96)
        areas = []
        for t in tgts:
            inst = target_instances(t)
            sizes = np.bincount(inst.ravel())[1:]
            areas.append(sizes.max())  # a whole nucleus: those cut by the patch edge are smaller
        return np.array(areas), tgts

    fixed, _ = largest_nuclei(AugmentConfig.none())
    scaled, tgts = largest_nuclei(AugmentConfig(flips=False, rot90=False, blur_p=0, color_jitter=0, stain_sigma=0,
                                            scale=0.5))
    assert fixed.max() / fixed.min() < 1.15  # the same lattice whatever the crop
    assert scaled.max() / scaled.min() > 1.6  # magnified and shrunk: (1.5 / 0.67)^2 at the extremes
    for t in tgts:
        assert _mismatch(t) < 0.02
    again, tgts2 = largest_nuclei(AugmentConfig(flips=False, rot90=False, blur_p=0, color_jitter=0, stain_sigma=0,
                                            scale=0.5))
    assert (tgts2 == tgts).all()  # the same seed, the same batch (a resumed run sees what it would have)
