"""The report's pictures: matplotlib plots and mask overlays, as PNG / JPEG bytes to embed.

Masks are drawn with torchvision's ``draw_segmentation_masks`` in the VOC palette; plots are
matplotlib figures drawn by their own Agg canvas: no pyplot, no global backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision.utils import draw_segmentation_masks, make_grid

from ..core.classes import IGNORE_INDEX, NUM_CLASSES, PALETTE

THUMB = 160
"""Longest side of a thumbnail panel, in pixels: a 10,000-sample run's page stays small."""

_STYLE = {"font.size": 13, "axes.titlesize": 13, "axes.spines.top": False, "axes.spines.right": False}


def class_colour(index: int) -> tuple[int, int, int]:
    """The VOC palette colour of a label value (255: the cream of 'ignore')."""
    return tuple(PALETTE[3 * index: 3 * index + 3])


def _rgb(index: int) -> tuple[float, float, float]:
    return tuple(c / 255 for c in class_colour(index))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def iou_over_rounds(columns: Sequence[str], iou: dict[str, list[float | None]], weak: set[str]) -> bytes:
    """A class x round heatmap of held-out IoU % against the labels, each cell written out (20
    lines would overlap); weak classes marked ▲. A class neither labelled nor predicted: '—'."""
    names = list(iou)
    data = np.array([[math.nan if v is None else 100 * v for v in iou[n]] for n in names], dtype=float)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(1.3 * len(columns) + 3.2, 0.38 * len(names) + 1.4))
        ax = fig.subplots()
        image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (i, j), value in np.ndenumerate(data):
            if math.isnan(value):
                ax.text(j, i, "—", ha="center", va="center", fontsize=11, color="grey")
            else:  # dark text on viridis' light end
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=11, color="black" if value > 60 else "white")
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(names)), [n + ("  ▲" if n in weak else "") for n in names])
        for label, name in zip(ax.get_yticklabels(), names):
            if name in weak:
                label.set_fontweight("bold")
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        for side in ax.spines.values():
            side.set_visible(False)
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03).set_label("IoU % (held-out model vs labels)")
        return _png(fig)


def weights_heatmap(columns: Sequence[str], weights: dict[str, list[float]]) -> bytes:
    """Prompt weights, one row per class and one column per round (red: more prompts than uniform)."""
    names = list(weights)
    data = np.array([weights[n] for n in names], dtype=float)
    spread = max(float(np.nanmax(np.abs(np.log2(np.clip(data, 1e-3, None))))) if data.size else 0.0, 0.5)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(1.2 * len(columns) + 3, 0.38 * len(names) + 1.4))
        ax = fig.subplots()
        image = ax.imshow(np.log2(np.clip(data, 1e-3, None)), cmap="RdBu_r", vmin=-spread, vmax=spread, aspect="auto")
        for (i, j), value in np.ndenumerate(data):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=11,
                    color="white" if abs(math.log2(max(value, 1e-3))) > 0.6 * spread else "black")
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(names)), names)
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        for side in ax.spines.values():
            side.set_visible(False)
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
        ticks = [t for t in (-2, -1, 0, 1, 2) if abs(t) <= spread]
        bar.set_ticks(ticks, labels=[f"x{2.0 ** t:g}" for t in ticks])
        bar.set_label("weight (1 = uniform share)")
        return _png(fig)


def class_balance(names: Sequence[str], image_share: Sequence[float], pixel_share: Sequence[float], uniform: float) -> bytes:
    """Grouped horizontal bars: each class's share of images and of foreground pixels."""
    y = np.arange(len(names))
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(7, 0.4 * len(names) + 1.6))
        ax = fig.subplots()
        ax.barh(y - 0.2, 100 * np.asarray(image_share), 0.4, label="share of images", color="#4c72b0")
        ax.barh(y + 0.2, 100 * np.asarray(pixel_share), 0.4, label="share of foreground pixels", color="#dd8452")
        ax.axvline(100 * uniform, color="black", ls="--", lw=1.2, label=f"uniform share ({100 * uniform:.1f}%)")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("% of the export")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.5 / max(len(names), 1)), ncol=2, fontsize=11, frameon=False)
        return _png(fig)


# ---------------------------------------------------------------- masks


def thumbnail(image: np.ndarray, size: int = THUMB, nearest: bool = False) -> np.ndarray:
    """``image`` scaled, up or down, so its longest side is ``size`` (masks with nearest neighbours)."""
    pil = Image.fromarray(image)
    scale = size / max(pil.size)
    if scale != 1:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                         Image.NEAREST if nearest else Image.LANCZOS)
    return np.asarray(pil)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The mask over the image in the VOC palette; background left clear, 255 in the palette's cream."""
    values = [v for v in np.unique(mask) if 0 < v < NUM_CLASSES or v == IGNORE_INDEX]
    picture = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1)
    if not values:
        return image
    masks = torch.from_numpy(np.stack([mask == v for v in values]))
    drawn = draw_segmentation_masks(picture, masks, alpha=alpha, colors=[class_colour(int(v)) for v in values])
    return drawn.permute(1, 2, 0).numpy()


def placeholder(height: int, width: int) -> np.ndarray:
    """A plain grey panel where a picture is missing."""
    return np.full((height, width, 3), 200, np.uint8)


def panel_row(image: np.ndarray | None, masks: Sequence[np.ndarray | None], size: int = THUMB) -> bytes:
    """The image and each mask over it, side by side, as JPEG bytes (missing ones grey)."""
    base = thumbnail(image, size) if image is not None else None
    shape = base.shape[:2] if base is not None else next((thumbnail(m, size, True).shape for m in masks if m is not None), (size, size))
    panels = [base if base is not None else placeholder(*shape)]
    for mask in masks:
        if mask is None:
            panels.append(placeholder(*shape))
            continue
        small = thumbnail(mask, size, nearest=True)
        if small.shape != tuple(shape):
            small = np.asarray(Image.fromarray(small).resize(shape[::-1], Image.NEAREST))
        backdrop = base if base is not None else np.full((*shape, 3), 255, np.uint8)
        panels.append(overlay(backdrop, small))
    grid = make_grid([torch.from_numpy(np.array(p, np.uint8)).permute(2, 0, 1) for p in panels],
                     nrow=len(panels), padding=3, pad_value=255)
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=85)
    return buf.getvalue()
