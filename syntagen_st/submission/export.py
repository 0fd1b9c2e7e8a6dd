"""Export: selected samples -> the competition entry (``core.layout.EntryLayout``), with a VOC
tree of links beside it, submission.json, the dataset card, and a deterministic zip.

- ``image/<id>.jpg`` (512x512 RGB), ``mask/<id>.png`` (8-bit palette, values 0..20 and 255),
  ``train.txt``: the layout the 2024 entries uploaded;
- ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/train.txt}``: hard
  links (or relative symlinks) to the same files, for torchvision's VOCSegmentation and for the
  final training, which so reads exactly the exported bytes;
- ``submission.json``: seed, resolved config, SD weights, library versions, pair count, final
  model checksum, sha256 of every file, per-class counts, each sample's prompt and seed;
- ``README.md``: the dataset card;
- the zip: the entry layout, submission.json and the card; sorted entries, fixed timestamps, no
  links, so exporting the same run twice gives the same bytes.

The export is built in a hidden sibling folder and renamed into place: it is always whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..core import rules
from ..core.classes import IGNORE_INDEX, VOC_CLASSES
from ..core.config import TINY_MODELS, Config
from ..core.errors import UserError
from ..core.layout import EntryLayout, RunLayout
from ..core.rules import ENTRY_SIZE, MAX_PAIRS
from ..core.store import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_writer, save_mask, sha256_file
from ..segmentation.data import Sample, load_sample
from .card import render_card
from .provenance import library_versions, model_identity

JPEG_QUALITY = 95
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
SAMPLE_KEYS = ("round", "index", "prompt", "class_prompt", "classes", "seed", "label_source", "batch")


def encode_jpeg(image: np.ndarray) -> bytes:
    """The entry's JPEG bytes of an (H, W, 3) uint8 image (reproduce encodes the same way)."""
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def entry_problems(cfg: Config) -> list[str]:
    """Why a run cannot be a competition entry whatever its files; empty when it claims the protocol."""
    return rules.entry_problems(cfg.model.pretrained in TINY_MODELS, cfg.loop.source)


def export_entry(samples: Sequence[Sample], out: str | os.PathLike, cfg: Config, rows: dict[str, dict],
                 progress: bool = True) -> dict:
    """Write ``samples`` (ids are the image stems) as an entry under ``out``; return submission.json's
    contents. ``rows`` are the pool's manifest rows by id (prompt, seed, ...).

    Refused with one line naming the file: more than MAX_PAIRS pairs, a mask value outside
    0..20/255, and, in a run that claims the competition protocol, an image that is not 512x512.
    """
    if len(samples) > MAX_PAIRS:
        raise UserError(f"{len(samples)} pairs exceed the competition's limit of {MAX_PAIRS}; lower loop.max_pairs")
    if not samples:
        raise UserError("no samples to export")
    out = Path(os.path.abspath(out))  # "." has no name to stage beside
    _check_target(out)
    reasons = entry_problems(cfg)
    stage = out.with_name(f".{out.name}.partial")
    staged = EntryLayout(stage)
    shutil.rmtree(stage, ignore_errors=True)
    images_with = np.zeros(256, np.int64)
    pixels = np.zeros(256, np.int64)
    sizes: set[tuple[int, int]] = set()
    ids: list[str] = []
    for sample in tqdm(sorted(samples, key=lambda s: s.image.stem), desc="export", unit="pair", disable=not progress):
        sid = sample.image.stem
        if ids and ids[-1] == sid:
            raise UserError(f"{sample.image}: a second sample with the id {sid!r}")
        item = load_sample(sample)  # unreadable files and bad mask values: one line naming the file
        image, mask = item["image"], item["mask"]
        size = (image.shape[1], image.shape[0])
        if not reasons and size != ENTRY_SIZE:
            raise UserError(f"{sample.image}: {size[0]}x{size[1]} image; a competition entry needs 512x512 "
                            f"(this run claims the protocol: {cfg.model.pretrained})")
        sizes.add(size)
        atomic_write_bytes(staged.image(sid), encode_jpeg(image))
        save_mask(staged.mask(sid), mask)
        counts = np.bincount(mask.ravel(), minlength=256)
        images_with += counts > 0
        pixels += counts
        ids.append(sid)
    atomic_write_text(staged.train_list, "".join(f"{i}\n" for i in ids))
    names = [EntryLayout.TRAIN_LIST, *(EntryLayout.image_name(i) for i in ids), *(EntryLayout.mask_name(i) for i in ids)]
    files = {name: sha256_file(stage / name) for name in sorted(names)}
    link_voc_tree(stage, ids)
    reasons += rules.entry_problems(False, "sd", sizes)
    labels = [*range(len(VOC_CLASSES)), IGNORE_INDEX]
    submission = {
        "format": "syntagen_st submission 1",
        "name": cfg.name,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "stable_diffusion": model_identity(cfg.model),
        "prompts_file_sha256": sha256_file(cfg.generate.prompts_file) if cfg.generate.prompts_file else None,
        "versions": library_versions(),
        "pairs": len(ids),
        "valid_entry": not reasons,
        "not_an_entry": reasons,
        "model_sha256": None,
        "classes": {_label_name(v): {"images": int(images_with[v]), "pixels": int(pixels[v])} for v in labels},
        "files": files,
        "samples": {i: {k: rows.get(i, {}).get(k) for k in SAMPLE_KEYS} for i in ids},
    }
    write_submission(stage, submission)
    _swap(stage, out)
    return submission


def export_run(cfg: Config, run: RunLayout, samples: Sequence[Sample], out: str | os.PathLike,
               progress: bool = True) -> dict:
    """export_entry with the run's manifest rows (each sample's prompt and seed)."""
    rows = {row["id"]: row for row in run.pool.rows()}
    return export_entry(samples, out, cfg, rows, progress)


def _label_name(value: int) -> str:
    return "ignore" if value == IGNORE_INDEX else VOC_CLASSES[value]


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not EntryLayout(out).submission.is_file():
        raise UserError(f"{out}: exists and is not an export (no {EntryLayout.SUBMISSION}); choose another --out")


def _link(target: Path, link: Path) -> None:
    """A hard link, or a relative symlink where the filesystem has none: never a copy."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(target, link)
    except OSError:
        os.symlink(os.path.relpath(target, link.parent), link)


def link_voc_tree(root: Path, ids: list[str]) -> None:
    """The VOC tree beside an entry's files, as links to them (torchvision's VOCSegmentation reads it)."""
    entry = EntryLayout(root)
    voc = entry.voc
    for sid in ids:
        _link(entry.image(sid), voc / "JPEGImages" / f"{sid}.jpg")
        _link(entry.mask(sid), voc / "SegmentationClass" / f"{sid}.png")
    _link(entry.train_list, voc / "ImageSets" / "Segmentation" / entry.TRAIN_LIST)


def _swap(stage: Path, out: Path) -> None:
    """Put the finished ``stage`` folder in the place of ``out``."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage, out)


def read_submission(export: str | os.PathLike) -> dict:
    path = EntryLayout(export).submission
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def write_submission(export: str | os.PathLike, submission: dict) -> None:
    """submission.json and the dataset card made from it."""
    entry = EntryLayout(export)
    atomic_write_json(entry.submission, submission)
    atomic_write_text(entry.card, render_card(submission))


def record_model(export: str | os.PathLike, model_sha256: str) -> None:
    """Put the final model's checksum into submission.json and the card."""
    submission = read_submission(export)
    submission["model_sha256"] = model_sha256
    write_submission(export, submission)


def dataset_digest(export: str | os.PathLike) -> str:
    """One sha256 for the exported data files (what a model trained on them trained on)."""
    files = read_submission(export)["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_files(export: str | os.PathLike) -> None:
    """A UserError naming the first exported file whose bytes are not those submission.json lists."""
    export = Path(export)
    for name, digest in read_submission(export)["files"].items():
        path = export / name
        if not path.is_file() or sha256_file(path) != digest:
            raise UserError(f"{path}: missing or changed since the export (sha256 differs from {EntryLayout.SUBMISSION}); export again")


def write_zip(export: str | os.PathLike, path: str | os.PathLike) -> str:
    """A deterministic zip of the entry layout, submission.json and the card; returns its sha256."""
    export, path = Path(export), Path(path)
    names = [EntryLayout.SUBMISSION, EntryLayout.CARD, *read_submission(export)["files"]]
    with atomic_writer(path) as f, zipfile.ZipFile(f, "w") as zf:
        for name in sorted(names):
            source = export / name
            if source.is_symlink() or not source.is_file():
                raise UserError(f"{source}: not a regular file; export again")
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.create_system = 3  # unix, so the mode below is read as one
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            # JPEG and PNG are compressed already.
            info.compress_type = zipfile.ZIP_STORED if name.endswith((".jpg", ".png")) else zipfile.ZIP_DEFLATED
            zf.writestr(info, source.read_bytes())
    return sha256_file(path)


def not_an_entry_warning(submission: dict) -> str | None:
    if submission["valid_entry"]:
        return None
    return "WARNING: this export is NOT a valid competition entry: " + "; ".join(submission["not_an_entry"])
