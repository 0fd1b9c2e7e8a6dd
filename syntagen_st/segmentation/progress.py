"""What training shows on the terminal: one step-based progress bar, and none of Lightning's
banners.

Our trainings are step-based (max_steps over many short epochs), so Lightning's epoch bar reads
"Epoch 4/-2" and its version number "v_num: 0.000": this bar counts optimizer steps instead.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from tqdm.auto import tqdm


@functools.cache  # a new warnings filter resets the once-per-location registry: add them once
def quiet_lightning() -> None:
    """Silence Lightning's informational chatter through its own loggers; keep its warnings.

    ``rank_zero_info`` prints the accelerator banner, a cloud-logging tip and "`Trainer.fit`
    stopped" for every Trainer, and the loop builds one per fold and round.
    """
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric.utilities.rank_zero").setLevel(logging.WARNING)
    # Lightning 2.6 builds torch's deprecated LeafSpec itself: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # Logging counts global steps, so an epoch shorter than log_every_n_steps loses no logs.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval",
                            category=PossibleUserWarning)


class StepProgressBar(ProgressBar):
    """A tqdm bar over optimizer steps (global_step / max_steps) with the training loss."""

    def __init__(self, desc: str = "train") -> None:
        super().__init__()
        self.desc = desc
        self._enabled = True
        self._bar: tqdm | None = None

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc=self.desc, unit="step",
                         disable=not (self._enabled and trainer.is_global_zero), dynamic_ncols=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        loss = trainer.progress_bar_metrics.get("train/loss")
        if loss is not None:
            self._bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str("validating")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
