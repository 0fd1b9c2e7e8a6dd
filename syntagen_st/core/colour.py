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

_SMOOTH = torch.tensor([0.25, 0.5, 0.25])


def _bin_index(image: np.ndarray, bins: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H * W,) int64: each pixel's cell of a bins^3 RGB grid."""
    q = image.reshape(-1, 3).astype(np.int64) * bins // 256
    return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]


def image_array(image: np.ndarray | torch.Tensor, probs: torch.Tensor) -> np.ndarray:
    """The (H, W, 3) image as a numpy array on the CPU, checked against (C, H, W) ``probs``:
    another size is one clear error."""
    h, w = probs.shape[-2:]
    rgb = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if rgb.shape != (h, w, 3):
        raise ValueError(f"the image is {rgb.shape}, the probabilities {tuple(probs.shape)}: expected ({h}, {w}, 3)")
    return rgb


def colour_posterior(image: np.ndarray | torch.Tensor, probs: torch.Tensor, bins: int, class_power: float,
                     reach: float | None) -> torch.Tensor:
    """(C, H, W) probabilities and the (H, W, 3) uint8 image -> (C, H, W) p(class | colour).

    Each class's histogram counts the pixels whose top class it is above ``CONFIDENT``,
    over ``bins`` levels a channel, smoothed by one cell so that a colour next to the class's
    counts too. p(class | colour) is the class's share of that colour, its histogram normalised
    and weighted by (its pixel count) ** ``class_power``, and for a class other than background
    by exp(-distance to its nearest confident pixel / (``reach`` x the shorter side)) (None: 1).
    A class with no confident pixel has a flat histogram (any colour alike) and a weight of 1:
    it takes only colours the others hardly hold, wherever they are. One class: ones.
    """
    c, h, w = probs.shape
    rgb = image_array(image, probs)
    if c < 2:
        return torch.ones_like(probs, dtype=torch.float32)
    cell = _bin_index(rgb, bins)
    top, arg = probs.detach().float().cpu().reshape(c, -1).max(dim=0)
    owner = torch.where(top > CONFIDENT, arg, torch.full_like(arg, c)).numpy()
    # One bincount for all classes: class k's pixels land in k * bins^3 + their cell; row c is the unsure.
    counts = np.bincount(owner * bins**3 + cell, minlength=(c + 1) * bins**3).reshape(c + 1, bins, bins, bins)[:c]
    hist = torch.from_numpy(counts.astype(np.float32))[:, None]
    kernel = _SMOOTH[:, None, None] * _SMOOTH[None, :, None] * _SMOOTH[None, None, :]
    hist = F.conv3d(hist, kernel[None, None], padding=1)[:, 0].reshape(c, -1)
    floor = 1e-3  # keeps every share above 0; at a colour no class holds, the smallest class wins (a known flaw)
    likelihood = (hist + floor) / (hist.sum(1, keepdim=True) + floor * hist.shape[1])
    size = hist.sum(1).clamp_min(1.0)
    share = likelihood * size[:, None] ** class_power
    post = share[:, torch.from_numpy(cell)]
    if reach is not None:
        own = owner.reshape(h, w)
        for k in range(1, c):  # background is everywhere
            if (own == k).any():
                far = cv2.distanceTransform((own != k).astype(np.uint8), cv2.DIST_L2, 3)
                post[k] *= torch.from_numpy(np.exp(-far / (reach * min(h, w)))).reshape(-1)
    return (post / post.sum(0, keepdim=True)).reshape(c, h, w).to(probs.device)


def with_colour(image: np.ndarray | torch.Tensor, probs: torch.Tensor, weight: float, bins: int,
                class_power: float, reach: float | None) -> torch.Tensor:
    """``probs`` times ``colour_posterior`` ** ``weight``, renormalised; ``weight`` 0: a copy."""
    if weight == 0 or probs.shape[0] < 2:
        return probs.float().clone()
    out = probs.float() * colour_posterior(image, probs, bins, class_power, reach) ** weight
    return out / out.sum(0, keepdim=True).clamp_min(1e-12)
