"""Export: a run's selected samples -> the competition entry, with a VOC tree of links beside it.

    python -m syntagen_st.export RUN --out DIR [--zip]

- ``DIR/image/<id>.jpg`` (512x512 RGB), ``DIR/mask/<id>.png`` (8-bit palette, values 0..20 and
  255), ``DIR/train.txt``: the layout the 2024 entries uploaded;
- ``DIR/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/train.txt}``:
  hard links (or relative symlinks) to the same files, for torchvision's VOCSegmentation and
  for the final training, which so reads exactly the exported bytes;
- ``DIR/submission.json``: seed, resolved config, SD weights, library versions, pair count,
  final model checksum, sha256 of every file, per-class counts, each sample's prompt and seed;
- ``DIR/README.md``: the dataset card;
- ``--zip``: ``DIR.zip`` with the entry layout, submission.json and the card; sorted entries,
  fixed timestamps, no links, so exporting the same run twice gives the same bytes.

The export is built in a hidden sibling folder and renamed into place: DIR is always whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jsonargparse import ArgumentParser
from PIL import Image
from tqdm.auto import tqdm

from .card import render_card
from .classes import IGNORE_INDEX, VOC_CLASSES
from .cli import load_config_file, run_main
from .config import MAX_PAIRS, TINY_MODELS, Config
from .data import Sample, load_sample
from .errors import UserError
from .provenance import library_versions, model_identity
from .store import Pool, atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_writer, save_mask, sha256_file

ENTRY_SIZE = (512, 512)
JPEG_QUALITY = 95
VOC_SUBDIR = Path("VOCdevkit") / "VOC2012"
SUBMISSION = "submission.json"
CARD = "README.md"
TRAIN_LIST = "train.txt"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
SAMPLE_KEYS = ("round", "index", "prompt", "class_prompt", "classes", "seed", "label_source", "batch")


def encode_jpeg(image: np.ndarray) -> bytes:
    """The entry's JPEG bytes of an (H, W, 3) uint8 image (reproduce encodes the same way)."""
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def entry_problems(cfg: Config) -> list[str]:
    """Why a run cannot be a competition entry whatever its files; empty when it claims the protocol."""
    reasons = []
    if cfg.model.pretrained in TINY_MODELS:
        reasons.append("it was made with the tiny random-initialised test pipeline, not Stable Diffusion")
    if cfg.loop.source != "sd":
        reasons.append(f"its images come from {cfg.loop.source}, not from Stable Diffusion and the seed")
    return reasons


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
    out = Path(out)
    _check_target(out)
    reasons = entry_problems(cfg)
    stage = out.with_name(f".{out.name}.partial")
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
        atomic_write_bytes(stage / "image" / f"{sid}.jpg", encode_jpeg(image))
        save_mask(stage / "mask" / f"{sid}.png", mask)
        counts = np.bincount(mask.ravel(), minlength=256)
        images_with += counts > 0
        pixels += counts
        ids.append(sid)
    atomic_write_text(stage / TRAIN_LIST, "".join(f"{i}\n" for i in ids))
    names = [TRAIN_LIST, *(f"image/{i}.jpg" for i in ids), *(f"mask/{i}.png" for i in ids)]
    files = {name: sha256_file(stage / name) for name in sorted(names)}
    _link_voc_tree(stage, ids)
    if sizes != {ENTRY_SIZE}:
        reasons.append(f"its images are {', '.join(f'{w}x{h}' for w, h in sorted(sizes))}, not 512x512")
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


def export_run(cfg: Config, run: str | os.PathLike, samples: Sequence[Sample], out: str | os.PathLike,
               progress: bool = True) -> dict:
    """export_entry with the run's manifest rows (each sample's prompt and seed)."""
    rows = {row["id"]: row for row in Pool(Path(run) / "pool").rows()}
    return export_entry(samples, out, cfg, rows, progress)


def _label_name(value: int) -> str:
    return "ignore" if value == IGNORE_INDEX else VOC_CLASSES[value]


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / SUBMISSION).is_file():
        raise UserError(f"{out}: exists and is not an export (no {SUBMISSION}); choose another --out")


def _link(target: Path, link: Path) -> None:
    """A hard link, or a relative symlink where the filesystem has none: never a copy."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(target, link)
    except OSError:
        os.symlink(os.path.relpath(target, link.parent), link)


def _link_voc_tree(root: Path, ids: list[str]) -> None:
    voc = root / VOC_SUBDIR
    for sid in ids:
        _link(root / "image" / f"{sid}.jpg", voc / "JPEGImages" / f"{sid}.jpg")
        _link(root / "mask" / f"{sid}.png", voc / "SegmentationClass" / f"{sid}.png")
    _link(root / TRAIN_LIST, voc / "ImageSets" / "Segmentation" / TRAIN_LIST)


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
    path = Path(export) / SUBMISSION
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def write_submission(export: str | os.PathLike, submission: dict) -> None:
    """submission.json and the dataset card made from it."""
    atomic_write_json(Path(export) / SUBMISSION, submission)
    atomic_write_text(Path(export) / CARD, render_card(submission))


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
            raise UserError(f"{path}: missing or changed since the export (sha256 differs from {SUBMISSION}); export again")


def write_zip(export: str | os.PathLike, path: str | os.PathLike) -> str:
    """A deterministic zip of the entry layout, submission.json and the card; returns its sha256."""
    export, path = Path(export), Path(path)
    names = [SUBMISSION, CARD, *read_submission(export)["files"]]
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


def main(argv: Sequence[str] | None = None) -> int:
    from .loop import Loop, Run  # the loop imports this module

    parser = ArgumentParser(prog="python -m syntagen_st.export", exit_on_error=False,
                            description="Export a run's selected samples as a competition entry.")
    parser.add_argument("run", help="a run folder (made by fit)")
    parser.add_argument("--out", required=True, help="the export folder (an earlier export there is replaced)")
    parser.add_argument("--zip", action="store_true", help="also write OUT.zip (deterministic, no links)")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    run, out = Path(ns.run), Path(ns.out)
    if not (run / "config.yaml").is_file() or not (run / "pool").is_dir():
        raise UserError(f"{run}: not a run folder (no config.yaml and pool/)")
    cfg = load_config_file(str(run / "config.yaml"))
    # The final model trained on RUN/export: its checksum belongs to an export of the same files.
    fitted = read_submission(run / "export") if (run / "export" / SUBMISSION).is_file() else {}
    samples = Loop(cfg, Run(run), progress=not ns.no_progress).selected()
    submission = export_run(cfg, run, samples, out, progress=not ns.no_progress)
    print(f"exported {submission['pairs']} pairs to {out} (image/, mask/, train.txt, VOCdevkit/, {SUBMISSION}, {CARD})")
    if fitted.get("model_sha256") and fitted.get("files") == submission["files"]:
        record_model(out, fitted["model_sha256"])
        print(f"final model sha256: {fitted['model_sha256']}")
    else:
        print(f"final model sha256: none: no final model of {run} was trained on these files (run fit to the end)")
    if ns.zip:
        zip_path = out.with_name(out.name + ".zip")
        print(f"zip: {zip_path} sha256 {write_zip(out, zip_path)}")
    warning = not_an_entry_warning(read_submission(out))
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main, "syntagen_st.export")
