"""A per-image colour model of each class, as a factor on a prior before it is refined.

A label made at a coarse resolution calls most of a thin object, or a missed one, background,
and a CRF then votes it away: within an appearance kernel the label's background outnumbers
its class. The colours the label did give the class elsewhere in the same image say otherwise.
``colour_posterior`` fits one RGB histogram per class on the prior's confident pixels and
gives every pixel p(class | its colour), with each class's size counted only to the power
``class_power``: at 1 the large background wins every shared colour (the CRF's vote again), at
0 a class the label gives a few pixels can claim any colour it holds. And a class claims only
pixels near its own, within about ``reach`` of the side: a stretch of background that happens to
have the class's colour far from it stays background (clean shapes whose car is a background
tint: car lost 4.4 points without the reach, docs/masks.md), at the price of a missed object far
from every labelled one of its class.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

CONFIDENT = 0.5
"""A pixel whose top probability exceeds this fits its class's histogram; a 255 pixel's
uniform prior, or a model's unsure one, fits none."""

EVIDENCE = 1.0
"""Pixels behind a colour (within the classes' reach) at which its posterior is half the
histograms' say and half even shares: a colour no class holds says nothing, rather than going
to the smallest class."""

_SMOOTH = torch.tensor([0.25, 0.5, 0.25])


def _bin_index(image: np.ndarray, bins: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H * W,) int64: each pixel's cell of a bins^3 RGB grid."""
    q = image.reshape(-1, 3).astype(np.int64) * bins // 256
    return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]


def _smooth(hist: torch.Tensor) -> torch.Tensor:
    """(C, B, B, B) counts -> the same blurred by one cell a channel (zero beyond the cube)."""
    kernel = _SMOOTH[:, None, None] * _SMOOTH[None, :, None] * _SMOOTH[None, None, :]
    return F.conv3d(hist[:, None], kernel[None, None], padding=1)[:, 0]


def image_array(image: np.ndarray | torch.Tensor, probs: torch.Tensor) -> np.ndarray:
    """The (H, W, 3) uint8 image as a numpy array on the CPU, checked against (C, H, W) ``probs``:
    another size or type is one clear error."""
    h, w = probs.shape[-2:]
    rgb = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if rgb.shape != (h, w, 3):
        raise ValueError(f"the image is {rgb.shape}, the probabilities {tuple(probs.shape)}: expected ({h}, {w}, 3)")
    if rgb.dtype != np.uint8:
        raise ValueError(f"the image is {rgb.dtype}: expected uint8 RGB in 0-255")
    return rgb


def _shares(evidence: torch.Tensor, claims: torch.Tensor) -> torch.Tensor:
    """(K, N) pixels behind each class's colour and its weighted claims -> (K, N) shares of the
    claims, blended toward 1 / K by how little evidence there is."""
    total = evidence.sum(0, keepdim=True)
    trust = total / (total + EVIDENCE)
    share = claims / claims.sum(0, keepdim=True).clamp_min(1e-30)
    return trust * share + (1 - trust) / claims.shape[0]


def colour_posterior(image: np.ndarray | torch.Tensor, probs: torch.Tensor, bins: int, class_power: float,
                     reach: float | None) -> torch.Tensor:
    """(C, H, W) probabilities and the (H, W, 3) uint8 image -> (C, H, W) p(class | colour), a
    factor for the prior (``with_colour`` renormalises).

    Each class's histogram counts the pixels whose top class it is above ``CONFIDENT``,
    over ``bins`` levels a channel, smoothed by one cell so that a colour next to the class's
    counts too. A class's claim on a pixel is its histogram at the pixel's colour, normalised and
    weighted by (its pixel count) ** ``class_power``, and for a class other than background
    times exp(-distance to its nearest confident pixel / (``reach`` x the shorter side)) (None: 1).
    The colour says nothing where no evidence stands behind it: the claims' shares are blended
    toward even shares, half-way where the claims add up to ``EVIDENCE`` pixels, so a colour no
    class holds nearby is left to the prior. A class with no confident pixel gets the even share
    everywhere: its prior alone decides. Under two classes, or under two confident: ones.
    """
    c, h, w = probs.shape
    rgb = image_array(image, probs)
    if c < 2:
        return torch.ones_like(probs, dtype=torch.float32)
    cell = torch.from_numpy(_bin_index(rgb, bins))
    top, arg = probs.detach().float().cpu().reshape(c, -1).max(dim=0)
    owner = torch.where(top > CONFIDENT, arg, torch.full_like(arg, c)).numpy()
    # One bincount for all classes: class k's pixels land in k * bins^3 + their cell; row c is the unsure.
    counts = np.bincount(owner * bins**3 + cell.numpy(), minlength=(c + 1) * bins**3).reshape(c + 1, -1)[:c]
    held = np.flatnonzero(counts.sum(1))
    if len(held) < 2:
        return torch.ones_like(probs, dtype=torch.float32)
    hist = _smooth(torch.from_numpy(counts[held].astype(np.float32)).reshape(-1, bins, bins, bins))
    # In pixels: a neighbouring cell's count weighs as much as the kernel gives it against the cell's own.
    hist = hist.reshape(len(held), -1) / float(_SMOOTH.max()) ** 3
    # Normalised by the raw counts, not the blurred ones: at the cube's edge the blur spills out
    # of it, and a class holding an edge colour (black, a saturated hue) would claim it more firmly.
    weight = torch.from_numpy(counts[held].sum(1).astype(np.float32))[:, None] ** (class_power - 1.0)
    if reach is None:
        post = _shares(hist, hist * weight)[:, cell]  # per colour cell, then looked up
    else:
        near = hist[:, cell]
        own = owner.reshape(h, w)
        for row, k in enumerate(held.tolist()):
            if k != 0:  # background is everywhere
                far = cv2.distanceTransform((own != k).astype(np.uint8), cv2.DIST_L2, 3)
                near[row] *= torch.from_numpy(np.exp(-far / (reach * min(h, w)))).reshape(-1)
        post = _shares(near, near * weight)
    out = torch.full((c, h * w), 1.0 / len(held))
    out[torch.from_numpy(held)] = post
    return out.reshape(c, h, w).to(probs.device)


def with_colour(image: np.ndarray | torch.Tensor, probs: torch.Tensor, weight: float, bins: int,
                class_power: float, reach: float | None) -> torch.Tensor:
    """``probs`` times ``colour_posterior`` ** ``weight``, renormalised; ``weight`` 0 or under two
    classes: a copy."""
    if weight == 0 or probs.shape[0] < 2:
        return probs.float().clone()
    out = probs.float() * colour_posterior(image, probs, bins, class_power, reach) ** weight
    return out / out.sum(0, keepdim=True).clamp_min(1e-12)
