"""The segmenter: torchvision DeepLabv3 / LR-ASPP, its loss, optimiser and Lightning wrapper.

Also the pieces other stages reuse without Lightning: building a model, loading backbone
weights from a local file, saving / loading final weights as safetensors, and prediction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from .checkpoints import read_checkpoint
from .classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES
from .config import TrainConfig
from .data import denormalize, eval_transform, raise_if_error
from .errors import UserError
from .metrics import confusion_metric, iou_from_confusion, mean_iou
from .store import atomic_write_bytes, atomic_write_text, sha256_file

METADATA_KEY = "syntagen_st"
AUX_ARCHS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large")
NO_BACKBONE_WARNING = (
    "train.backbone_weights is 'none': the backbone starts from random weights. Expect far lower "
    "mIoU than the fixed protocol's ImageNet-pretrained backbone (on VOC, tens of points) and slower "
    "convergence; give a local state-dict file or 'imagenet' for real runs."
)


# ---------------------------------------------------------------- building


def build_segmenter(arch: str, backbone_weights: str = "none", num_classes: int = NUM_CLASSES, aux: bool | None = None) -> nn.Module:
    """A torchvision segmentation model; backbone from 'imagenet', a local file, or random ('none').

    The caller warns about 'none' where it is a user's choice (see SegModule); loading final
    weights builds with 'none' on purpose.
    """
    aux = arch in AUX_ARCHS if aux is None else aux
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes, "weights_backbone": None}
    if arch in AUX_ARCHS:
        kwargs["aux_loss"] = aux
    if backbone_weights == "imagenet":
        kwargs["weights_backbone"] = "IMAGENET1K_V1"
    try:
        model = torchvision.models.get_model(arch, **kwargs)
    except OSError as err:  # urllib's URLError is an OSError: no network, no cached weights
        raise UserError(
            f"could not get the ImageNet backbone weights for {arch} ({err}); set train.backbone_weights "
            "to a local state-dict file, or 'none'"
        ) from None
    if backbone_weights not in ("imagenet", "none"):
        load_backbone_weights(model, backbone_weights)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path}: unreadable weights file ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> int:
    """Load a classification network's state dict (e.g. torchvision resnet50) into model.backbone.

    Keys are matched by suffix, so 'conv1.weight', 'backbone.conv1.weight', 'module.conv1.weight'
    and MobileNet's 'features.0.0.weight' all work; the classifier head (fc.*) is left out.
    Returns the number of tensors loaded; every backbone tensor must be found.
    """
    path = Path(path).expanduser()
    state = _read_state_dict(path)
    target = model.backbone.state_dict()
    first = next(iter(target))
    prefixes = [k[: -len(first)] for k in state if k.endswith(first) and (len(k) == len(first) or k[-len(first) - 1] == ".")]
    for prefix in prefixes:
        if all(prefix + k in state for k in target):
            break
    else:
        raise UserError(f"{path}: does not hold the {type(model.backbone).__name__} backbone of this model (no key ends in {first!r} with all the others)")
    picked = {k: state[prefix + k] for k in target}
    for key, value in picked.items():
        if value.shape != target[key].shape:
            raise UserError(f"{path}: {prefix + key} has shape {tuple(value.shape)}, the backbone needs {tuple(target[key].shape)}")
    model.backbone.load_state_dict(picked, strict=True)
    return len(picked)


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


# ---------------------------------------------------------------- final weights


def save_weights(model: nn.Module, path: str | Path, arch: str) -> str:
    """Write the model's state dict as safetensors (atomically) and return its sha256.

    The same weights always give the same bytes (the checksum is what a team submits):
    safetensors writes its metadata map in a random order, so it gets a single entry.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"arch": arch, "num_classes": NUM_CLASSES, "aux": getattr(model, "aux_classifier", None) is not None}
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))
    return sha256_file(path)


def write_checksum(weights: Path) -> str:
    """``<sha256>  <name>`` in checksum.txt beside the weights (the format of ``sha256sum -c``)."""
    digest = sha256_file(weights)
    atomic_write_text(weights.parent / "checksum.txt", f"{digest}  {weights.name}\n")
    return digest


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, str]:
    """The network of a Lightning checkpoint written by SegModule, and its arch."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    try:
        arch = ckpt["hyper_parameters"]["train"]["arch"]
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: not a syntagen_st training checkpoint ({type(err).__name__}: {err})") from None
    model = build_segmenter(arch, "none", aux=any(k.startswith("aux_classifier.") for k in state))
    model.load_state_dict(state)
    return model, arch


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A model in eval mode from final weights (.safetensors) or a training checkpoint (.ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            state = safetensors.torch.load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{path}: unreadable safetensors file ({err})") from None
        if "arch" not in meta:
            raise UserError(f"{path}: no {METADATA_KEY!r} metadata with the arch; not written by syntagen_st")
        model = build_segmenter(meta["arch"], "none", aux=bool(meta.get("aux")))
        model.load_state_dict(state)
    else:
        model, _ = model_from_checkpoint(path)
    return model.to(device).eval()


# ---------------------------------------------------------------- prediction


def _as_array(image: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    with Image.open(image) as im:
        return np.asarray(im.convert("RGB"))


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: Iterable[str | Path | np.ndarray], batch_size: int = 8,
    device: str | torch.device | None = None,
) -> Iterator[np.ndarray]:
    """Softmax probabilities (21, H, W) float32 per image, at each image's own resolution.

    Consecutive images of equal size are batched; images are paths or (H, W, 3) uint8 arrays.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    transform = eval_transform()
    pending: list[torch.Tensor] = []

    def flush() -> Iterator[np.ndarray]:
        x = torch.stack(pending).to(device)
        pending.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)["out"]
        yield from logits.float().softmax(1).cpu().numpy()

    for image in images:
        x = transform(image=_as_array(image))["image"]
        if pending and (x.shape != pending[0].shape or len(pending) == batch_size):
            yield from flush()
        pending.append(x)
    if pending:
        yield from flush()


def predict(
    model: nn.Module, images: Iterable[str | Path | np.ndarray], batch_size: int = 8,
    device: str | torch.device | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per image: argmax label map (H, W) uint8 and its softmax confidence (H, W) float32."""
    for proba in predict_proba(model, images, batch_size, device):
        yield proba.argmax(0).astype(np.uint8), proba.max(0)
