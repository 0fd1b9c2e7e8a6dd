"""The attention -> mask math on hand-made tensors with known answers."""

import torch

from syntagen_st.core.classes import IGNORE_INDEX
from syntagen_st.core.guided import scores_to_labels
from syntagen_st.generation.labels import (
    attention_to_scores,
    class_cross_maps,
    fuse_cross_maps,
    fuse_self_scores,
    normalize_scores,
    propagate,
    upsample_scores,
)


def _block_cross(hw, blocks, tokens=5):
    """Cross-attention (N, T): token t attends to its block with weight 1, elsewhere 0.05."""
    h, w = hw
    cross = torch.full((h * w, tokens), 0.05)
    for token, (r0, r1, c0, c1) in blocks.items():
        grid = torch.full((h, w), 0.05)
        grid[r0:r1, c0:c1] = 1.0
        cross[:, token] = grid.flatten()
    return cross


def test_block_with_identity_self_attention_gives_that_block():
    cross = _block_cross((4, 4), {1: (0, 2, 0, 2)})
    scores = attention_to_scores([cross], [torch.eye(16)], [[1]], [(4, 4)], [1.0], tau=4, presence_threshold=0.2)
    labels = scores_to_labels(scores, [13], fg_threshold=0.6, band_threshold=0.5)
    expected = torch.zeros(4, 4, dtype=torch.uint8)
    expected[:2, :2] = 13
    assert torch.equal(labels, expected)


def test_uncertainty_band_gives_ignore_and_low_gives_background():
    scores = torch.tensor([[[0.9, 0.55, 0.2]]])  # (K=1, 1, 3)
    labels = scores_to_labels(scores, [8], fg_threshold=0.6, band_threshold=0.5)
    assert labels.tolist() == [[8, IGNORE_INDEX, 0]]


def test_argmax_between_two_classes():
    cross = _block_cross((4, 4), {1: (0, 4, 0, 2), 3: (0, 4, 2, 4)})
    scores = attention_to_scores([cross], [torch.eye(16)], [[1], [3]], [(4, 4)], [1.0], tau=1, presence_threshold=0.2)
    labels = scores_to_labels(scores, [15, 13], 0.6, 0.5)
    assert (labels[:, :2] == 15).all() and (labels[:, 2:] == 13).all()


def test_weak_class_stays_out_but_min_max_alone_forces_it_in():
    cross = _block_cross((4, 4), {1: (0, 2, 0, 2)})
    cross[:, 2] = 0.01  # the second class's tokens attend almost nowhere ...
    cross[15, 2] = 0.05  # ... with a faint peak in one corner
    raw_groups = [[1], [2]]
    gated = attention_to_scores([cross], [torch.eye(16)], raw_groups, [(4, 4)], [1.0], tau=4, presence_threshold=0.2)
    labels = scores_to_labels(gated, [13, 15], 0.6, 0.5)
    assert 15 not in labels.unique().tolist()
    assert (labels[:2, :2] == 13).all()
    forced = attention_to_scores([cross], [torch.eye(16)], raw_groups, [(4, 4)], [1.0], tau=4, presence_threshold=0.0)
    assert 15 in scores_to_labels(forced, [13, 15], 0.6, 0.5).unique().tolist()


def test_multi_token_class_uses_the_mean_of_its_tokens():
    cross = torch.zeros(4, 4)
    cross[:, 1] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    cross[:, 2] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    maps = class_cross_maps(cross, [[1, 2]], (2, 2))
    assert torch.allclose(maps.flatten(), torch.tensor([0.5, 0.0, 1.0, 0.5]))


def test_self_attention_spreads_cross_attention_within_an_object():
    # Pixels 0 and 1 form one object and attend to each other; cross-attention saw only pixel 0.
    self_attn = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    out = propagate(self_attn, maps, tau=4)
    assert torch.allclose(out.flatten(), torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_propagate_upsamples_cross_to_the_self_attention_grid():
    maps = torch.ones(2, 2, 2)
    out = propagate(torch.eye(16), maps, tau=4)
    assert out.shape == (2, 4, 4)


def test_normalize_empty_and_upsample():
    assert normalize_scores(torch.zeros(0, 2, 2), 0.2).shape == (0, 2, 2)
    up = upsample_scores(torch.rand(2, 4, 4), (16, 16))
    assert up.shape == (2, 16, 16)
    labels = scores_to_labels(torch.zeros(0, 8, 8), [], 0.6, 0.5)
    assert (labels == 0).all()


def test_flat_map_locates_nothing():
    raw = torch.full((1, 4, 4), 0.2)
    raw[0, 0, 0] += 1e-7  # rounding noise must not become a full-strength object
    assert (normalize_scores(raw, 0.0) == 0).all()


def test_fused_cross_maps_are_the_weighted_mean_at_the_finest_grid():
    coarse = torch.tensor([[[1.0]]])  # (K=1, 1, 1): the whole image
    fine = torch.zeros(1, 2, 2)
    fine[0, 0, 0] = 1.0
    fused = fuse_cross_maps([coarse, fine], [0.2, 0.6])  # normalised: 0.25 and 0.75
    assert torch.allclose(fused, torch.tensor([[[1.0, 0.25], [0.25, 0.25]]]))
    # The published weights: the middle grid's 0.7 dominates, the others add 0.15 each.
    grids = [torch.full((1, 1, 1), 1.0), torch.full((1, 2, 2), 2.0), torch.full((1, 4, 4), 4.0)]
    assert torch.allclose(fuse_cross_maps(grids, [0.15, 0.7, 0.15]), torch.full((1, 4, 4), 0.15 + 1.4 + 0.6))


def test_one_grid_comes_back_bit_for_bit():
    """The default (one cross grid, one self grid) must equal the single-grid method exactly:
    entries recorded before multi-resolution fusion reproduce."""
    torch.manual_seed(0)
    cross = torch.rand(16, 5).softmax(-1)
    self_attn = torch.rand(64, 64).softmax(-1)
    old = normalize_scores(propagate(self_attn, class_cross_maps(cross, [[1], [2, 3]], (4, 4)), 4), 0.2)
    new = attention_to_scores([cross], [self_attn], [[1], [2, 3]], [(4, 4)], [2.5], tau=4, presence_threshold=0.2)
    assert torch.equal(old, new)
    maps = torch.rand(2, 4, 4)
    assert torch.equal(fuse_cross_maps([maps], [0.3]), maps)


def test_two_self_grids_are_averaged_at_the_finer_one():
    maps = torch.zeros(1, 2, 2)
    maps[0, 0, 0] = 1.0
    # The coarse grid (2x2) spreads the object over the top row; the fine grid (4x4) keeps it.
    coarse = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    fine = torch.eye(16)
    fused = fuse_self_scores([coarse, fine], maps, tau=1)
    expected = (upsample_scores(propagate(coarse, maps, 1), (4, 4)) + propagate(fine, maps, 1)) / 2
    assert fused.shape == (1, 4, 4) and torch.allclose(fused, expected)
    assert fused[0, 0, 3] > 0.2  # the coarse grid's spread reaches the top right ...
    assert fused[0, 0, 0] > fused[0, 0, 3]  # ... but the fine grid keeps the object's corner strongest


def test_multires_scores_end_to_end_on_hand_made_grids():
    """Two cross grids see the object in the left half; the scores come out at the finest self grid."""
    coarse = _block_cross((2, 2), {1: (0, 2, 0, 1)})
    fine = _block_cross((4, 4), {1: (0, 4, 0, 2)})
    scores = attention_to_scores([coarse, fine], [torch.eye(16), torch.eye(64)], [[1]], [(2, 2), (4, 4)],
                                 [0.15, 0.85], tau=4, presence_threshold=0.2)
    assert scores.shape == (1, 8, 8)
    labels = scores_to_labels(scores, [13], 0.6, 0.5)
    assert (labels[:, :3] == 13).all() and (labels[:, 5:] == 0).all()
    empty = attention_to_scores([coarse, fine], [torch.eye(16), torch.eye(64)], [], [(2, 2), (4, 4)], [1, 1], 4, 0.2)
    assert empty.shape == (0, 8, 8)
