"""Per-class IoU from a confusion matrix, the standard VOC way.

IoU_c = TP / (TP + FP + FN) over all evaluated pixels, pixels labelled 255 ignored. A class
absent from both prediction and truth has IoU NaN (not 0), and mIoU is the mean over the
classes that are not NaN: a 0 would drag the mean down for classes nobody could score.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from ..core.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES


def confusion_metric(num_classes: int = NUM_CLASSES) -> MulticlassConfusionMatrix:
    """Accumulates (truth, prediction) pixel counts; syncs across DDP ranks on compute()."""
    # validate_args=False: the check runs torch.unique over every full-resolution batch.
    return MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, validate_args=False)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (float64) from a confusion matrix with rows = truth, columns = prediction."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(iou: torch.Tensor) -> float:
    return float(torch.nanmean(iou)) if bool((~iou.isnan()).any()) else math.nan


def summarize(cm: torch.Tensor) -> dict:
    """JSON-ready metrics: mIoU, per-class IoU by name (None where NaN), pixel accuracy, the matrix."""
    iou = iou_from_confusion(cm)
    total = float(cm.sum())
    return {
        "mIoU": _json_float(mean_iou(iou)),
        "per_class_iou": {name: _json_float(float(v)) for name, v in zip(VOC_CLASSES, iou)},
        "pixel_accuracy": _json_float(float(cm.diag().sum()) / total if total else math.nan),
        "pixels": int(total),
        "confusion_matrix": cm.long().tolist(),
    }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def format_table(metrics: dict) -> str:
    """The 21 per-class IoUs and mIoU as a text table (percent)."""
    lines = [f"{'class':<14} {'IoU %':>7}"]
    for name, value in metrics["per_class_iou"].items():
        lines.append(f"{name:<14} {'n/a' if value is None else f'{100 * value:.2f}':>7}")
    miou = metrics["mIoU"]
    lines.append(f"{'mIoU':<14} {'n/a' if miou is None else f'{100 * miou:.2f}':>7}")
    return "\n".join(lines)
