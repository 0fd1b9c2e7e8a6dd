"""Image-guided label refinement: per-class maps snapped to the picture's edges.

One contract for every stage: an image (H, W, 3) uint8 and per-class maps (C, H, W) go in; the
same maps, edge-aligned, come out, and the label with its 255 band follows from them.

- Soft attention scores in [0, 1] (generation) go through kornia's guided filter
  (``refine_scores``, He et al.), computed at about ``refine_work_side`` pixels and applied at
  full resolution: plain torch ops on the scores' device, the GPU in a GPU run.
- A prior, that is probabilities over background + the named classes (an imported hard label
  from ``label_prior``; in the relabel, a model's softmax times it), goes through
  ``refine_probs``: weighed by the image's colour model of each class (``core/colour.py``), then
  by default a fully connected CRF (``dense_crf``, pydensecrf), whose appearance kernel reaches a
  quarter of the side and so cuts back a label that bleeds a whole cell past an edge, which a
  windowed filter only moves part of the way (rich noisy shapes, harsh: 0.397 -> 0.515 label
  mIoU with the CRF alone, 0.588 with the colour model; docs/masks.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import cv2
import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from kornia.filters import guided_blur

from .classes import BACKGROUND, IGNORE_INDEX
from .colour import image_array, with_colour
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


def dense_crf(image: np.ndarray | torch.Tensor, probs: torch.Tensor, cfg: LabelConfig) -> torch.Tensor:
    """(C, H, W) probabilities -> the same after ``crf_iterations`` of mean-field inference in a
    fully connected CRF (Krähenbühl and Koltun, pydensecrf) on the (H, W, 3) uint8 image.

    The probabilities are the unary term; the appearance kernel pulls pixels of alike colour
    within ``crf_spatial`` of the side toward one label, the smoothness kernel cleans pixel
    noise. Unlike a windowed filter, it cuts a blob's interior along the colours it holds, so
    a label bleeding a whole cell past an edge, or over a hole, comes back in one pass.
    Runs on the CPU (about 8 ms for a 64 px image, docs/masks.md); an image whose shorter side
    exceeds ``crf_work_side`` is solved at about that side and its probabilities upsampled
    bilinearly. The result is on ``probs``'s device.
    """
    c, h, w = probs.shape
    rgb = image_array(image, probs)
    if c < 2:
        return probs.float().clone()
    p = probs.detach().float().cpu()
    scale = min(1.0, cfg.crf_work_side / min(h, w)) if cfg.crf_work_side else 1.0
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    if (sh, sw) != (h, w):
        rgb = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
        p = F.interpolate(p[None], size=(sh, sw), mode="area")[0]
    unary = -np.log(np.clip(p.numpy().reshape(c, -1), 1e-6, None))
    crf = dcrf.DenseCRF2D(sw, sh, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=cfg.crf_smooth, compat=cfg.crf_smooth_weight)
    # pydensecrf takes a writeable C-ordered buffer; a decoded PIL image is read-only.
    crf.addPairwiseBilateral(sxy=cfg.crf_spatial * min(sh, sw), srgb=cfg.crf_colour,
                             rgbim=np.require(rgb, np.uint8, ["C", "W"]), compat=cfg.crf_weight)
    out = torch.from_numpy(np.asarray(crf.inference(cfg.crf_iterations), dtype=np.float32).reshape(c, sh, sw))
    if (sh, sw) != (h, w):
        out = F.interpolate(out[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return out.to(probs.device)


def refine_probs(image: np.ndarray | torch.Tensor, probs: torch.Tensor, cfg: LabelConfig) -> torch.Tensor:
    """(C, H, W) probabilities over background + named classes -> the same refined by the image
    with ``cfg.prior_method``: the dense CRF, or the guided filter of ``cfg.refine_kernel``
    renormalised. The one refinement of a prior: an imported label's, or in the relabel a
    model's softmax times the label's. First the prior is weighed by the image's per-class
    colour model (``core/colour.py``, ``colour_weight``), which brings back the parts of an object
    its label mostly calls background: thin ones, or the rest of a half-labelled one."""
    if cfg.prior_method not in ("crf", "guided"):
        raise ValueError(f"unknown refinement method {cfg.prior_method!r}: crf or guided")
    probs = with_colour(image, probs, cfg.colour_weight, cfg.colour_bins, cfg.colour_class_power, cfg.colour_reach)
    if cfg.prior_method == "crf":
        return dense_crf(image, probs, cfg)
    out = refine_scores(image, probs, cfg)
    return out / out.sum(0, keepdim=True).clamp_min(1e-6)


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

    With ``prior_method`` "crf", one pass of the dense CRF (its iterations do what passes would).
    With "guided", the window is ``prior_kernel`` (``refine_kernel`` when None), and the filter
    runs ``prior_passes`` times, each pass taking the last one's label as its prior (the colour
    model on the first pass only). Every pixel
    takes its most probable class, except that a 255 pixel stays 255 unless its top
    probability reaches ``fg_threshold``: the band can only shrink. (Turning every pixel below
    ``fg_threshold`` into 255 blurred clean labels' edges into a band: 3 points lost on clean
    shapes with 255 counted as a miss, docs/masks.md.) With ``prior_doubt``, a pixel the label
    gave a class or 255 that comes out background becomes 255: background stays only where the
    label and the image agree on it. With ``absent_doubt``, a label that holds no pixel of a class
    in ``class_ids`` keeps no background at all: it names the class without placing it, so any
    background pixel may be it (a model trained on such labels learns the class as background:
    harsh shapes, docs/masks.md). A class it places is guarded by ``prior_doubt`` instead.
    """
    allowed = torch.tensor([BACKGROUND] + [c for c in class_ids if c != BACKGROUND], dtype=torch.uint8)
    window = replace(cfg, refine_kernel=cfg.prior_kernel or cfg.refine_kernel)
    current = given = torch.as_tensor(np.array(label, dtype=np.uint8))
    # Doubt reads the label as given, not an earlier pass's; with no class named, background is all there is.
    doubted = (current != BACKGROUND) & (cfg.prior_doubt and len(allowed) > 1)
    for step in range(1 if cfg.prior_method == "crf" else cfg.prior_passes):
        # The colour model weighs the label as given once; on every pass its weight would compound.
        settings = window if step == 0 else replace(window, colour_weight=0.0)
        probs = refine_probs(image, label_prior(current, class_ids, cfg.prior_confidence), settings)
        top, arg = probs.max(dim=0)
        unsure = ((current == IGNORE_INDEX) & (top < cfg.fg_threshold)) | (doubted & (arg == 0))
        current = torch.where(unsure, torch.full_like(arg, IGNORE_INDEX, dtype=torch.uint8), allowed[arg])
    if cfg.absent_doubt and not all((given == c).any() for c in allowed[1:]):
        current = torch.where(current == BACKGROUND, torch.full_like(current, IGNORE_INDEX), current)
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
