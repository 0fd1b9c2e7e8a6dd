"""Training the segmenter: its loss, the poly schedule, and the LightningModule around it.

The network itself (building, loading, saving, predicting) lives in ``network``, which needs
no Lightning; W&B panels live in ``dashboards``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..core.classes import IGNORE_INDEX, VOC_CLASSES
from ..core.config import TrainConfig
from ..core.device import usable_cpus
from .data import Sample, SegDataset, collate, denormalize, eval_transform, raise_if_error, train_transform
from .loggers import log_wandb_panels
from .metrics import confusion_metric, iou_from_confusion, mean_iou
from .network import build_segmenter

NO_BACKBONE_WARNING = (
    "train.backbone_weights is 'none': the backbone starts from random weights. Expect far lower "
    "mIoU than the fixed protocol's ImageNet-pretrained backbone (on VOC, tens of points) and slower "
    "convergence; give a local state-dict file or 'imagenet' for real runs."
)


# ---------------------------------------------------------------- loss and module


def seg_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor, aux_weight: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE(out) + aux_weight * CE(aux), label 255 ignored, optionally weighted per pixel."""
    loss = _cross_entropy(outputs["out"], target, weight)
    if "aux" in outputs:
        loss = loss + aux_weight * _cross_entropy(outputs["aux"], target, weight)
    return loss


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    w = (target != IGNORE_INDEX).float()
    if weight is not None:
        w = w * weight
    # A weighted mean over valid pixels; a batch with none gives 0, not NaN (F.cross_entropy's 0/0).
    return (per_pixel * w).sum() / w.sum().clamp_min(1e-6)


class SegModule(pl.LightningModule):
    """Training (SGD + poly decay per step) and validation (per-class IoU, W&B panels)."""

    def __init__(self, train: TrainConfig | dict) -> None:
        super().__init__()
        cfg = TrainConfig(**train) if isinstance(train, dict) else train
        self.save_hyperparameters({"train": dataclasses.asdict(cfg)})
        self.cfg = cfg
        if cfg.backbone_weights == "none":
            warnings.warn(NO_BACKBONE_WARNING, stacklevel=2)
        self.model = build_segmenter(cfg.arch, cfg.backbone_weights)
        self.val_confusion = confusion_metric()
        self.corrupt: set[int] = set()
        self.val_metrics: dict | None = None
        self._panels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _channels_last(self) -> bool:
        return self.device.type == "cuda"

    def on_fit_start(self) -> None:
        if self._channels_last():
            self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._channels_last():
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        raise_if_error(batch)
        self.corrupt.update(batch["bad"].tolist())
        outputs = self(batch["image"])
        weight = batch.get("weight") if self.cfg.confidence_weighting else None
        loss = seg_loss(outputs, batch["mask"].long(), self.cfg.aux_weight, weight)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        if self.corrupt:
            self.log("train/corrupt_skipped", float(len(self.corrupt)))
        return loss

    def on_validation_start(self) -> None:
        # Full-resolution images come in many sizes: cuDNN autotuning would re-run for each one.
        self._cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False

    def on_validation_end(self) -> None:
        torch.backends.cudnn.benchmark = self._cudnn_benchmark

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        raise_if_error(batch)
        pred = self(batch["image"])["out"].argmax(1)
        target = batch["mask"].long()
        self.val_confusion.update(pred, target)
        if batch_idx < self.cfg.val_panels and self.trainer.is_global_zero:
            self._panels.append((denormalize(batch["image"][0]), target[0].byte().cpu().numpy(), pred[0].byte().cpu().numpy()))

    def on_validation_epoch_end(self) -> None:
        cm = self.val_confusion.compute()
        self.val_confusion.reset()
        iou = iou_from_confusion(cm)
        miou = mean_iou(iou)
        self.log("val/mIoU", miou)
        for name, value in zip(VOC_CLASSES, iou.tolist()):
            self.log(f"val/iou/{name}", value)
        self.val_metrics = {"step": self.global_step, "confusion": cm.cpu()}
        if self.trainer.is_global_zero:
            log_wandb_panels(self.logger, iou.tolist(), miou, self._panels, self.global_step)
        self._panels = []

    def configure_optimizers(self) -> dict:
        cfg = self.cfg
        model = self.model
        # torchvision's reference recipe: the aux head learns at 10x the base rate.
        groups = [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad]},
            {"params": [p for p in model.classifier.parameters() if p.requires_grad]},
        ]
        if getattr(model, "aux_classifier", None) is not None:
            groups.append({"params": list(model.aux_classifier.parameters()), "lr": cfg.lr * 10})
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, PolyDecay(cfg.max_steps, cfg.poly_power))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclasses.dataclass(frozen=True)
class PolyDecay:
    """lr factor (1 - step / max_steps) ** power, per iteration; 0 past the end."""

    max_steps: int
    power: float

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.max_steps) ** self.power


# ---------------------------------------------------------------- data


def _seed_augmentation(worker_id: int) -> None:
    # albumentations draws from its own generator, which seed_everything does not reach: seed
    # it from the worker's torch seed so a seeded run augments the same way every time.
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


class SegDataModule(pl.LightningDataModule):
    """Training batches (augmented; corrupt samples skipped unless ``skip_corrupt`` is off, when the
    first one stops training) and full-resolution validation (batch 1)."""

    def __init__(self, train_samples: Sequence[Sample], cfg: TrainConfig, val_samples: Sequence[Sample] | None = None,
                 skip_corrupt: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.skip_corrupt = skip_corrupt
        self.train_samples = list(train_samples)
        self.val_samples = list(val_samples or [])

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        # More workers than usable cores only queue behind each other (and torch warns).
        workers = min(self.cfg.num_workers, usable_cpus())
        if workers == 0:
            dataset.transform.set_random_seed(torch.initial_seed() % 2**32)
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
            # Step-based training runs many short epochs on small pools: keep workers alive.
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), collate_fn=collate,
            worker_init_fn=_seed_augmentation,
        )

    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        dataset = SegDataset(
            self.train_samples, train_transform(cfg.crop_size, cfg.scale_min, cfg.scale_max),
            # Every rank's sampler takes 1 / world of the data: padded to a whole batch per rank,
            # a small pool still trains under DDP instead of dropping its only batch.
            skip_corrupt=self.skip_corrupt, confidence=cfg.confidence_weighting,
            min_length=cfg.batch_size * (self.trainer.world_size if self.trainer is not None else 1),
        )
        return self._loader(dataset, cfg.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(SegDataset(self.val_samples, eval_transform(), skip_corrupt=False), 1, train=False)
