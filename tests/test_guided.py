"""Image-guided refinement on hand-made images with known edges."""

import dataclasses

import numpy as np
import pytest
import torch

from syntagen_st.core.classes import IGNORE_INDEX
from syntagen_st.core.config import LabelConfig
from syntagen_st.core.guided import label_prior, refine_label, refine_probs, refine_scores, scores_to_labels

CFG = LabelConfig()
CAT = 8


def _square_scene(size=128, lo=32, hi=96):
    """A bright square on a dark, slightly noisy background; the truth mask."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(40, 6, size=(size, size, 3)), 0, 255)
    truth = np.zeros((size, size), dtype=bool)
    truth[lo:hi, lo:hi] = True
    image[truth] = np.clip(rng.normal(210, 6, size=(int(truth.sum()), 3)), 0, 255)
    return image.astype(np.uint8), truth


def _blob_scores(size, truth, factor=16):
    """The truth seen through a 1/factor grid and upsampled, as attention is: a blob with round
    corners that misses and bleeds over the edges by up to half a cell."""
    t = torch.from_numpy(truth.astype(np.float32))[None, None]
    low = torch.nn.functional.avg_pool2d(t, factor) / 0.6
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
    return up.clamp(0, 0.99)


def _iou(a, b):
    return float((a & b).sum() / (a | b).sum())


def test_a_blob_comes_out_edge_aligned():
    image, truth = _square_scene(256, 60, 190)
    scores = _blob_scores(256, truth)
    before = scores_to_labels(scores, [CAT], CFG.fg_threshold, CFG.band_threshold).numpy() == CAT
    refined = refine_scores(image, scores, CFG)
    assert refined.min() >= 0 and refined.max() <= 1  # the filter overshoots at edges: clamped
    after = scores_to_labels(refined, [CAT], CFG.fg_threshold, CFG.band_threshold).numpy() == CAT
    assert _iou(before, truth) < 0.94
    assert _iou(after, truth) > 0.99


def test_a_hard_blob_label_follows_the_edges_as_a_prior():
    image, truth = _square_scene(256, 60, 190)
    blob = _blob_scores(256, truth).numpy()[0]
    label = np.where(blob >= 0.6, CAT, 0).astype(np.uint8)
    label[(blob >= 0.5) & (blob < 0.6)] = IGNORE_INDEX
    _, refined = refine_label(image, label, [CAT], CFG)
    refined = refined.numpy()
    assert _iou(label == CAT, truth) < 0.94
    assert _iou(refined == CAT, truth) > 0.96
    assert (refined[~truth] == CAT).mean() < 0.015  # the blob: 0.023


def test_a_clean_label_comes_out_unchanged():
    image, truth = _square_scene()
    label = np.where(truth, CAT, 0).astype(np.uint8)
    _, refined = refine_label(image, label, [CAT], CFG)
    assert np.array_equal(refined.numpy(), label)
    scores = torch.from_numpy(truth.astype(np.float32))[None]
    assert torch.equal(scores_to_labels(refine_scores(image, scores, CFG), [CAT], 0.6, 0.5).bool(), scores[0].bool())


def test_a_clean_label_on_a_faint_edge_gains_no_band():
    # Where the image barely shows the edge, the filter blurs the prior: the pixels take their
    # most probable class instead of becoming 255 (which cost clean shapes 3 points).
    image = np.full((128, 128, 3), 100, dtype=np.uint8)
    image[:, 64:] = 108
    label = np.zeros((128, 128), dtype=np.uint8)
    label[:, 64:] = CAT
    _, refined = refine_label(image, label, [CAT], CFG)
    assert not (refined == IGNORE_INDEX).any()
    assert (refined.numpy() == label).mean() > 0.97


def test_255_everywhere_stays_unsure_on_a_flat_image():
    image = np.full((64, 64, 3), 120, dtype=np.uint8)
    label = np.full((64, 64), IGNORE_INDEX, dtype=np.uint8)
    probs, refined = refine_label(image, label, [CAT, 12], CFG)
    assert probs.shape == (3, 64, 64)
    assert torch.allclose(probs, torch.full_like(probs, 1 / 3), atol=1e-4)
    assert (refined == IGNORE_INDEX).all()


def test_one_class_and_background_only():
    image, truth = _square_scene(64, 16, 48)
    label = np.where(truth, CAT, 0).astype(np.uint8)
    probs, refined = refine_label(image, label, [CAT], CFG)
    assert probs.shape == (2, 64, 64) and torch.allclose(probs.sum(0), torch.ones(64, 64), atol=1e-5)
    only_bg, lab = refine_label(image, np.zeros((64, 64), np.uint8), [], CFG)
    assert only_bg.shape == (1, 64, 64) and (lab == 0).all()
    assert refine_scores(image, torch.zeros(0, 64, 64), CFG).shape == (0, 64, 64)


def test_a_flat_image_only_smooths():
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    scores = torch.zeros(1, 64, 64)
    scores[0, 20:44, 20:44] = 1.0
    out = refine_scores(image, scores, CFG)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert abs(float(out.mean()) - float(scores.mean())) < 0.02  # no colour to follow: mass is kept


def test_off_returns_the_scores_and_tiny_images_pass_through():
    image, truth = _square_scene()
    scores = _blob_scores(128, truth)
    assert torch.equal(refine_scores(image, scores, dataclasses.replace(CFG, refine_image=False)), scores)
    line = torch.rand(2, 1, 5)  # no room for a window: passed through
    assert torch.equal(refine_scores(np.zeros((1, 5, 3), np.uint8), line, CFG), line)


def test_prior_puts_the_confidence_on_the_labelled_class():
    label = np.array([[0, CAT], [IGNORE_INDEX, 15]], dtype=np.uint8)
    prior = label_prior(label, [CAT], 0.7)
    assert torch.allclose(prior[:, 0, 1], torch.tensor([0.3, 0.7]))
    assert torch.allclose(prior[:, 0, 0], torch.tensor([0.7, 0.3]))
    assert torch.allclose(prior[:, 1, 0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(prior[:, 1, 1], torch.tensor([0.5, 0.5]))  # a class not named: uniform


def _bleeding_square():
    """A hard label 8 px too wide all round a square, over a flat background."""
    image, truth = _square_scene(128, 40, 88)
    label = np.zeros((128, 128), np.uint8)
    label[32:96, 32:96] = CAT
    return image, truth, label


def test_a_label_bleeding_past_the_edge_is_cut_back_over_passes_of_the_prior_window():
    # Each guided pass takes back part of the bleed, so three passes of the import's window
    # beat one, and beat attention's window.
    image, truth, label = _bleeding_square()

    def iou(**settings):
        # The colour model alone would cut this bleed too: off, the passes are what is measured.
        cfg = dataclasses.replace(CFG, prior_method="guided", prior_doubt=False, colour_weight=0.0, **settings)
        return _iou(refine_label(image, label, [CAT], cfg)[1].numpy() == CAT, truth)

    assert _iou(label == CAT, truth) < 0.57
    assert iou(prior_passes=3, prior_kernel=0.125) > 0.72
    assert iou(prior_passes=1, prior_kernel=0.125) < 0.62
    assert iou(prior_passes=3, prior_kernel=None, refine_kernel=0.0625) < 0.6


def test_the_crf_cuts_a_bleeding_label_back_to_the_edge_in_one_pass():
    # The appearance kernel reaches past the bleed: the dark ring the label wrongly holds is
    # pulled to the dark background it matches. The label called it cat, so it becomes 255
    # (doubt), or background without the doubt rule; the square itself is cat either way.
    image, truth, label = _bleeding_square()
    probs, refined = refine_label(image, label, [CAT], CFG)
    assert CFG.prior_method == "crf" and CFG.prior_doubt
    refined = refined.numpy()
    assert _iou(refined == CAT, truth) > 0.99
    ring = (label == CAT) & ~truth
    assert (refined[ring] == IGNORE_INDEX).mean() > 0.99
    assert (refined[label == 0] == 0).all()  # background the label and the image agree on stays
    assert torch.allclose(probs.sum(0), torch.ones(128, 128), atol=1e-4)
    erased = refine_label(image, label, [CAT], dataclasses.replace(CFG, prior_doubt=False))[1].numpy()
    assert _iou(erased == CAT, truth) > 0.99 and (erased[ring] == 0).mean() > 0.99
    # Without the appearance kernel and the colour model the prior stands: they cut the bleed.
    weak = dataclasses.replace(CFG, crf_weight=0.0, colour_weight=0.0)
    assert _iou(refine_label(image, label, [CAT], weak)[1].numpy() == CAT, truth) < 0.57
    assert _iou(refine_label(image, label, [CAT], dataclasses.replace(CFG, colour_weight=0.0))[1].numpy() == CAT,
                truth) > 0.99


def test_on_a_flat_image_the_crf_doubts_a_label_instead_of_erasing_it():
    # No colour to follow: the wide appearance kernel smooths a small object toward the
    # background around it. The doubt rule leaves it unsure (255), never background.
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[8:16, 8:16] = CAT
    refined = refine_label(image, label, [CAT], CFG)[1].numpy()
    assert set(np.unique(refined[label == CAT])) <= {CAT, IGNORE_INDEX}
    assert (refined[label == 0] == 0).all()
    erased = refine_label(image, label, [CAT], dataclasses.replace(CFG, prior_doubt=False))[1].numpy()
    assert (erased[label == CAT] == 0).all()  # what the rule prevents


def test_a_label_absent_of_a_class_it_names_keeps_no_background():
    # A cat square the label places, and a dog (class 12) it names but holds no pixel of: the dog
    # may be anywhere the label says background, so none of it stays background. The cat stays.
    image, truth = _square_scene(64, 16, 48)
    label = np.where(truth, CAT, 0).astype(np.uint8)
    refined = refine_label(image, label, [CAT, 12], CFG)[1].numpy()
    assert CFG.absent_doubt
    assert _iou(refined == CAT, truth) > 0.99
    assert (refined[~truth] == IGNORE_INDEX).all()
    assert not (refined == 0).any()
    # Without the rule, or with every named class placed, background the label and the image agree on stays.
    kept = refine_label(image, label, [CAT, 12], dataclasses.replace(CFG, absent_doubt=False))[1].numpy()
    assert (kept[~truth] == 0).all()
    placed = label.copy()
    placed[0:2, 0:2] = 12
    both = refine_label(image, placed, [CAT, 12], CFG)[1].numpy()
    assert (both[4:, 4:][~truth[4:, 4:]] == 0).all()
    # A class placed as given but lost in the refinement is no absent class: its pixels are doubted (255) instead.
    flat = np.full((64, 64, 3), 90, dtype=np.uint8)
    small = np.zeros((64, 64), np.uint8)
    small[8:16, 8:16] = CAT
    lost = refine_label(flat, small, [CAT], CFG)[1].numpy()
    assert not (lost == CAT).any() and (lost[small == 0] == 0).all()
    # Naming no class, a label is all background and stays so.
    assert (refine_label(image, np.zeros((64, 64), np.uint8), [], CFG)[1].numpy() == 0).all()


def test_the_crf_sorts_two_classes_by_the_colours_their_labels_hold():
    # Two squares of different colours, each label a blob bleeding into the other's and the
    # background: every pixel goes to the class whose colour it has.
    image, _ = _square_scene(128, 20, 60)
    truth = np.zeros((128, 128), np.uint8)
    truth[20:60, 20:60] = CAT
    truth[64:108, 64:108] = 12
    image[64:108, 64:108] = (30, 200, 90)
    label = np.zeros((128, 128), np.uint8)
    label[14:70, 14:70] = CAT
    label[60:114, 60:114] = 12
    label[58:66, 58:66] = IGNORE_INDEX
    refined = refine_label(image, label, [CAT, 12], CFG)[1].numpy()
    assert (label == truth).mean() < 0.9
    labelled = refined != IGNORE_INDEX
    assert (refined[labelled] == truth[labelled]).mean() > 0.999 and labelled.mean() > 0.8
    assert (refined[truth > 0] == truth[truth > 0]).mean() > 0.99  # each square is its own class


def test_refine_probs_keeps_a_prior_on_the_device_and_in_shape():
    image, truth = _square_scene(64, 16, 48)
    prior = label_prior(np.where(truth, CAT, 0).astype(np.uint8), [CAT], 0.8)
    for method in ("crf", "guided"):
        out = refine_probs(image, prior, dataclasses.replace(CFG, prior_method=method))
        assert out.shape == prior.shape and out.dtype == torch.float32
        assert torch.allclose(out.sum(0), torch.ones(64, 64), atol=1e-4)
        assert ((out.argmax(0) == 1).numpy() == truth).mean() > 0.99


def test_the_crf_takes_a_read_only_image():
    # A decoded PIL image is read-only; pydensecrf needs a writeable buffer.
    image, truth = _square_scene(64, 16, 48)
    image.setflags(write=False)
    label = np.where(truth, CAT, 0).astype(np.uint8)
    assert np.array_equal(refine_label(image, label, [CAT], CFG)[1].numpy(), label)


def test_the_crf_solved_at_a_working_side_comes_back_at_full_size():
    image, truth, label = _bleeding_square()
    probs, refined = refine_label(image, label, [CAT], dataclasses.replace(CFG, crf_work_side=64))
    assert probs.shape == (2, 128, 128) and torch.allclose(probs.sum(0), torch.ones(128, 128), atol=1e-4)
    assert _iou(refined.numpy() == CAT, truth) > 0.95  # the edge within a pixel of the half-size grid
    full = refine_label(image, label, [CAT], CFG)[0]
    assert not torch.allclose(probs, full)  # solved at 64 px, not at 128


def test_doubt_reads_the_label_as_given_and_spares_a_sample_naming_no_class():
    image, truth, label = _bleeding_square()
    label[0:4, 0:4] = IGNORE_INDEX  # unsure in the label, background in the image: stays unsure
    label[120:124, 0:4] = 15  # a class the sample does not name: uniform prior, background: unsure
    refined = refine_label(image, label, [CAT], CFG)[1].numpy()
    assert (refined[0:4, 0:4] == IGNORE_INDEX).all() and (refined[120:124, 0:4] == IGNORE_INDEX).all()
    # Nothing named: background is all there is, and a 255 pixel may become it.
    only = refine_label(image, np.full((128, 128), IGNORE_INDEX, np.uint8), [], CFG)[1].numpy()
    assert (only == 0).all()
    mixed = np.zeros((128, 128), np.uint8)
    mixed[:8] = 15
    assert (refine_label(image, mixed, [], CFG)[1].numpy() == 0).all()


def test_an_image_of_another_size_is_one_clear_error():
    image, truth = _square_scene(64, 16, 48)
    prior = label_prior(np.zeros((32, 32), np.uint8), [CAT], 0.8)
    with pytest.raises(ValueError, match=r"the image is \(64, 64, 3\), the probabilities \(2, 32, 32\)"):
        refine_probs(image, prior, CFG)
    with pytest.raises(ValueError, match="unknown refinement method 'CRF'"):
        refine_probs(image, label_prior(np.zeros((64, 64), np.uint8), [CAT], 0.8),
                     dataclasses.replace(CFG, prior_method="CRF"))


@pytest.mark.parametrize("field, value, message", [
    ("prior_method", "CRF", "label.prior_method must be crf or guided, got 'CRF'"),
    ("prior_doubt", 1, "label.prior_doubt must be true or false, got 1"),
    ("absent_doubt", "yes", "label.absent_doubt must be true or false, got 'yes'"),
    ("crf_iterations", 0, "label.crf_iterations must be an integer >= 1, got 0"),
    ("crf_spatial", 0.0, r"label.crf_spatial must be in \(0, 4\], got 0.0"),
    ("crf_colour", 0.0, "label.crf_colour must be > 0, got 0.0"),
    ("crf_weight", -1.0, "label.crf_weight must be >= 0, got -1.0"),
    ("crf_work_side", 4, "label.crf_work_side must be an integer >= 8 or null, got 4"),
])
def test_the_crf_settings_are_checked(field, value, message):
    from syntagen_st.core.checks import validate_label
    from syntagen_st.core.errors import UserError

    validate_label(CFG)
    with pytest.raises(UserError, match=message):
        validate_label(dataclasses.replace(CFG, **{field: value}))


def test_over_guided_passes_doubt_reads_the_label_as_given(monkeypatch):
    # Scripted passes: the first calls every pixel cat, the second background. A pixel the label
    # gave background is background, not doubted because an earlier pass called it cat.
    from syntagen_st.core import guided

    passes = iter([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])])
    monkeypatch.setattr(guided, "refine_probs", lambda image, prior, cfg: next(passes)[:, None, None].expand(prior.shape))
    label = np.zeros((4, 4), np.uint8)
    label[:2] = CAT
    cfg = dataclasses.replace(CFG, prior_method="guided", prior_passes=2)
    out = refine_label(np.zeros((4, 4, 3), np.uint8), label, [CAT], cfg)[1].numpy()
    assert (out[2:] == 0).all() and (out[:2] == IGNORE_INDEX).all()
