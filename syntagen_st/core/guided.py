"""Image-guided label refinement: per-class maps snapped to the picture's edges.

One contract for every stage: an image (H, W, 3) uint8 and per-class maps (C, H, W) in [0, 1]
(attention scores, or the prior of a hard label from ``label_prior``) go in; the same maps,
edge-aligned, come out, and the label with its 255 band follows from ``scores_to_labels``.

The filter is kornia's guided filter (He et al.), computed at a working resolution of about
``refine_work_side`` pixels and applied at full resolution (the "fast" guided filter): on
512 px noisy shapes it matched a 10-iteration dense CRF's label gain at ~30 ms instead of
~600 ms per image on one CPU core, and it runs on the GPU as plain torch ops
(docs/masks.md has the table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import guided_blur

from .classes import BACKGROUND, IGNORE_INDEX
from .config import LabelConfig, recorded_section


def _as_image(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1] on ``device``."""
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        image = image.copy()  # a decoded PIL image is read-only; torch warns on wrapping one
    t = torch.as_tensor(image).to(device)
    return t.permute(2, 0, 1)[None].float() / 255.0


def refine_scores(image: np.ndarray | torch.Tensor, scores: torch.Tensor, cfg: LabelConfig) -> torch.Tensor:
    """(C, H, W) per-class maps in [0, 1] -> the same maps guided by the (H, W, 3) uint8 image.

    Each map becomes locally a linear function of the image's colour, so a blob that crosses
    an edge is cut along it; a map that is flat where the image is flat stays as it was. The
    kernel is ``refine_kernel`` of the image's shorter side, so the filter reaches as far as
    upsampled attention blurs, whatever the resolution.
    """
    c, h, w = scores.shape
    if c == 0 or not cfg.refine_image:
        return scores.clone()
    side = min(h, w)
    sub = max(1, side // cfg.refine_work_side)
    # An odd kernel that also stays odd on the subsampled grid and never exceeds the image.
    cells = max(1, round(cfg.refine_kernel * side / sub / 2))
    cells = min(cells, (side // sub - 1) // 2)
    if cells < 1:
        return scores.clone()
    kernel = 2 * cells * sub + 1
    guide = _as_image(image, scores.device)
    out = guided_blur(guide, scores[None].float(), kernel, cfg.refine_eps, subsample=sub, separable=True)[0]
    return out.clamp_(0.0, 1.0)


def label_prior(label: np.ndarray | torch.Tensor, class_ids: list[int], confidence: float) -> torch.Tensor:
    """(H, W) hard label (255 unsure) -> (1 + K, H, W) probabilities over background + ``class_ids``.

    A labelled pixel gets ``confidence`` on its class and the rest shared evenly; a 255 pixel,
    or one whose class is not among those allowed, is uniform: the image decides it.
    """
    lab = torch.as_tensor(label).long()
    allowed = [BACKGROUND] + [c for c in class_ids if c != BACKGROUND]
    n = len(allowed)
    if n == 1:
        return torch.ones((1, *lab.shape))
    ids = torch.tensor(allowed)
    onehot = (lab[None] == ids[:, None, None]).float()
    known = onehot.sum(0, keepdim=True) > 0
    other = (1.0 - confidence) / (n - 1)
    prior = onehot * (confidence - other) + other
    return torch.where(known, prior, torch.full_like(prior, 1.0 / n))


def scores_to_labels(
    scores: torch.Tensor, class_ids: list[int], fg_threshold: float, band_threshold: float
) -> torch.Tensor:
    """(K, H, W) scores in [0, 1] -> (H, W) uint8 labels.

    The top class where its score >= fg_threshold, IGNORE_INDEX where it lies in
    [band_threshold, fg_threshold), background below.
    """
    h, w = scores.shape[-2:]
    labels = torch.full((h, w), BACKGROUND, dtype=torch.uint8, device=scores.device)
    if scores.shape[0] == 0:
        return labels
    top, arg = scores.max(dim=0)
    ids = torch.tensor(class_ids, dtype=torch.uint8, device=scores.device)
    labels = torch.where(top >= fg_threshold, ids[arg], labels)
    band = (top >= band_threshold) & (top < fg_threshold)
    return torch.where(band, torch.full_like(labels, IGNORE_INDEX), labels)


def refine_label(
    image: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, class_ids: list[int], cfg: LabelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """A hard label (255 unsure) as a prior of ``cfg.prior_confidence`` -> (refined probabilities
    over background + ``class_ids``, the label they give).

    The window is ``prior_kernel`` (``refine_kernel`` when None), and the refinement runs
    ``prior_passes`` times, each pass taking the last one's label as its prior. Every pixel takes
    its most probable class, except that a 255 pixel stays 255 unless its top
    probability reaches ``fg_threshold``: the band can only shrink. (Turning every pixel below
    ``fg_threshold`` into 255 blurred clean labels' edges into a band: 3 points lost on clean
    shapes with 255 counted as a miss, docs/masks.md.)
    """
    allowed = torch.tensor([BACKGROUND] + [c for c in class_ids if c != BACKGROUND], dtype=torch.uint8)
    window = replace(cfg, refine_kernel=cfg.prior_kernel or cfg.refine_kernel)
    current = torch.as_tensor(label)
    for _ in range(cfg.prior_passes):
        probs = refine_scores(image, label_prior(current, class_ids, cfg.prior_confidence), window)
        probs = probs / probs.sum(0, keepdim=True).clamp_min(1e-6)
        top, arg = probs.max(dim=0)
        unsure = (current == IGNORE_INDEX) & (top < cfg.fg_threshold)
        current = torch.where(unsure, torch.full_like(arg, IGNORE_INDEX, dtype=torch.uint8), allowed[arg])
    return probs, current


def recorded_label_config(section: Mapping | None) -> LabelConfig:
    """The ``label`` section of a saved config (config.yaml, submission.json) as it was run:
    defaults for keys it lacks, except ``refine_image``: a config recorded before the refinement
    existed lacks it, and was made without it."""
    return recorded_section("label", section)  # type: ignore[return-value]


def attention_label(
    scores: np.ndarray | torch.Tensor, class_ids: list[int], size: tuple[int, int], cfg: LabelConfig
) -> torch.Tensor:
    """A sample's stored low-resolution class scores (K, h, w) -> (H, W) uint8: the label they
    give without the image, upsampled bilinearly and thresholded as ``label_sample`` does.

    With ``refine_image`` on, the pool keeps only the refined label; this is the label before
    the snap, which the report shows beside it. The pool stores the scores in float16, so a
    pixel within ~1e-3 of a threshold may come out otherwise than from the float32 scores.
    """
    t = torch.as_tensor(scores).float()
    full = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0] if t.shape[0] \
        else t.new_zeros((0, *size))
    return scores_to_labels(full, class_ids, cfg.fg_threshold, cfg.band_threshold)
