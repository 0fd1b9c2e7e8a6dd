"""Refinement math on hand-made maps whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from syntagen_st.core.classes import FOREGROUND_CLASSES, NUM_CLASSES
from syntagen_st.selftrain import refine

CAT, DOG, HORSE = 8, 12, 13
ALL_RELIABLE = np.ones(NUM_CLASSES, dtype=bool)


def probs_for(pred: np.ndarray, p: float, second: np.ndarray | None = None) -> np.ndarray:
    """A (21, H, W) softmax putting ``p`` on ``pred`` and the rest on ``second`` (or spread evenly)."""
    probs = np.zeros((NUM_CLASSES, *pred.shape), dtype=np.float32)
    if second is None:
        probs[:] = (1 - p) / (NUM_CLASSES - 1)
    else:
        np.put_along_axis(probs, second[None].astype(np.intp), 1 - p, axis=0)
    np.put_along_axis(probs, pred[None].astype(np.intp), p, axis=0)
    return probs


def relabel(label, probs, allowed, reliable=ALL_RELIABLE, **kw):
    return refine.relabel(label, refine.restricted(probs, allowed), reliable, relabel_confidence=0.8, keep_confidence=0.5, **kw)


def test_confident_reliable_model_fixes_swapped_class_and_fills_unsure():
    label = np.zeros((4, 4), np.uint8)
    label[:2, :2] = CAT  # attention swapped: truly a dog
    label[2, 2] = 255
    truth = np.zeros((4, 4), np.uint8)
    truth[:2, :2] = DOG
    truth[2, 2] = DOG
    out = relabel(label, probs_for(truth, 0.95), [CAT, DOG])
    np.testing.assert_array_equal(out, truth)


def test_disagreement_where_neither_is_confident_becomes_255():
    label = np.full((2, 2), CAT, np.uint8)
    model = np.full((2, 2), DOG, np.uint8)
    probs = probs_for(model, 0.6, second=label)  # dog 0.6 < 0.8, cat 0.4 < 0.5
    assert (relabel(label, probs, [CAT, DOG]) == 255).all()
    # Sure attention keeps its label against a model that is not confident.
    sure = np.array([[0.9, 0.1], [0.1, 0.1]], np.float32)
    out = relabel(label, probs, [CAT, DOG], confidence=sure, sure_threshold=0.8)
    np.testing.assert_array_equal(out, [[CAT, 255], [255, 255]])
    # Agreement is never doubted, however unsure the model.
    assert (relabel(label, probs_for(label, 0.3), [CAT, DOG]) == CAT).all()


def test_class_the_prompt_did_not_name_never_appears():
    label = np.array([[HORSE, HORSE], [CAT, 0]], np.uint8)
    horse_model = probs_for(np.full((2, 2), HORSE, np.uint8), 0.99)  # confident, but unnamed
    out = relabel(label, horse_model, [CAT])
    assert HORSE not in out
    np.testing.assert_array_equal(out[0], [255, 255])
    # An unnamed label pixel takes the model's named class where it is confident and reliable.
    probs = probs_for(np.full((2, 2), CAT, np.uint8), 0.9)
    assert (relabel(label, probs, [CAT]) == CAT).all()


def test_unreliable_class_is_left_alone():
    label = np.full((2, 2), CAT, np.uint8)
    dog_model = probs_for(np.full((2, 2), DOG, np.uint8), 0.95, second=label)
    dog_unreliable = ALL_RELIABLE.copy()
    dog_unreliable[DOG] = False
    assert (relabel(label, dog_model, [CAT, DOG], dog_unreliable) == CAT).all()  # never written
    cat_unreliable = ALL_RELIABLE.copy()
    cat_unreliable[CAT] = False
    assert (relabel(label, dog_model, [CAT, DOG], cat_unreliable) == CAT).all()  # labels untouched
    weak_model = probs_for(np.full((2, 2), DOG, np.uint8), 0.6, second=label)
    assert (relabel(label, weak_model, [CAT, DOG], cat_unreliable) == CAT).all()  # not doubted


def test_a_model_blind_to_a_named_class_writes_no_background():
    # The model has not learnt horse and calls it background: on a sample naming horse its
    # background replaces neither a 255 nor a reliable label; a named reliable class still is written.
    label = np.array([[255, CAT], [255, 255]], np.uint8)
    model = np.array([[0, 0], [CAT, 0]], np.uint8)
    horse_blind = np.zeros(NUM_CLASSES, dtype=bool)
    horse_blind[HORSE] = True
    shut = ~horse_blind
    out = relabel(label, probs_for(model, 0.95), [CAT, HORSE], shut, blind=horse_blind)
    np.testing.assert_array_equal(out, [[255, 255], [CAT, 255]])  # the cat pixel: doubted, not overwritten
    # Where no named class is blind, the model's background is evidence; without the rule, anywhere.
    np.testing.assert_array_equal(relabel(label, probs_for(model, 0.95), [CAT], shut, blind=horse_blind),
                                  [[0, 0], [CAT, 0]])
    np.testing.assert_array_equal(relabel(label, probs_for(model, 0.95), [CAT, HORSE], shut), [[0, 0], [CAT, 0]])


def test_model_is_restricted_to_named_classes():
    probs = np.zeros((NUM_CLASSES, 1, 1), np.float32)
    probs[HORSE], probs[CAT], probs[0] = 0.6, 0.3, 0.1
    restricted = refine.restrict(probs, [CAT])
    pred, top = refine.predict(restricted)
    assert pred[0, 0] == CAT and top[0, 0] == pytest.approx(0.75)


def test_relabel_refuses_bad_values():
    with pytest.raises(ValueError, match="0..20 or 255"):
        relabel(np.full((2, 2), 30, np.uint8), probs_for(np.zeros((2, 2), np.uint8), 0.9), [CAT])


def test_reliability_needs_agreement_and_enough_pixels():
    label = np.zeros((10, 10), np.uint8)
    label[:5] = CAT
    label[9, 9] = DOG
    pred = label.copy()
    pred[:5, :1] = 0  # cat IoU 45/50 = 0.9
    confusion = refine.confusion_matrix(pred, label)
    iou, support = refine.class_iou(confusion), confusion.sum(axis=1)
    reliable = refine.reliable_from(iou, support, 0.85, 10)
    assert reliable[0] and reliable[CAT]
    assert not reliable[DOG]  # perfect, but one pixel is no evidence
    assert not refine.reliable_from(iou, support, 0.95, 10)[CAT]
    label[0, 0] = 255  # ignored
    assert refine.confusion_matrix(pred, label).sum() == 99


def test_background_only_model_is_not_reliable():
    label = np.zeros((10, 10), np.uint8)
    label[:2] = CAT
    confusion = refine.confusion_matrix(np.zeros_like(label), label)  # background IoU 0.8
    assert not refine.reliable_from(refine.class_iou(confusion), confusion.sum(axis=1), 0.5, 1).any()


def test_sample_score_counts_unsure_label_as_miss():
    pred = np.full((2, 2), CAT, np.uint8)
    top = np.full((2, 2), 0.8, np.float32)
    full = refine.sample_score(np.full((2, 2), CAT, np.uint8), pred, top, [CAT], confidence_weight=0.0)
    half = refine.sample_score(np.array([[CAT, CAT], [255, 255]], np.uint8), pred, top, [CAT], 0.0)
    assert full.agreement == 1.0 and half.agreement == 0.5
    mixed = refine.sample_score(np.full((2, 2), CAT, np.uint8), pred, top, [CAT], confidence_weight=0.5)
    assert mixed.score == pytest.approx(0.9) and mixed.confidence == pytest.approx(0.8)


def test_sample_score_leaves_out_a_class_the_model_is_blind_to():
    # Right labels of cat, background and horse; the model has not learnt horse and calls it background.
    label = np.array([[CAT, CAT, 0, 0], [HORSE, HORSE, 0, 0]], np.uint8)
    pred = np.array([[CAT, CAT, 0, 0], [0, 0, 0, 0]], np.uint8)
    top = np.ones((2, 4), np.float32)
    counted = refine.sample_score(label, pred, top, [CAT, HORSE], 0.0)
    assert counted.agreement == pytest.approx((4 / 6 + 1 + 0) / 3)  # background 4/6, cat 1, horse 0
    horse_blind = np.zeros(NUM_CLASSES, dtype=bool)
    horse_blind[HORSE] = True
    assert refine.sample_score(label, pred, top, [CAT, HORSE], 0.0, horse_blind).agreement == 1.0
    # A wrong label of a class the model sees still counts against the sample.
    assert refine.sample_score(label, np.full_like(pred, 0), top, [CAT, HORSE], 0.0,
                               horse_blind).agreement == pytest.approx(1 / 3)


def test_blind_is_a_class_the_model_has_not_learnt_not_every_class_the_gate_shuts():
    from syntagen_st.core.config import RefineConfig
    from syntagen_st.selftrain.decide import blind, gate

    # Core IoU with the labels: cat 0.95 (above the band: shut, but seen), horse 0.2 (not learnt),
    # dog 0.6 (open), bus: too few pixels to tell (as is every class the labels never showed).
    core = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    core[0, 0] = 10_000
    for c, right, wrong in ((CAT, 1900, 100), (HORSE, 400, 1600), (DOG, 1200, 800), (6, 50, 0)):
        core[c, c], core[c, 0] = right, wrong
    evidence = refine.ClassEvidence(core.copy(), core.copy(), core.copy())
    cfg = RefineConfig(min_class_pixels=1000, min_core_persistence=0.0)
    assert np.flatnonzero(gate(evidence, cfg)).tolist() == [0, DOG]
    unseen = blind(evidence, cfg)
    assert not unseen[0] and unseen[[CAT, DOG, HORSE, 6]].tolist() == [False, False, True, True]


def test_drop_selection_picks_the_worst_and_says_why():
    def s(score):
        return refine.SampleScore(agreement=score, confidence=0.5, score=score)

    scores = {"a": s(0.9), "b": s(0.1), "c": s(0.5), "d": s(0.1), "e": s(0.7)}
    dropped = refine.select_drops(scores, drop_fraction=0.4)
    assert list(dropped) == ["b", "d"]  # tie at 0.1 broken by id
    assert "score 0.100" in dropped["b"] and "worst 40%" in dropped["b"] and "agreement 0.100" in dropped["b"]
    assert refine.select_drops(scores, drop_fraction=0.1) == {}
    assert refine.select_drops({}, drop_fraction=0.5) == {}


def test_class_totals_add_up_and_measure_kept_share():
    label = np.array([[CAT, CAT], [0, 255]], np.uint8)
    refined = np.array([[CAT, 255], [0, 0]], np.uint8)
    pred = np.array([[CAT, 0], [0, 0]], np.uint8)
    top = np.array([[0.9, 0.5], [0.7, 0.6]], np.float32)
    totals = refine.class_totals(label, refined, pred, top) + refine.class_totals(label, refined, pred, top)
    assert totals.kept_share()[CAT] == 0.5 and totals.kept_share()[0] == 1.0  # capped at 1
    assert totals.mean_confidence()[CAT] == pytest.approx(0.9)
    assert totals.iou()[CAT] == 0.5 and np.isnan(totals.iou()[DOG])


def test_weakest_class_gets_the_most_weight():
    iou = np.full(NUM_CLASSES, 0.8)
    confidence = np.full(NUM_CLASSES, 0.9)
    kept = np.full(NUM_CLASSES, 0.9)
    iou[DOG], confidence[DOG] = 0.2, 0.4
    iou[CAT] = np.nan  # never seen: maximally weak
    weakness = refine.class_weakness(iou, confidence, kept)
    assert weakness[CAT] == pytest.approx(1 - (0.9 + 0.9) / 3)
    weights = refine.prompt_weights(weakness, power=2.0, min_weight=0.2)
    assert set(weights) == set(FOREGROUND_CLASSES)
    assert max(weights, key=weights.get) == "dog"
    assert weights["cat"] > weights["horse"]
    assert np.mean(list(weights.values())) == pytest.approx(1.0)
    # The floor: no class falls below min_weight x the mean before normalising.
    floored = refine.prompt_weights(np.eye(NUM_CLASSES)[DOG], power=1.0, min_weight=0.2)
    assert min(floored.values()) > 0
    assert refine.prompt_weights(np.zeros(NUM_CLASSES), 1.0, 0.2) == {n: 1.0 for n in FOREGROUND_CLASSES}


def test_core_mask_keeps_pixels_away_from_boundaries_and_the_255_band():
    label = np.zeros((10, 10), np.uint8)
    label[2:6, 2:6] = CAT
    label[8, 8] = 255
    core = refine.core_mask(label, margin=1)
    expected_cat = np.zeros_like(core)
    expected_cat[3:5, 3:5] = True
    assert np.array_equal(core & (label == CAT), expected_cat)
    assert not core[1:7, 1:7][label[1:7, 1:7] == 0].any()  # the ring of background around the cat
    assert not core[7:10, 7:10].any()  # the 255 pixel and its neighbours
    assert core[0, 0] and core[9, 0]  # the image edge is no boundary
    assert np.array_equal(refine.core_mask(label, margin=0), label != 255)


def test_core_mask_matches_a_brute_force_window_on_random_labels():
    rng = np.random.default_rng(0)
    for margin in (1, 2, 3):
        label = rng.choice(np.array([0, CAT, DOG, 255], np.uint8), size=(9, 11), p=[0.5, 0.2, 0.2, 0.1])
        label = np.repeat(np.repeat(label, 6, axis=0), 5, axis=1)  # blocks, so some cores exist
        padded = np.pad(label, margin, mode="edge")
        expected = np.zeros(label.shape, bool)
        for y in range(label.shape[0]):
            for x in range(label.shape[1]):
                window = padded[y : y + 2 * margin + 1, x : x + 2 * margin + 1]
                expected[y, x] = label[y, x] != 255 and (window == label[y, x]).all()
        assert expected.any()
        assert np.array_equal(refine.core_mask(label, margin), expected), margin


def test_core_reliability_ignores_boundary_noise_but_not_class_errors():
    """A label dilated by 2 px around a model that is right: agreement over every pixel says
    unreliable (IoU 0.36), agreement on the label's core says reliable."""
    truth = np.zeros((32, 32), np.uint8)
    truth[12:18, 12:18] = CAT
    label = np.zeros_like(truth)
    label[10:20, 10:20] = CAT
    ev = refine.class_evidence(label, truth, core_margin=2 / 32)
    assert refine.class_iou(ev.confusion)[CAT] == pytest.approx(36 / 100)
    assert ev.core_iou()[CAT] == pytest.approx(1.0)
    assert ev.support()[CAT] == 36
    assert refine.reliable_from(ev.core_iou(), ev.support(), 0.7, 10)[[0, CAT]].all()
    # The model calls the cat a dog: its core disagrees with the label, and the gate shuts.
    ev = refine.class_evidence(label, np.where(truth == CAT, DOG, 0).astype(np.uint8), core_margin=2 / 32)
    assert not refine.reliable_from(ev.core_iou(), ev.support(), 0.7, 10).any()
    # Margin 0 is agreement over every labelled pixel.
    assert np.array_equal(refine.class_evidence(label, truth, 0.0).core_confusion, refine.confusion_matrix(truth, label))


def test_reliable_from_needs_support_and_a_foreground_class():
    score = np.full(NUM_CLASSES, np.nan)
    score[0], score[CAT], score[DOG] = 0.9, 0.9, 0.95
    support = np.zeros(NUM_CLASSES, np.int64)
    support[0], support[CAT], support[DOG] = 100, 100, 5
    reliable = refine.reliable_from(score, support, 0.8, 10)
    assert np.flatnonzero(reliable).tolist() == [0, CAT]  # dog: too few pixels; NaN classes: no
    score[CAT] = 0.7
    assert not refine.reliable_from(score, support, 0.8, 10).any()  # background alone knows nothing


def test_gate_opens_only_where_the_model_is_sound_on_the_cores_but_not_perfect_there():
    """The band alone (min_persistence 0; the next test has the persistence rule)."""
    truth = np.zeros((32, 32), np.uint8)
    truth[8:24, 8:24] = CAT
    noisy = np.zeros_like(truth)
    noisy[4:28, 4:28] = CAT  # dilated by 4 px: its core (eroded by 2) is 20 x 20, the cat 16 x 16
    # A model that is right, against noisy labels: it agrees with their cores at 256 / 400.
    ev = refine.class_evidence(noisy, truth, core_margin=2 / 32)
    assert ev.core_iou()[CAT] == pytest.approx(0.64)
    assert np.flatnonzero(refine.reliable_classes(ev, 0.5, 0.85, 10, 0.0)).tolist() == [0, CAT]
    assert not refine.reliable_classes(ev, 0.7, 0.85, 10, 0.0).any()  # below min_core
    # The same model against labels whose cores it matches: nothing to fix, the gate stays shut,
    # even though a boundary error keeps agreement over every pixel low.
    blurred = truth.copy()
    blurred[7, 8:24] = CAT
    blurred[8:24, 7] = CAT
    ev = refine.class_evidence(blurred, truth, core_margin=2 / 32)
    assert ev.core_iou()[CAT] == pytest.approx(1.0) and refine.class_iou(ev.confusion)[CAT] < 0.9
    assert not refine.reliable_classes(ev, 0.5, 0.85, 10, 0.0).any()
    assert refine.reliable_classes(ev, 0.5, 1.0, 10, 0.0)[CAT]  # max_core 1: the lower bound alone
    # A model that is wrong (calls the cat a dog) against the noisy labels: shut.
    ev = refine.class_evidence(noisy, np.where(truth == CAT, DOG, 0).astype(np.uint8), core_margin=2 / 32)
    assert not refine.reliable_classes(ev, 0.5, 0.85, 10, 0.0).any()


def test_gate_shuts_a_class_whose_core_disagreement_fades_inward():
    """Core IoU in the band can be the model's own boundary error reaching past the margin (a
    small object, a coarse model) on labels that are right; whole-object class errors are as
    frequent on the deep core as on the core."""
    label = np.zeros((48, 48), np.uint8)
    label[16:32, 16:32] = CAT  # right: the truth
    model = np.zeros_like(label)
    model[19:29, 19:29] = CAT  # eroded by 3 px, one past the core's 2 px margin
    ev = refine.class_evidence(label, model, core_margin=2 / 48)
    assert ev.core_iou()[CAT] == pytest.approx(100 / 144)  # in the band
    assert ev.deep_core_iou()[CAT] == pytest.approx(1.0)  # margin 4: the disagreement is gone
    assert ev.persistence()[CAT] == pytest.approx(0.0)
    assert not refine.reliable_classes(ev, 0.5, 0.85, 10, 0.8).any()
    assert np.flatnonzero(refine.reliable_classes(ev, 0.5, 0.85, 10, 0.0)).tolist() == [0, CAT]  # the test off
    # A decoy labelled cat beside the real one, which the model calls background: the error is
    # the whole object, as frequent at every depth, and the gate opens.
    truth = np.zeros((48, 48), np.uint8)
    truth[4:20, 4:20] = CAT
    noisy = truth.copy()
    noisy[28:44, 28:44] = CAT
    ev = refine.class_evidence(noisy, truth, core_margin=2 / 48)
    assert ev.core_iou()[CAT] == pytest.approx(144 / 288) and ev.deep_core_iou()[CAT] == pytest.approx(64 / 128)
    assert ev.persistence()[CAT] == pytest.approx(1.0)
    assert np.flatnonzero(refine.reliable_classes(ev, 0.5, 0.85, 10, 0.8)).tolist() == [0, CAT]
    # Labels that bleed past the margin, against a right model, fade inward the same way: the
    # gate leaves such a class to the image-guided refinement.
    bled = np.zeros((48, 48), np.uint8)
    bled[12:36, 12:36] = CAT
    ev = refine.class_evidence(bled, label, core_margin=2 / 48)  # label: the cat, 4 px inside
    assert 0.5 <= ev.core_iou()[CAT] <= 0.85 and ev.persistence()[CAT] < 0.8
    assert not refine.reliable_classes(ev, 0.5, 0.85, 10, 0.8).any()
    # Margin 0 has no deeper core: the test reads the same pixels and never shuts a class.
    assert refine.class_evidence(noisy, truth, 0.0).persistence()[CAT] == pytest.approx(1.0)
    # A class with a core but no deep core gives no evidence that its disagreement persists.
    thin = np.zeros((48, 48), np.uint8)
    thin[10:17, :] = CAT  # 7 px: a 3 px core at margin 2, nothing at margin 4
    ev = refine.class_evidence(thin, np.zeros_like(thin), core_margin=2 / 48)
    assert ev.support()[CAT] > 0 and np.isnan(ev.persistence()[CAT])
    assert not refine.reliable_classes(ev, 0.0, 0.85, 10, 0.8)[CAT]
