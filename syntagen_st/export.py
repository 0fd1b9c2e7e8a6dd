"""Export: selected samples -> a VOC-style tree that torchvision's VOCSegmentation reads.

``VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
ImageSets/Segmentation/train.txt}`` plus ``manifest.json`` with the sha256 of every file, the
seed and the config. Files are written atomically; the manifest last, so a tree with a
manifest is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .config import MAX_PAIRS
from .data import Sample
from .errors import UserError
from .store import atomic_write_json, atomic_write_text, load_mask, save_image, save_mask, sha256_file

VOC_SUBDIR = Path("VOCdevkit") / "VOC2012"
JPEG_QUALITY = 95


def export_voc(samples: Sequence[Sample], out: str | Path, meta: dict) -> Path:
    """Write ``samples`` (ids are the image stems) as a VOC tree under ``out``; return the manifest."""
    if len(samples) > MAX_PAIRS:
        raise UserError(f"{len(samples)} pairs exceed the competition's limit of {MAX_PAIRS}")
    voc = Path(out) / VOC_SUBDIR
    files: dict[str, str] = {}
    ids = []
    for sample in samples:
        sid = sample.image.stem
        jpg = voc / "JPEGImages" / f"{sid}.jpg"
        png = voc / "SegmentationClass" / f"{sid}.png"
        with Image.open(sample.image) as image:
            save_image(jpg, image, fmt="JPEG", quality=JPEG_QUALITY)
        save_mask(png, load_mask(sample.mask))
        for path in (jpg, png):
            files[str(path.relative_to(out))] = sha256_file(path)
        ids.append(sid)
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    atomic_write_text(split, "".join(f"{i}\n" for i in ids))
    files[str(split.relative_to(out))] = sha256_file(split)
    manifest = Path(out) / "manifest.json"
    atomic_write_json(manifest, meta | {"pairs": len(ids), "files": files})
    return manifest
