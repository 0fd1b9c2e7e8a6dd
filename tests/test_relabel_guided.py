"""The relabel step's image-guided view (selftrain/combine.py) and flip test-time augmentation,
on hand-made arrays and models whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from syntagen_st.core.classes import NUM_CLASSES
from syntagen_st.core.config import LabelConfig
from syntagen_st.selftrain import refine as rf
from syntagen_st.selftrain.combine import combine, guided_view

CAT, DOG = 8, 12
ALL_RELIABLE = np.ones(NUM_CLASSES, dtype=bool)
FILTER = LabelConfig(refine_kernel=0.25, prior_method="guided")
"""A window of a quarter of the side: a blurry model's confident core reaches the edges."""
CRF = LabelConfig()
"""The shipped relabel refinement: the dense CRF."""


def iou(a: np.ndarray, b: np.ndarray, c: int) -> float:
    return float(((a == c) & (b == c)).sum() / ((a == c) | (b == c)).sum())


def test_combine_is_the_product_with_the_prior_renormalised_over_the_named_classes():
    probs = np.zeros((NUM_CLASSES, 1, 3), np.float32)
    probs[[0, CAT, DOG, 5]] = np.array([0.2, 0.5, 0.2, 0.1], np.float32)[:, None, None]
    model = rf.restricted(probs, [CAT, DOG])  # class 5 unnamed: its 0.1 is dropped
    label = np.array([[CAT, 255, 5]], np.uint8)
    out = combine(model, label, 0.7)
    # CAT pixel: prior (0.15, 0.7, 0.15) x model (2/9, 5/9, 2/9), renormalised.
    want = np.array([0.15 * 2, 0.7 * 5, 0.15 * 2]) / (0.15 * 2 + 0.7 * 5 + 0.15 * 2)
    np.testing.assert_allclose(out[[0, CAT, DOG], 0, 0], want, rtol=1e-6)
    # A 255 pixel and a pixel of an unnamed class have a uniform prior: the model as it was.
    np.testing.assert_allclose(out[:, 0, 1], model.probs[:, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, 2], model.probs[:, 0, 2], rtol=1e-6)
    assert out[5].max() == 0 and np.allclose(out.sum(0), 1)
    # Confidence 0 leaves the model alone.
    np.testing.assert_array_equal(combine(model, label, 0.0), model.probs)


def square_scene(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, rf.Restricted]:
    """A sharp cat square on a flat background; the attention label is a round blob that bleeds
    past it; the held-out model is right but blurry (its softmax is the truth box-blurred)."""
    truth = np.zeros((size, size), np.uint8)
    truth[20:44, 20:44] = CAT
    image = np.full((size, size, 3), 60, np.uint8)
    image[truth == CAT] = (230, 140, 30)
    y, x = np.mgrid[:size, :size]
    blob = np.where((y - 30) ** 2 + (x - 34) ** 2 <= 17**2, CAT, 0).astype(np.uint8)
    soft = F.avg_pool2d(torch.from_numpy((truth == CAT).astype(np.float32))[None, None], 9, 1, 4,
                        count_include_pad=False)[0, 0].numpy()
    probs = np.zeros((NUM_CLASSES, size, size), np.float32)
    probs[CAT], probs[0] = 0.02 + 0.96 * soft, 0.98 - 0.96 * soft
    probs[DOG] = 0.02
    return image, truth, blob, rf.restricted(probs, [CAT, DOG])


def relabel(label, view):
    return rf.relabel(label, view, ALL_RELIABLE, relabel_confidence=0.8, keep_confidence=0.3)


@pytest.mark.parametrize("method", [FILTER, CRF], ids=["guided", "crf"])
def test_a_blob_label_relabelled_with_the_image_follows_the_squares_edges(method):
    image, truth, blob, model = square_scene()
    plain = relabel(blob, model)
    guided = relabel(blob, guided_view(model, blob, image, 0.5, method))
    assert iou(blob, truth, CAT) < 0.75
    assert iou(plain, truth, CAT) < 0.85  # the blurry model alone leaves a ragged 255 edge
    assert iou(guided, truth, CAT) > 0.97
    assert (guided == truth).mean() > 0.97


def test_the_crf_relabel_takes_the_image_where_a_blurry_model_is_unsure():
    # The model's blur alone: a 4 px band around the square under 0.8 confidence. The CRF's
    # view is sure there and right, the guided filter's is not sure everywhere.
    image, truth, blob, model = square_scene()
    view = guided_view(model, blob, image, 0.5, CRF)
    edge = (model.top < 0.8) & (np.abs(np.gradient((truth == CAT).astype(float))).sum(0) == 0)
    assert edge.sum() > 100
    assert (view.top[edge] >= 0.8).mean() > 0.95 and (view.pred[edge] == truth[edge]).mean() > 0.99


@pytest.mark.parametrize("method", [FILTER, CRF], ids=["guided", "crf"])
def test_a_clean_label_comes_out_unchanged(method):
    image, truth, _, model = square_scene()
    assert np.array_equal(relabel(truth, guided_view(model, truth, image, 0.5, method)), truth)


def test_a_class_that_fails_the_gate_is_never_written_by_the_guided_view():
    image, truth, blob, model = square_scene()
    shut = ALL_RELIABLE.copy()
    shut[CAT] = False
    empty = np.zeros_like(blob)
    view = guided_view(model, empty, image, 0.5, FILTER)
    assert (view.pred == CAT).any() and view.top[view.pred == CAT].max() > 0.6
    out = rf.relabel(empty, view, shut, 0.6, 0.3)  # the model is confident enough to write cat...
    assert CAT not in out  # ...but cat failed the gate
    # ...and its label pixels are never touched by the model.
    out = rf.relabel(blob, guided_view(model, blob, image, 0.5, FILTER), shut, 0.6, 0.3)
    assert np.array_equal(out[blob == CAT], blob[blob == CAT])


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: its output at a pixel depends on that pixel only, so it is flip-symmetric."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


class Ramp(Pointwise):
    """...plus a left-to-right ramp on class 1's logit: its mirror sees the ramp reversed."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.conv(x)
        ramp = torch.linspace(-4, 4, x.shape[-1])
        return {"out": torch.cat([out[:, :1], out[:, 1:2] + ramp, out[:, 2:]], 1)}


@pytest.fixture
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (8, 12, 3), dtype=np.uint8) for _ in range(3)]


def test_flip_tta_on_a_flip_symmetric_model_changes_nothing(images):
    from syntagen_st.segmentation.network import predict_proba

    plain = list(predict_proba(Pointwise(), images, batch_size=2))
    tta = list(predict_proba(Pointwise(), images, batch_size=2, flip=True))
    for a, b in zip(plain, tta):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_flip_tta_averages_the_image_and_its_mirror(images):
    from syntagen_st.segmentation.network import predict_proba

    plain = list(predict_proba(Ramp(), images, batch_size=2))
    mirrored = list(predict_proba(Ramp(), [im[:, ::-1].copy() for im in images], batch_size=2))
    tta = list(predict_proba(Ramp(), images, batch_size=2, flip=True))
    for a, m, t in zip(plain, mirrored, tta):
        np.testing.assert_allclose(t, (a + m[:, :, ::-1]) / 2, atol=1e-6)
        assert np.abs(t - a).max() > 0.1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("relabel_prior", 1.0, "refine.relabel_prior must be in [0, 1), got 1.0"),
    ("relabel_kernel", 0.0, "refine.relabel_kernel must be in (0, 1], got 0.0"),
    ("relabel_eps", 0.0, "refine.relabel_eps must be > 0, got 0.0"),
])
def test_the_relabel_refinement_settings_are_checked(field, value, message):
    import dataclasses

    from syntagen_st.core.checks import validate_refine
    from syntagen_st.core.config import RefineConfig
    from syntagen_st.core.errors import ConfigError

    validate_refine(RefineConfig())
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate_refine(dataclasses.replace(RefineConfig(), **{field: value}))


def test_flip_tta_over_two_ranks_predicts_each_image_as_one_process_does(images):
    from syntagen_st.scaleout.dist import Dist
    from syntagen_st.selftrain.heldout import predict_shard

    images = images + [im[::-1].copy() for im in images]
    groups = [list(range(4)), list(range(4, 6))]
    model = [Ramp(), Ramp()]
    single = dict(predict_shard(model, groups, 2, image=lambda i: images[i], flip=True))
    shards = [dict(predict_shard(model, groups, 2, Dist(rank, 2), lambda i: images[i], flip=True)) for rank in (0, 1)]
    assert not shards[0].keys() & shards[1].keys() and shards[0].keys() | shards[1].keys() == set(range(6))
    for shard in shards:
        for i, p in shard.items():
            assert np.array_equal(p, single[i])
    plain = dict(predict_shard(model, groups, 2, image=lambda i: images[i]))
    assert not np.allclose(plain[0], single[0])  # the flip reached the shards


def test_the_relabel_filter_has_its_own_window_and_is_on_whatever_the_import_does():
    from syntagen_st.core.config import RefineConfig
    from syntagen_st.selftrain.combine import relabel_filter

    cfg = relabel_filter(RefineConfig(relabel_kernel=0.3, relabel_eps=0.02), LabelConfig(refine_image=False, refine_work_side=64))
    assert (cfg.refine_image, cfg.refine_kernel, cfg.refine_eps, cfg.refine_work_side) == (True, 0.3, 0.02, 64)
    assert cfg.prior_method == "crf"
    label = LabelConfig(prior_method="guided", crf_spatial=0.4)
    cfg = relabel_filter(RefineConfig(relabel_method="crf"), label)
    assert (cfg.prior_method, cfg.crf_spatial) == ("crf", 0.4)  # its own method, the label section's kernels
    assert relabel_filter(RefineConfig(relabel_method="guided"), LabelConfig()).prior_method == "guided"
