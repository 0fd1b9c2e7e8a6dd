"""Attention maps -> label maps: the Dataset Diffusion method as pure tensor math, with
multi-resolution fusion.

Shapes for one sample: cross-attention (Nc, T) over Nc = hc*wc query pixels and T tokens;
self-attention (Ns, Ns) over Ns = hs*ws pixels, rows summing to 1. Several grids of each:
the class maps of every cross grid are fused at the finest cross grid (``fuse_cross_maps``),
propagated by each self grid and averaged at the finest self grid (``fuse_self_scores``), then
normalised once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_MIN_CONTRAST = 1e-3


def class_cross_maps(cross: torch.Tensor, token_groups: list[list[int]], hw: tuple[int, int]) -> torch.Tensor:
    """(Nc, T) cross-attention -> (K, hc, wc): each class's map is the mean over its name's tokens."""
    if not token_groups:
        return cross.new_zeros((0, *hw))
    maps = torch.stack([cross[:, group].mean(dim=1) for group in token_groups])
    return maps.reshape(len(token_groups), *hw)


def propagate(self_attn: torch.Tensor, maps: torch.Tensor, tau: int) -> torch.Tensor:
    """Refine (K, hc, wc) maps with self-attention: scores = (self_attn ** tau) @ cross.

    Each pixel's score becomes the attention-weighted average of the cross-attention over the
    pixels it attends to, which snaps blobby 16x16 maps onto object boundaries at 32x32.
    """
    n = self_attn.shape[0]
    k = maps.shape[0]
    hs, ws = _square_factors(n, maps.shape[-2:])
    up = F.interpolate(maps[None].float(), size=(hs, ws), mode="bilinear", align_corners=False)[0]
    flat = up.reshape(k, n).T  # (Ns, K)
    attn = self_attn.float()
    # tau products with the thin (Ns, K) matrix instead of forming the (Ns, Ns) power: same
    # result, O(tau Ns^2 K) instead of O(log(tau) Ns^3).
    for _ in range(tau):
        flat = attn @ flat
    return flat.T.reshape(k, hs, ws)


def _square_factors(n: int, like: torch.Size) -> tuple[int, int]:
    # The self-attention grid keeps the aspect ratio of the cross-attention grid.
    hc, wc = int(like[0]), int(like[1])
    scale = round((n / (hc * wc)) ** 0.5)
    if scale * scale * hc * wc != n:
        raise ValueError(f"self-attention of {n} pixels does not fit a multiple of the {hc}x{wc} cross grid")
    return hc * scale, wc * scale


def normalize_scores(raw: torch.Tensor, presence_threshold: float) -> torch.Tensor:
    """Per-class min-max normalisation, with absent classes zeroed.

    Min-max alone stretches every class to reach 1 somewhere, forcing a class into the mask
    even where the image lacks it. A class whose raw peak is below ``presence_threshold`` of the
    strongest class's peak is treated as absent.
    """
    if raw.shape[0] == 0:
        return raw.clone()
    flat = raw.reshape(raw.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    norm = (flat - lo) / (hi - lo).clamp_min(1e-12)
    peaks = hi.squeeze(1)
    present = peaks >= presence_threshold * peaks.max()
    # A map without contrast locates nothing; stretching it would only amplify rounding noise.
    present &= (hi - lo).squeeze(1) > _MIN_CONTRAST * peaks
    norm = norm * present[:, None].to(norm.dtype)
    return norm.reshape(raw.shape)


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) -> (K, H, W), bilinear."""
    if scores.shape[0] == 0:
        return scores.new_zeros((0, *size))
    return F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def _finest(sizes: Sequence[Sequence[int]]) -> tuple[int, int]:
    h, w = max(sizes, key=lambda hw: hw[0] * hw[1])
    return int(h), int(w)


def _at(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return scores if tuple(scores.shape[-2:]) == size else upsample_scores(scores, size)


def fuse_cross_maps(maps: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Class maps from several cross grids, (K, h_i, w_i) each -> (K, h, w) at the finest grid:
    sum_i (w_i / sum w) * bilinear(maps_i). Each grid's cross-attention rows sum to 1 over the
    tokens, so the maps share one scale; one grid of any weight comes back unchanged."""
    size = _finest([m.shape[-2:] for m in maps])
    total = sum(weights)
    terms = ((weight / total) * _at(m, size) for m, weight in zip(maps, weights, strict=True))
    fused = next(terms)
    for term in terms:
        fused = fused + term
    return fused


def fuse_self_scores(self_attns: Sequence[torch.Tensor], maps: torch.Tensor, tau: int) -> torch.Tensor:
    """(K, hc, wc) maps propagated by each self-attention grid (``propagate``), each result
    upsampled to the finest self grid and averaged there: raw scores, before normalisation (the
    propagation is row-stochastic, so every grid keeps the maps' scale). One grid: its scores."""
    scores = [propagate(attn, maps, tau) for attn in self_attns]
    size = _finest([s.shape[-2:] for s in scores])
    fused = _at(scores[0], size)
    for s in scores[1:]:
        fused = fused + _at(s, size)
    return fused / len(scores)


def attention_to_scores(
    cross: Sequence[torch.Tensor],
    self_attn: Sequence[torch.Tensor],
    token_groups: list[list[int]],
    cross_grids: Sequence[tuple[int, int]],
    cross_weights: Sequence[float],
    tau: int,
    presence_threshold: float,
) -> torch.Tensor:
    """Captured attention of one sample -> (K, hs, ws) normalised class scores at the finest self grid.

    ``cross`` holds one (Nc, T) map per grid of ``cross_grids`` (weighted by ``cross_weights``),
    ``self_attn`` one (Ns, Ns) map per self grid.
    """
    maps = fuse_cross_maps(
        [class_cross_maps(c.float(), token_groups, hw) for c, hw in zip(cross, cross_grids, strict=True)], cross_weights
    )
    if maps.shape[0] == 0:
        hs, ws = _finest([_square_factors(a.shape[0], maps.shape[-2:]) for a in self_attn])
        return maps.new_zeros((0, hs, ws))
    return normalize_scores(fuse_self_scores(self_attn, maps, tau), presence_threshold)
