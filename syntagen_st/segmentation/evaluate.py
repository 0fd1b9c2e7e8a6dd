"""Evaluating a trained segmenter: per-class IoU and mIoU at full resolution, and finding the
weights a target names (a weights file, a training output folder, or a run folder)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..core.layout import RunLayout, TrainOutput
from .data import Sample, eval_loader, raise_if_error
from .metrics import confusion_metric, summarize


def resolve_weights(target: str | os.PathLike) -> Path:
    """The weights file a TARGET names: itself, DIR/model.safetensors, DIR/final/..., or the last checkpoint."""
    path = Path(target).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        trained, final = TrainOutput(path), RunLayout(path).final
        for candidate in (trained.weights, final.weights, trained.last_checkpoint):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path}: holds no model.safetensors, final/model.safetensors or checkpoints/last.ckpt")
    raise UserError(f"{path}: no such file or folder")


@torch.no_grad()
def evaluate(model: nn.Module, samples: Sequence[Sample], device: str | torch.device = "cpu", num_workers: int = 0) -> dict:
    """Full-resolution, batch-1 evaluation; returns summarize()'s metrics. A broken sample is a UserError."""
    device = torch.device(device)
    model = model.to(device).eval()
    confusion = confusion_metric().to(device)
    for batch in eval_loader(samples, num_workers):
        raise_if_error(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch["image"].to(device))["out"]
        confusion.update(logits.argmax(1), batch["mask"].to(device).long())
    return summarize(confusion.compute().cpu()) | {"images": len(samples)}
