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
BIKE, CAT = 2, 8


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


def test_the_reach_keeps_a_far_look_alike_background_and_without_it_a_missed_object_comes_back():
    # Two orange squares far apart, farther than the CRF's reach; the label holds only the first.
    # Whether the second is a missed cat or a stretch of background of the cat's colour, the
    # image cannot tell: within the reach (the default) it stays background, without it it is cat.
    image = _grey(128)
    image[8:40, 8:40] = (240, 130, 20)
    image[88:120, 88:120] = (240, 130, 20)
    image = image.astype(np.uint8)
    label = np.zeros((128, 128), np.uint8)
    label[8:40, 8:40] = CAT
    assert CFG.colour_reach is not None
    near = refine_label(image, label, [CAT], CFG)[1].numpy()
    assert (near[88:120, 88:120] == 0).all() and (near[8:40, 8:40] == CAT).all()
    anywhere = refine_label(image, label, [CAT], dataclasses.replace(CFG, colour_reach=None))[1].numpy()
    assert (anywhere[88:120, 88:120] == CAT).mean() > 0.95
    assert (refine_label(image, label, [CAT], OFF)[1].numpy()[88:120, 88:120] == CAT).mean() < 0.05


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
    assert (post[0, 40:52] > 0.9).all() and (post[1, 4:12, 4:12] > 0.7).all()
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
    # A flat image: every pixel has one colour, so the posterior is each class's size share.
    flat = np.full((32, 32, 3), 90, np.uint8)
    prior = label_prior(label, [BIKE], CFG.prior_confidence)
    post = colour_posterior(flat, prior, 8, 1.0, None)
    share = (label == BIKE).sum() / label.size
    assert torch.allclose(post[1], torch.full((32, 32), float(share)), atol=1e-3)
    # Weight 0: the prior as it was; rows sum to one otherwise; a read-only image is taken.
    assert torch.equal(with_colour(image, prior, 0.0, 8, 0.5, None), prior)
    image.setflags(write=False)
    out = with_colour(image, prior, 1.0, 8, 0.5, 0.125)
    assert torch.allclose(out.sum(0), torch.ones(32, 32), atol=1e-5)
    with pytest.raises(ValueError, match=r"the image is \(32, 32, 3\), the probabilities \(2, 16, 16\)"):
        colour_posterior(image, prior[:, :16, :16], 8, 0.5, None)


@pytest.mark.parametrize("field, value, message", [
    ("colour_weight", -0.5, r"label.colour_weight must be in \[0, 4\], got -0.5"),
    ("colour_bins", 1, r"label.colour_bins must be an integer in \[2, 64\], got 1"),
    ("colour_bins", 8.0, r"label.colour_bins must be an integer in \[2, 64\], got 8.0"),
    ("colour_class_power", 2.0, r"label.colour_class_power must be in \[0, 1\], got 2.0"),
    ("colour_reach", 0.0, r"label.colour_reach must be in \(0, 4\] or null, got 0.0"),
])
def test_the_colour_settings_are_checked(field, value, message):
    from syntagen_st.core.checks import validate_label
    from syntagen_st.core.errors import UserError

    validate_label(CFG)
    with pytest.raises(UserError, match=message):
        validate_label(dataclasses.replace(CFG, **{field: value}))
