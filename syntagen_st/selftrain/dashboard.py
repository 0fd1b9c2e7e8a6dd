"""The self-training loop on W&B: one run per run folder, a panel per round (stats.json holds the
same numbers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..core.classes import FOREGROUND_CLASSES, IGNORE_INDEX, VOC_CLASSES
from ..core.config import Config
from ..core.gate import gate_verdict
from ..core.layout import RunLayout, round_title
from ..segmentation.loggers import make_logger

_MASK_LABELS = {i: name for i, name in enumerate(VOC_CLASSES)} | {IGNORE_INDEX: "ignore"}


class RoundLogger:
    """Logs each round to one W&B run per run folder when the config's logger is wandb."""

    def __init__(self, cfg: Config, run: RunLayout) -> None:
        self.cfg, self.run = cfg, run
        self._logger = None

    def _experiment(self):
        if self.cfg.train.logger != "wandb":
            return None
        if self._logger is None:
            self._logger = make_logger("wandb", self.run.rounds_dir, self.cfg.train.wandb_project, f"{self.cfg.name}-rounds")
        return self._logger.experiment

    def log_round(self, r: int, stats: dict, examples: list[tuple[Path, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Per-class held-out IoU with the labels on their cores (what the gate decides on) and over
        every pixel, the gate's verdict, weakness and prompt weights; relabelled pixels, drops, and
        overlays of attention label / refined label / held-out prediction."""
        experiment = self._experiment()
        if experiment is None:
            return
        import wandb

        core = stats.get("core_iou_model_vs_labels", {})
        rows = [
            [name, core.get(name), stats["iou_model_vs_labels"][name],
             gate_verdict(core.get(name), name in stats["reliable"], self.cfg.refine,
                          persistence=stats.get("core_persistence", {}).get(name)),
             stats["weakness"][name], stats["weights"][name], name in stats["reliable"]]
            for name in FOREGROUND_CLASSES
        ]
        table = wandb.Table(columns=["class", "core_iou_model_vs_labels", "iou_model_vs_labels", "gate", "weakness",
                                     "weight", "reliable"], data=rows)
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
            "round": r + 1,  # counted from 1, as every text a person reads
            "round/samples": stats["samples"],
            "round/dropped": stats["dropped"],
            "round/pixels_relabelled": stats["pixels_relabelled"],
            "round/miou_model_vs_labels": float(np.mean(ious)) if ious else float("nan"),
            "round/classes": table,
            "round/weights": wandb.plot.bar(table, "class", "weight", title=f"prompt weights after {round_title(r)}"),
            "round/iou": wandb.plot.bar(table, "class", "iou_model_vs_labels", title=f"model vs labels, {round_title(r)}"),
            "round/core_iou": wandb.plot.bar(table, "class", "core_iou_model_vs_labels",
                                             title=f"model vs label cores (the gate's evidence), {round_title(r)}"),
            "round/overlays": overlays,
        })

    def finish(self) -> None:
        # Finish this logger's own run only: trainings open runs of their own beside it.
        if self._logger is not None:
            self._logger.experiment.finish()
            self._logger = None
