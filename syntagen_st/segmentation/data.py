"""Segmentation data: finding samples in any supported folder, loading them, augmenting them.

Four kinds of folder hold (image, mask) pairs:
- a run folder ``runs/<name>/`` (its pool, with the latest refined labels of ``rounds/<r>/``),
- a pool folder (``images/``, ``masks/``, ``scores/``, ``manifest/*.jsonl``),
- a VOC-style tree (``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}``),
- a plain folder with ``images/`` and ``masks/`` whose file stems match.

A broken folder is a ``UserError`` at discovery, before any work. A broken sample (unreadable
image, bad mask values, size mismatch) is found when it is loaded: training skips it and
counts it, evaluation stops with one line naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from ..core.classes import IGNORE_INDEX, NUM_CLASSES
from ..core.errors import UserError
from ..core.layout import RunLayout
from ..core.rules import IMAGE_SUFFIXES, VALID_LABEL, invalid_values
from ..core.store import Pool, load_mask, open_image, read_jsonl

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Sample(NamedTuple):
    image: Path
    mask: Path
    scores: Path | None = None
    """Attention scores (pool samples with their original labels only): per-pixel confidence."""


class SampleError(UserError):
    """One sample cannot be used; the message names its file, ``path``."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.path)


# ---------------------------------------------------------------- discovery


def find_samples(path: str | os.PathLike, split: str = "train") -> list[Sample]:
    """The (image, mask, scores) triples of a run, pool, VOC-style tree or images/ + masks/ folder.

    ``split`` picks ``ImageSets/Segmentation/<split>.txt`` in a VOC tree; other kinds ignore it.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    if RunLayout.is_run(root):
        samples = _run_samples(RunLayout(root))
    elif (root / "manifest").is_dir():
        samples = _pool_samples(Pool(root))
    elif (voc := _voc_dir(root)) is not None:
        samples = _voc_samples(voc, split)
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        samples = _plain_samples(root)
    else:
        raise UserError(
            f"{root}: not a dataset: expected a run folder (pool/), a pool (manifest/), "
            "a VOC tree (VOCdevkit/VOC2012/...), or images/ + masks/"
        )
    if not samples:
        raise UserError(f"{root}: holds no samples")
    _inside(root, samples)
    return samples


def _inside(root: Path, samples: list[Sample]) -> None:
    """Refuse a dataset whose files lead outside it (a link to /etc/...), as validate does."""
    base = root.resolve()
    for sample in samples:
        for path in (sample.image, sample.mask):
            if not path.resolve().is_relative_to(base):
                raise UserError(f"{path}: leads outside {root} (a link?); a dataset's files must lie inside its folder")


def find_voc_samples(path: str | os.PathLike, split: str = "val") -> list[Sample]:
    """The samples of a VOC tree's split; a UserError when ``path`` is not a VOC tree."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    voc = _voc_dir(root)
    if voc is None:
        raise UserError(f"{root}: not a VOC tree (expected VOCdevkit/VOC2012/JPEGImages and SegmentationClass)")
    samples = _voc_samples(voc, split)
    if not samples:
        raise UserError(f"{voc}: ImageSets/Segmentation/{split}.txt lists no samples")
    return samples


def _pool_samples(pool: Pool) -> list[Sample]:
    # Missing files of a listed sample surface when it is loaded (skipped in training).
    return [
        Sample(pool.image_path(i), pool.mask_path(i), pool.scores_path(i) if pool.scores_path(i).exists() else None)
        for i in sorted({row["id"] for row in pool.rows()})
    ]


def _run_samples(run: RunLayout) -> list[Sample]:
    samples = _pool_samples(run.pool)
    refined_file = run.latest_samples()
    if refined_file is None:
        return samples
    refined = {row["id"]: row for row in read_jsonl(refined_file, "refinement file", required=("id",))}
    out = []
    for sample in samples:
        row = refined.get(sample.image.stem)
        if row is None:
            out.append(sample)
        elif row.get("kept", True):
            if "mask" not in row:
                raise UserError(f"{refined_file}: row {row['id']!r} has no 'mask'")
            # The attention scores describe the pool mask, not the refined one: no confidence.
            out.append(Sample(sample.image, run.root / row["mask"], None))
    return out


def _voc_dir(root: Path) -> Path | None:
    """The VOC2012 folder of a tree given as its root, its VOCdevkit, or itself."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir() or (candidate / "SegmentationClass").is_dir():
            return candidate
    if (root / "VOCdevkit").is_dir() or root.name == "VOCdevkit":
        raise UserError(f"{root}: malformed VOC root: no VOC2012 folder with JPEGImages/ and SegmentationClass/")
    return None


def _voc_samples(voc: Path, split: str) -> list[Sample]:
    for sub in ("JPEGImages", "SegmentationClass"):
        if not (voc / sub).is_dir():
            raise UserError(f"{voc / sub}: missing folder of the VOC tree")
    listing = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"{listing}: missing split file of the VOC tree")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    samples = []
    for i in ids:
        image = voc / "JPEGImages" / f"{i}.jpg"
        if not image.exists() and (voc / "JPEGImages" / f"{i}.png").exists():
            image = voc / "JPEGImages" / f"{i}.png"
        samples.append(Sample(image, voc / "SegmentationClass" / f"{i}.png"))
    return samples


def _plain_samples(root: Path) -> list[Sample]:
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    samples = [Sample(p, root / "masks" / f"{p.stem}.png") for p in images]
    paired = [s for s in samples if s.mask.exists()]
    if samples and not paired:
        raise UserError(f"{root}: no image in images/ has a mask of the same name in masks/ (<stem>.png)")
    if len(paired) < len(samples):
        log.warning("%s: %d of %d images have no mask in masks/ and are left out", root, len(samples) - len(paired), len(samples))
    return paired


# ---------------------------------------------------------------- loading


def load_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; a SampleError naming it when it is broken or too large."""
    try:
        with open_image(path) as image:
            return np.asarray(image.convert("RGB"))
    except UserError as err:
        raise SampleError(str(err), path) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise SampleError(f"{path}: unreadable image ({err})", path) from None


def _load_confidence(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Per-pixel label confidence: max over the K class score maps, upsampled to (H, W)."""
    try:
        with np.load(path) as npz:
            scores = np.asarray(npz["scores"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise SampleError(f"{path}: unreadable scores ({err})", path) from None
    h, w = size
    if scores.ndim != 3:
        raise SampleError(f"{path}: scores must have shape (K, h, w), got {scores.shape}", path)
    if scores.shape[0] == 0:
        return np.zeros((h, w), dtype=np.float32)
    # cv2 resizes up to 512 channels at once in (h, w, K) layout; it drops a K=1 axis.
    up = cv2.resize(np.ascontiguousarray(scores.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_LINEAR)
    up = up.reshape(h, w, -1)
    return np.clip(up.max(axis=2), 0.0, 1.0)


def load_sample(sample: Sample, confidence: bool = False) -> dict[str, np.ndarray]:
    """Image (H, W, 3) uint8, mask (H, W) uint8 and optionally weight (H, W) float32; SampleError if broken."""
    image = load_image(sample.image)
    try:
        mask = load_mask(sample.mask)
    except UserError as err:
        raise SampleError(str(err), sample.mask) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise SampleError(f"{sample.mask}: unreadable mask ({err})", sample.mask) from None
    if mask.shape != image.shape[:2]:
        raise SampleError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image.name} "
            f"is {image.shape[1]}x{image.shape[0]}", sample.mask,
        )
    if not VALID_LABEL[mask].all():
        bad = invalid_values(mask)
        raise SampleError(f"{sample.mask}: mask values {bad[:5]} outside 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}",
                          sample.mask)
    item = {"image": image, "mask": mask}
    if confidence:
        item["weight"] = (
            _load_confidence(sample.scores, mask.shape)
            if sample.scores is not None
            else np.ones(mask.shape, dtype=np.float32)
        )
    return item


# ---------------------------------------------------------------- augmentation


def train_transform(crop_size: int, scale_min: float = 0.5, scale_max: float = 2.0) -> A.Compose:
    """Random scale, pad (label 255), random crop, flip, photometric jitter, normalise."""
    return A.Compose(
        [
            A.RandomScale(scale_limit=(scale_min - 1.0, scale_max - 1.0), interpolation=cv2.INTER_LINEAR, p=1.0),
            A.PadIfNeeded(
                min_height=crop_size, min_width=crop_size, position="top_left",
                border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height=crop_size, width=crop_size),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=(0.75, 1.25), contrast=(0.75, 1.25), saturation=(0.75, 1.25), hue=(-0.03, 0.03), p=0.8),
            A.Normalize(mean=MEAN, std=STD),
            ToTensorV2(),
        ],
        additional_targets={"weight": "mask"},
        strict=True,
    )


def eval_transform() -> A.Compose:
    """Full resolution, no crop: normalise only."""
    return A.Compose([A.Normalize(mean=MEAN, std=STD), ToTensorV2()], additional_targets={"weight": "mask"}, strict=True)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an (H, W, 3) uint8 picture."""
    mean = torch.tensor(MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(STD, device=image.device).view(3, 1, 1)
    picture = (image.float() * std + mean).clamp(0, 1) * 255
    return picture.round().byte().permute(1, 2, 0).cpu().numpy()


# ---------------------------------------------------------------- dataset


class SegDataset(Dataset):
    """Samples as {"image": (3,H,W) float, "mask": (H,W) uint8[, "weight": (H,W) float], "bad": [...]}.

    ``skip_corrupt`` (training): a broken sample is logged once per process and replaced by the
    next good one, so batches keep their size (BatchNorm in DeepLabv3's ASPP pooling needs > 1);
    the indices skipped are reported in ``"bad"`` so the trainer counts them in one place.
    Otherwise (evaluation) a broken sample becomes ``{"error": message}``, raised by the
    consumer: an exception raised inside a loader worker would come back with its traceback.
    """

    def __init__(
        self, samples: Sequence[Sample], transform: A.Compose, *, skip_corrupt: bool,
        confidence: bool = False, min_length: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.confidence = confidence
        # A dataset smaller than one batch is cycled so that drop_last still yields a batch.
        self.length = max(len(self.samples), min_length)
        self.bad: dict[int, str] = {}

    def __len__(self) -> int:
        return self.length

    def _item(self, index: int) -> dict:
        raw = load_sample(self.samples[index], self.confidence)
        out = self.transform(**raw)
        item = {"image": out["image"], "mask": out["mask"], "index": index}
        if self.confidence:
            item["weight"] = out["weight"].float()
        return item

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for offset in range(len(self.samples)):
            j = (index % len(self.samples) + offset) % len(self.samples)
            if j in self.bad:
                skipped.append(j)
                continue
            try:
                item = self._item(j)
            except SampleError as err:
                if not self.skip_corrupt:
                    return {"error": str(err), "path": str(err.path)}
                self.bad[j] = str(err)
                skipped.append(j)
                log.warning("skipping corrupt training sample: %s (%d skipped so far)", err, len(self.bad))
                continue
            item["bad"] = skipped
            return item
        raise UserError(f"all {len(self.samples)} training samples are corrupt, e.g. {next(iter(self.bad.values()))}")


def collate(items: list[dict]) -> dict:
    """Stack a batch; a broken evaluation sample turns the batch into {"error": message}."""
    for item in items:
        if "error" in item:
            return {"error": item["error"], "path": item["path"]}
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "bad": torch.tensor(sorted({j for it in items for j in it.get("bad", [])}), dtype=torch.long),
    }
    if "weight" in items[0]:
        batch["weight"] = torch.stack([it["weight"] for it in items])
    return batch


def raise_if_error(batch: dict) -> None:
    if "error" in batch:
        raise SampleError(batch["error"], batch["path"])


def eval_loader(samples: Sequence[Sample], num_workers: int = 0) -> DataLoader:
    """Full-resolution, batch-1 loader whose broken samples come back as {"error": ...}."""
    return DataLoader(
        SegDataset(samples, eval_transform(), skip_corrupt=False), batch_size=1, shuffle=False,
        num_workers=num_workers, collate_fn=collate,
    )
