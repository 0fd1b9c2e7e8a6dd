"""The relabel step's view of a sample: the held-out model's restricted softmax times the label
prior, refined by the image as every prior is (``core/guided.refine_probs``).

Pure array math, no I/O. The result is a ``Restricted`` like the model's own, so ``relabel``'s
gate and confidence rules apply to it unchanged: a class that fails the gate is never written,
and the model replaces a label only where the combination reaches ``relabel_confidence``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..core.config import LabelConfig, RefineConfig
from ..core.guided import label_prior, refine_probs
from .refine import Restricted, predict


def combine(model: Restricted, label: np.ndarray, prior_confidence: float) -> np.ndarray:
    """(21, H, W) float32: the model's restricted probabilities times the prior of ``label`` (its
    class at ``prior_confidence``, the rest shared evenly; 255 and unnamed pixels uniform),
    renormalised over the named classes. ``prior_confidence`` 0 leaves the model as it is."""
    if prior_confidence == 0:
        return model.probs.copy()
    named = np.flatnonzero(model.named)  # background first: label_prior's order
    prior = label_prior(label, [int(c) for c in named[1:]], prior_confidence).numpy()
    out = np.zeros_like(model.probs, dtype=np.float32)
    out[named] = model.probs[named] * prior
    total = out.sum(axis=0, keepdims=True)
    # Where model and prior leave nothing (the model at 0 on every named class), the prior decides.
    out[named] = np.where(total[0] > 1e-12, out[named] / np.maximum(total[0], 1e-12), prior)
    return out


def relabel_filter(refine: RefineConfig, label: LabelConfig) -> LabelConfig:
    """The settings of the relabel's refinement: its own method (``refine.relabel_method``), and
    for the guided filter its own window and regularisation (a held-out model's softmax is
    blurred at another scale than attention); the label section's CRF kernels and working
    resolution; and on: ``refine.relabel_image`` chose to refine."""
    return replace(label, refine_image=True, prior_method=refine.relabel_method, refine_kernel=refine.relabel_kernel,
                   refine_eps=refine.relabel_eps)


def guided_view(model: Restricted, label: np.ndarray, image: np.ndarray, prior_confidence: float,
                cfg: LabelConfig) -> Restricted:
    """``combine``'s probabilities refined by the (H, W, 3) uint8 image over the named classes
    with ``cfg``'s method (``relabel_filter``), with their argmax and top probability (what
    ``relabel`` reads)."""
    named = np.flatnonzero(model.named)
    probs = combine(model, label, prior_confidence)
    out = np.zeros_like(probs)
    out[named] = refine_probs(image, torch.from_numpy(probs[named]), cfg).numpy()
    return Restricted(model.named, out, *predict(out))
