"""Training loggers: W&B (offline without a key), CSV or none, and the W&B validation panels."""

from __future__ import annotations

import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from ..core.classes import IGNORE_INDEX, VOC_CLASSES
from ..core.store import atomic_write_text

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


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_logger(kind: str, out: Path, project: str, name: str):  # -> Logger | bool
    """W&B (offline when WANDB_MODE is unset and no API key is known), CSV, or none (False).

    The W&B run is our own (reinit="create_new"): WandbLogger would otherwise adopt any run
    already open in the process (e.g. the loop's round log) and finishing it would end that one.
    One run per output folder: a resumed training continues the same run.
    """
    if kind == "none":
        return False
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(str(out), name="logs")
    import wandb
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP workers: a logger that never opens a run off rank 0
        return WandbLogger(project=project, name=name)
    id_file = out / "wandb_id.txt"
    if not id_file.is_file():
        atomic_write_text(id_file, uuid.uuid4().hex[:12] + "\n")
    offline = "WANDB_MODE" not in os.environ and not _has_wandb_key()
    run = wandb.init(
        project=project, name=name, id=id_file.read_text().strip(), resume="allow",
        dir=os.environ.get("WANDB_DIR") or str(out), mode="offline" if offline else None, reinit="create_new",
    )
    # WandbLogger's own x-axis setup, which it skips for a run it did not create.
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return WandbLogger(experiment=run)
