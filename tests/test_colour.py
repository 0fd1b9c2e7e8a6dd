"""The per-image colour model on hand-made images: what it brings back, and what it leaves alone."""

import dataclasses

import numpy as np
import pytest
import torch

from syntagen_st.core.classes import IGNORE_INDEX
from syntagen_st.core.colour import colour_posterior, with_colour
from syntagen_st.core.config import LabelConfig
from syntagen_st.core.guided import label_prior, refine_label

CFG = LabelConfig()
OFF = dataclasses.replace(CFG, colour_weight=0.0)
BIKE, CAT, DOG = 2, 8, 12


def _grey(size, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(100, 5, size=(size, size, 3)), 0, 255)


def _ring_scene(size=96):
    """A thin green ring (3 px wide) on grey; its label holds under half of it, as a coarse label
    holds a wheel's rim: the rest of the ring is called background."""
    image = _grey(size)
    y, x = np.mgrid[:size, :size]
    d = np.hypot(x - size / 2, y - size / 2)
    ring = np.abs(d - size / 3) <= 1.5
    image[ring] = (30, 200, 110)
    label = np.zeros((size, size), np.uint8)
    angle = np.arctan2(y - size / 2, x - size / 2)
    label[ring & (np.sin(6 * angle) > 0.3)] = BIKE  # 6 arcs of the rim, gaps between them
    return image.astype(np.uint8), ring, label


def test_a_thin_part_its_label_mostly_calls_background_comes_back():
    image, ring, label = _ring_scene()
    assert (label[ring] == BIKE).mean() < 0.5
    refined = refine_label(image, label, [BIKE], CFG)[1].numpy()
    assert (refined[ring] == BIKE).mean() > 0.95
    assert (refined[~ring] == 0).mean() > 0.999  # the grey stays background
    # Without the colour model the CRF votes the ring's background majority: most of it is lost.
    without = refine_label(image, label, [BIKE], OFF)[1].numpy()
    assert (without[ring] == BIKE).mean() < 0.5


@pytest.mark.parametrize("h, w", [(128, 128), (96, 192)])
def test_the_reach_keeps_a_far_look_alike_background_and_without_it_a_missed_object_comes_back(h, w):
    # Two orange squares far apart, farther than the CRF's reach; the label holds only the first.
    # Whether the second is a missed cat or a stretch of background of the cat's colour, the
    # image cannot tell: within the reach (the default) it stays background, without it it is cat.
    # The reach is of the shorter side, so a wide image keeps it too.
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(100, 5, size=(h, w, 3)), 0, 255)
    near_box, far_box = np.s_[8:40, 8:40], np.s_[h - 40:h - 8, w - 40:w - 8]
    image[near_box] = image[far_box] = (240, 130, 20)
    image = image.astype(np.uint8)
    label = np.zeros((h, w), np.uint8)
    label[near_box] = CAT
    assert CFG.colour_reach is not None
    near = refine_label(image, label, [CAT], CFG)[1].numpy()
    assert (near[far_box] == 0).all() and (near[near_box] == CAT).all()
    anywhere = refine_label(image, label, [CAT], dataclasses.replace(CFG, colour_reach=None))[1].numpy()
    assert (anywhere[far_box] == CAT).mean() > 0.95
    assert (refine_label(image, label, [CAT], OFF)[1].numpy()[far_box] == CAT).mean() < 0.05


def test_a_clean_label_comes_out_unchanged():
    image, ring, _ = _ring_scene()
    image[10:30, 10:30] = (240, 130, 20)
    label = np.where(ring, BIKE, 0).astype(np.uint8)
    label[10:30, 10:30] = CAT
    refined = refine_label(image, label, [BIKE, CAT], CFG)[1].numpy()
    assert np.array_equal(refined, label)


def test_a_colour_the_background_holds_stays_background():
    # Orange stripes in the background (a fifth of it) and a small cat patch of the same orange.
    # By default the stripes are beyond the cat's reach and stay background. With no reach, the
    # background's size decides: counted fully (class_power 1) it keeps its stripes; not counted
    # (0), the cat, all orange, claims every orange pixel.
    image = _grey(64)
    image[40:52] = (240, 130, 20)
    image[4:12, 4:12] = (240, 130, 20)
    image = image.astype(np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[4:12, 4:12] = CAT
    prior = label_prior(label, [CAT], CFG.prior_confidence)
    post = colour_posterior(image, prior, CFG.colour_bins, CFG.colour_class_power, CFG.colour_reach)
    assert (post[0, 40:52] > 0.9).all() and (post[1, 4:12, 4:12] > 0.6).all()
    assert (colour_posterior(image, prior, CFG.colour_bins, 1.0, None)[0, 40:52] > 0.9).all()
    assert (colour_posterior(image, prior, CFG.colour_bins, 0.0, None)[1, 40:52] > 0.8).all()
    refined = refine_label(image, label, [CAT], CFG)[1].numpy()
    assert (refined[40:52] == 0).all() and (refined[4:12, 4:12] == CAT).all()


def test_the_contract_s_edge_cases():
    image, ring, label = _ring_scene(32)
    # 255 everywhere: no confident pixel, no class claims a colour: the prior is left as it was.
    unsure = label_prior(np.full((32, 32), IGNORE_INDEX, np.uint8), [BIKE], CFG.prior_confidence)
    assert torch.allclose(with_colour(image, unsure, 1.0, 8, 0.5, 0.125), unsure)
    # One class (background alone): ones, and the prior unchanged.
    alone = label_prior(label, [], CFG.prior_confidence)
    assert alone.shape[0] == 1 and torch.equal(colour_posterior(image, alone, 8, 0.5, 0.125), torch.ones(1, 32, 32))
    # A flat image: every pixel has one colour, so the posterior is about each class's size share.
    flat = np.full((32, 32, 3), 90, np.uint8)
    prior = label_prior(label, [BIKE], CFG.prior_confidence)
    post = colour_posterior(flat, prior, 8, 1.0, None)
    share = (label == BIKE).sum() / label.size
    assert torch.allclose(post[1], torch.full((32, 32), float(share)), atol=5e-3)
    # Weight 0: the prior as it was; rows sum to one otherwise.
    assert torch.equal(with_colour(image, prior, 0.0, 8, 0.5, None), prior)
    out = with_colour(image, prior, 1.0, 8, 0.5, 0.125)
    assert torch.allclose(out.sum(0), torch.ones(32, 32), atol=1e-5)
    with pytest.raises(ValueError, match=r"the image is \(32, 32, 3\), the probabilities \(2, 16, 16\)"):
        colour_posterior(image, prior[:, :16, :16], 8, 0.5, None)
    # A float image would land in one colour cell and say nothing: refused, not used.
    with pytest.raises(ValueError, match="the image is float64: expected uint8 RGB in 0-255"):
        colour_posterior(image / 255.0, prior, 8, 0.5, None)


def test_a_class_the_label_lacks_leaves_the_colours_to_the_prior():
    # The sample names cat and dog; its label holds no dog. A 255 patch of a colour no class
    # holds: a dog with no pixel to learn from must not claim it (it did, at 0.99997, with a flat
    # histogram), and nor must the cat, the smallest class with a histogram (0.949 once).
    image = _grey(64)
    image[4:12, 4:12] = (240, 130, 20)
    image[30:50, 30:50] = (20, 40, 230)
    image = image.astype(np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[4:12, 4:12] = CAT
    label[30:50, 30:50] = IGNORE_INDEX
    prior = label_prior(label, [CAT, DOG], CFG.prior_confidence)
    post = colour_posterior(image, prior, CFG.colour_bins, CFG.colour_class_power, None)
    assert torch.allclose(post[2], torch.full((64, 64), 0.5))  # the even share of the two classes held
    assert torch.allclose(post[:2, 30:50, 30:50], torch.full((2, 20, 20), 0.5), atol=0.01)
    assert (post[1, 4:12, 4:12] > 0.6).all() and (post[0, :, 56:] > 0.95).all()
    refined = refine_label(image, label, [CAT, DOG], CFG)[1].numpy()
    assert not (refined == DOG).any() and (refined[4:12, 4:12] == CAT).all()


@pytest.mark.parametrize("h, w, reach", [(128, 128, 0.125), (64, 1024, 0.125)])
def test_a_colour_only_a_far_class_holds_says_nothing(h, w, reach):
    # A 255 patch of the cat's orange, far from the cat, which the background does not hold:
    # beyond the reach the colour is no evidence for the cat, nor (the distance factor falling
    # to 0 in float32 on a long image) for a dog the label lacks, which once took the patch whole.
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(100, 5, size=(h, w, 3)), 0, 255)
    far = np.s_[h - 24:h - 4, w - 24:w - 4]
    image[4:20, 4:20] = image[far] = (240, 130, 20)
    image = image.astype(np.uint8)
    label = np.zeros((h, w), np.uint8)
    label[4:20, 4:20] = CAT
    label[far] = IGNORE_INDEX
    prior = label_prior(label, [CAT, DOG], CFG.prior_confidence)
    post = colour_posterior(image, prior, CFG.colour_bins, CFG.colour_class_power, reach)
    assert torch.allclose(post[:, far[0], far[1]], torch.full((3, 20, 20), 0.5), atol=0.1)
    assert (post[1, 4:20, 4:20] > 0.99).all()
    assert torch.allclose(post.sum(0)[:, :8], torch.full((h, 8), 1.5), atol=1e-4)  # dog's even share on top
    refined = refine_label(image, label, [CAT, DOG], CFG)[1].numpy()
    assert not (refined == DOG).any() and (refined[4:20, 4:20] == CAT).all()


def test_a_colour_one_pixel_holds_is_half_believed():
    # One stray cat pixel is blue, and a 255 patch is the same blue: one pixel of evidence makes
    # that colour half the histograms' say and half even shares, not all cat.
    image = _grey(64)
    image[4:12, 4:12] = (240, 130, 20)
    image[4, 4] = image[30:50, 30:50] = (20, 40, 230)
    image = image.astype(np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[4:12, 4:12] = CAT
    label[30:50, 30:50] = IGNORE_INDEX
    prior = label_prior(label, [CAT], CFG.prior_confidence)
    post = colour_posterior(image, prior, CFG.colour_bins, CFG.colour_class_power, None)
    assert torch.allclose(post[1, 30:50, 30:50], torch.full((20, 20), 0.75), atol=1e-3)


@pytest.mark.parametrize("shared", [(0, 0, 0), (100, 140, 100)])
def test_a_colour_at_the_edge_of_the_rgb_cube_is_shared_out_as_an_inner_one(shared):
    # Background stripes and a cat patch of one colour: black, a corner of the RGB cube, or an
    # inner grey-green. Each class's claim on it is the same either way. Normalised by its
    # blurred count, which loses what spills out of the cube, the all-black cat claimed more.
    image = np.full((64, 64, 3), 200, np.uint8)
    image[40:52] = shared
    image[4:12, 4:12] = shared
    label = np.zeros((64, 64), np.uint8)
    label[4:12, 4:12] = CAT
    prior = label_prior(label, [CAT], CFG.prior_confidence)
    post = colour_posterior(image, prior, CFG.colour_bins, CFG.colour_class_power, None)
    # The figures for the inner colour, worked out from the counts: 768 + 64 pixels share it.
    share = 64 ** -0.8 * 64 / (64 ** -0.8 * 64 + (4096 - 64) ** -0.8 * 768)
    assert torch.allclose(post[1, 40:52], torch.full((12, 64), share), atol=2e-3)
    assert torch.allclose(post[1, 4:12, 4:12], torch.full((8, 8), share), atol=2e-3)


def test_with_the_guided_filter_the_colour_model_weighs_the_first_pass_only(monkeypatch):
    import syntagen_st.core.guided as guided

    weights = []

    def spy(image, probs, weight, *args):
        weights.append(weight)
        return with_colour(image, probs, weight, *args)

    monkeypatch.setattr(guided, "with_colour", spy)
    image, _, label = _ring_scene(32)
    refine_label(image, label, [BIKE], dataclasses.replace(CFG, prior_method="guided", prior_passes=3))
    assert weights == [CFG.colour_weight, 0.0, 0.0]


@pytest.mark.parametrize("field, value, message", [
    ("colour_weight", -0.5, r"label.colour_weight must be in \[0, 4\], got -0.5"),
    ("colour_bins", 1, r"label.colour_bins must be an integer in \[2, 64\], got 1"),
    ("colour_bins", 8.0, r"label.colour_bins must be an integer in \[2, 64\], got 8.0"),
    ("colour_class_power", 2.0, r"label.colour_class_power must be in \[0, 1\], got 2.0"),
    ("colour_reach", 0.0, r"label.colour_reach must be in \(0, 4\] or null, got 0.0"),
    ("colour_reach", True, r"label.colour_reach must be a number or null, got True"),
    ("colour_weight", None, r"label.colour_weight must be a number, got None"),
    ("colour_class_power", "0.2", r"label.colour_class_power must be a number, got '0.2'"),
    ("crf_weight", None, r"label.crf_weight must be a number, got None"),
    ("prior_kernel", "wide", r"label.prior_kernel must be a number or null, got 'wide'"),
])
def test_the_colour_settings_are_checked(field, value, message):
    from syntagen_st.core.checks import validate_label
    from syntagen_st.core.errors import UserError

    validate_label(CFG)
    with pytest.raises(UserError, match=message):
        validate_label(dataclasses.replace(CFG, **{field: value}))


def test_numpy_numbers_pass_the_colour_checks():
    from syntagen_st.core.checks import validate_label

    validate_label(dataclasses.replace(CFG, colour_weight=np.float32(1.5), colour_class_power=np.float64(0.2),
                                       colour_reach=np.float32(0.125)))
