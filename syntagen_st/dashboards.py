"""W&B dashboards: validation panels of a training, and the self-training loop's rounds
(stats.json holds the same numbers)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .classes import FOREGROUND_CLASSES, IGNORE_INDEX, VOC_CLASSES
from .config import Config

_MASK_LABELS = {i: name for i, name in enumerate(VOC_CLASSES)} | {IGNORE_INDEX: "ignore"}


def log_wandb_panels(logger: Any, iou: list[float], miou: float, panels: list, step: int) -> None:
    """Per-class IoU table + bar chart and image / label / prediction overlays, on W&B only."""
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import wandb

    rows = [[name, None if math.isnan(v) else v] for name, v in zip(VOC_CLASSES, iou)]
    table = wandb.Table(columns=["class", "iou"], data=rows)
    labels = {i: name for i, name in enumerate(VOC_CLASSES)} | {IGNORE_INDEX: "ignore"}
    images = [
        wandb.Image(
            image, caption=f"val {k}: label / prediction",
            masks={"label": {"mask_data": label, "class_labels": labels}, "prediction": {"mask_data": pred, "class_labels": labels}},
        )
        for k, (image, label, pred) in enumerate(panels)
    ]
    payload = {
        "val/iou_table": table,
        "val/iou_bar": wandb.plot.bar(table, "class", "iou", title="per-class IoU"),
        "trainer/global_step": step,
    }
    if images:
        payload["val/overlays"] = images
    logger.experiment.log(payload)


class RoundLogger:
    """Logs each round to one W&B run per run folder when the config's logger is wandb."""

    def __init__(self, cfg: Config, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self._logger = None

    def _experiment(self):
        if self.cfg.train.logger != "wandb":
            return None
        if self._logger is None:
            from .train import make_logger

            self._logger = make_logger("wandb", self.root / "rounds", self.cfg.train.wandb_project, f"{self.cfg.name}-rounds")
        return self._logger.experiment

    def log_round(self, r: int, stats: dict, examples: list[tuple[Path, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Per-class model-vs-label IoU, weakness and prompt weights; relabelled pixels, drops,
        and overlays of attention label / refined label / held-out prediction."""
        experiment = self._experiment()
        if experiment is None:
            return
        import wandb

        rows = [
            [name, stats["iou_model_vs_labels"][name], stats["weakness"][name], stats["weights"][name],
             name in stats["reliable"]]
            for name in FOREGROUND_CLASSES
        ]
        table = wandb.Table(columns=["class", "iou_model_vs_labels", "weakness", "weight", "reliable"], data=rows)
        ious = [v for v in stats["iou_model_vs_labels"].values() if v is not None]
        overlays = []
        for path, label, refined, pred in examples:
            with Image.open(path) as image:
                overlays.append(wandb.Image(
                    np.asarray(image.convert("RGB")), caption=f"{path.stem}: attention / refined / model",
                    masks={
                        "attention": {"mask_data": label, "class_labels": _MASK_LABELS},
                        "refined": {"mask_data": refined, "class_labels": _MASK_LABELS},
                        "model": {"mask_data": pred, "class_labels": _MASK_LABELS},
                    },
                ))
        experiment.log({
            "round": r,
            "round/samples": stats["samples"],
            "round/dropped": stats["dropped"],
            "round/pixels_relabelled": stats["pixels_relabelled"],
            "round/miou_model_vs_labels": float(np.mean(ious)) if ious else float("nan"),
            "round/classes": table,
            "round/weights": wandb.plot.bar(table, "class", "weight", title=f"prompt weights after round {r}"),
            "round/iou": wandb.plot.bar(table, "class", "iou_model_vs_labels", title=f"model vs labels, round {r}"),
            "round/overlays": overlays,
        })

    def finish(self) -> None:
        # Finish this logger's own run only: trainings open runs of their own beside it.
        if self._logger is not None:
            self._logger.experiment.finish()
            self._logger = None
