"""Evaluate a trained segmenter: per-class IoU and mIoU at full resolution.

    python -m syntagen_st.evaluate TARGET (--voc-root PATH | --data PATH) [--out metrics.json]

TARGET is a weights file (.safetensors or a Lightning .ckpt), a training output folder
(model.safetensors), or a run folder (final/model.safetensors). --voc-root reads the
``val`` split of a VOC tree; --data any dataset folder (a VOC tree's val split, a pool,
images/ + masks/). Prints the 21-class table and writes metrics.json beside the weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .cli import config_from, config_parser, run_main
from .data import Sample, eval_loader, find_samples, find_voc_samples, raise_if_error
from .device import resolve_device
from .errors import UserError
from .metrics import confusion_metric, format_table, summarize
from .store import atomic_write_json, sha256_file


def resolve_weights(target: str | os.PathLike) -> Path:
    """The weights file a TARGET names: itself, DIR/model.safetensors, DIR/final/..., or the last checkpoint."""
    path = Path(target).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "model.safetensors", path / "final" / "model.safetensors", path / "checkpoints" / "last.ckpt"):
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


def main(argv: Sequence[str] | None = None) -> int:
    from .network import load_model

    parser = config_parser("syntagen_st.evaluate", "Per-class IoU and mIoU of a trained segmenter.", sections=("train",))
    parser.add_argument("target", help="weights (.safetensors / .ckpt), a training output folder, or a run folder")
    parser.add_argument("--voc-root", default=None, help="VOC tree (VOCdevkit's parent, VOCdevkit, or VOC2012): its val split")
    parser.add_argument("--data", default=None, help="any dataset folder (a VOC tree's val split, a pool, images/ + masks/)")
    parser.add_argument("--out", default=None, help="metrics file (default: metrics.json beside the weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ns = parser.parse_args(argv)
    cfg = config_from(parser, ns)
    if (ns.voc_root is None) == (ns.data is None):
        raise UserError("give exactly one of --voc-root PATH or --data PATH")
    samples = find_voc_samples(ns.voc_root, "val") if ns.voc_root is not None else find_samples(ns.data, "val")
    weights = resolve_weights(ns.target)
    model = load_model(weights)
    metrics = evaluate(model, samples, resolve_device(ns.device, "--device"), cfg.train.num_workers)
    metrics |= {"weights": str(weights), "weights_sha256": sha256_file(weights), "data": str(ns.voc_root or ns.data)}
    out = Path(ns.out) if ns.out else weights.parent / "metrics.json"
    atomic_write_json(out, metrics)
    print(format_table(metrics))
    print(f"images: {metrics['images']}  metrics: {out}")
    return 0


if __name__ == "__main__":
    run_main(main, "syntagen_st.evaluate")
