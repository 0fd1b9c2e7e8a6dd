"""Validating a competition entry, ours or anyone's, against the rules (``core.rules``).

An entry is a folder or a zip in the entry layout (``image/<id>.jpg``, ``mask/<id>.png``,
``train.txt``; optionally under one top folder) or a VOC tree. Every violation becomes a
``Problem``; the report counts them per kind and summarises pairs and classes. A zip is read in
place (see bundle.py): nothing is ever written.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..core.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES
from ..core.errors import UserError
from ..core.rules import ENTRY_IMAGE_SUFFIXES, ENTRY_SIZE, MAX_PAIRS, VALID_LABEL
from .bundle import Bundle, Problem, find_root

MAX_DECODE_PIXELS = 4096 * 4096
"""Images larger than this are reported by their header's size and never decoded."""


@dataclass(frozen=True)
class Layout:
    root: str
    images: str
    masks: str
    listing: str


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    pairs: int = 0
    images_per_class: dict[str, int] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.problems

    def add(self, file: str, kind: str, message: str) -> None:
        self.problems.append(Problem(file, kind, message))


def find_layout(names: list[str]) -> Layout | None:
    """The entry layout, or else a VOC tree, among a bundle's names."""
    root = find_root(names)
    if any(n.startswith((root + "image/", root + "mask/")) or n == root + "train.txt" for n in names):
        return Layout(root, root + "image/", root + "mask/", root + "train.txt")
    for n in names:
        if "VOC2012/JPEGImages/" in n or "VOC2012/SegmentationClass/" in n:
            voc = n[: n.index("VOC2012/") + len("VOC2012/")]
            return Layout(voc, voc + "JPEGImages/", voc + "SegmentationClass/", voc + "ImageSets/Segmentation/train.txt")
    return None


def _files_in(names: list[str], folder: str, suffixes: tuple[str, ...], what: str, report: Report) -> dict[str, str]:
    """id -> name of the files in ``folder``; anything else there is a problem."""
    found: dict[str, str] = {}
    for name in names:
        if not name.startswith(folder):
            continue
        rel = PurePosixPath(name[len(folder):])
        if len(rel.parts) != 1:
            report.add(name, "layout", f"a subfolder in {folder} (files must sit directly in it)")
        elif rel.suffix.lower() not in suffixes:
            report.add(name, "layout", f"not {what} ({' or '.join(suffixes)})")
        elif rel.stem in found:
            report.add(name, "layout", f"a second file for the id {rel.stem!r} (also {found[rel.stem]})")
        else:
            found[rel.stem] = name
    return found


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def validate_bundle(bundle: Bundle, size: tuple[int, int] = ENTRY_SIZE, progress: bool = False) -> Report:
    """Check every rule of the entry on ``bundle``; the report lists every violation. ``size`` is
    the image size required (the competition's 512x512 unless testing)."""
    report = Report()
    names = bundle.names
    layout = find_layout(names)
    if layout is None:
        report.add(str(bundle.path), "layout", "no image/ and mask/ folders or train.txt (the entry layout), nor a VOC tree")
        return report
    images = _files_in(names, layout.images, ENTRY_IMAGE_SUFFIXES, "an image", report)
    masks = _files_in(names, layout.masks, (".png",), "a PNG mask", report)
    if not images and not masks:
        report.add(layout.images or str(bundle.path), "layout", "no images and no masks")
    listed = _check_listing(bundle, layout, images, masks, report)
    for sid in sorted(images.keys() - masks.keys()):
        report.add(images[sid], "missing mask", f"no mask {layout.masks}{sid}.png")
    for sid in sorted(masks.keys() - images.keys()):
        report.add(masks[sid], "missing image", f"no image {layout.images}{sid}.jpg")
    pairs = sorted(images.keys() & masks.keys())
    report.pairs = len(pairs)
    if max(len(pairs), len(listed or [])) > MAX_PAIRS:
        report.add(layout.listing, "too many pairs", f"{max(len(pairs), len(listed or []))} pairs, above the limit of {MAX_PAIRS}")

    digests: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    first_with: dict[str, str] = {}
    for sid, name in tqdm(sorted(images.items()), desc="images", unit="img", disable=not progress):
        data = _read(bundle, name, report)
        if data is None:
            continue
        digests[name] = hashlib.sha256(data).hexdigest()
        try:
            with _open(data) as im:
                sizes[sid] = im.size
                if im.size != size:
                    report.add(name, "image size", f"{im.size[0]}x{im.size[1]}, must be {size[0]}x{size[1]}")
                if im.mode != "RGB":
                    report.add(name, "image mode", f"mode {im.mode}, must be RGB")
                if im.size[0] * im.size[1] > MAX_DECODE_PIXELS:
                    continue
                pixels = hashlib.sha256(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            report.add(name, "unreadable", f"unreadable image ({err})")
            continue
        if pixels in first_with:
            report.add(name, "duplicate image", f"same pixels as {first_with[pixels]}")
        else:
            first_with[pixels] = name

    present = np.zeros(256, np.int64)
    for sid, name in tqdm(sorted(masks.items()), desc="masks", unit="mask", disable=not progress):
        data = _read(bundle, name, report)
        if data is None:
            continue
        digests[name] = hashlib.sha256(data).hexdigest()
        try:
            with _open(data) as im:
                if im.mode not in ("P", "L"):
                    report.add(name, "mask mode", f"mode {im.mode}, must be an 8-bit palette (P) or grayscale (L) PNG")
                    continue
                if sid in sizes and im.size != sizes[sid]:
                    report.add(name, "mask size", f"{im.size[0]}x{im.size[1]}, its image is {sizes[sid][0]}x{sizes[sid][1]}")
                if im.size[0] * im.size[1] > MAX_DECODE_PIXELS:
                    continue
                counts = np.bincount(np.asarray(im).ravel(), minlength=256)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            report.add(name, "unreadable", f"unreadable mask ({err})")
            continue
        bad = np.flatnonzero((counts > 0) & ~VALID_LABEL)
        if bad.size:
            report.add(name, "mask values", f"values {bad[:8].tolist()} outside 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}")
        present += counts > 0
    report.images_per_class = {VOC_CLASSES[c]: int(present[c]) for c in range(1, NUM_CLASSES)}
    _check_submission(bundle, layout, images, masks, digests, report)
    return report


def _read(bundle: Bundle, name: str, report: Report) -> bytes | None:
    try:
        return bundle.read(name)
    except (OSError, UserError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as err:
        # a damaged zip entry (bad CRC, truncated stream, unknown compression) or an unreadable file
        report.add(name, "unreadable", f"cannot read ({err})")
        return None


def _check_listing(bundle: Bundle, layout: Layout, images: dict, masks: dict, report: Report) -> list[str] | None:
    if layout.listing not in bundle.names:
        report.add(layout.listing, "train.txt", "missing: the list of ids")
        return None
    data = _read(bundle, layout.listing, report)
    if data is None:
        return None
    try:
        listed = [line.split()[0] for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        report.add(layout.listing, "train.txt", f"not UTF-8 text ({err})")
        return None
    for sid, n in Counter(listed).items():
        if n > 1:
            report.add(layout.listing, "train.txt", f"lists {sid!r} {n} times")
    for sid in sorted(set(listed) - images.keys() - masks.keys()):
        report.add(layout.listing, "train.txt", f"lists {sid!r}, which has no image and no mask")
    known = set(listed)
    for sid in sorted((images.keys() | masks.keys()) - known):
        report.add(images.get(sid) or masks[sid], "train.txt", "not listed in train.txt")
    return listed


def _check_submission(bundle: Bundle, layout: Layout, images: dict, masks: dict, digests: dict[str, str], report: Report) -> None:
    """Every checksum of submission.json, when there is one, and its pair count."""
    name = layout.root + "submission.json"
    if name not in bundle.names:
        return
    data = _read(bundle, name, report)
    try:
        submission = json.loads(data) if data is not None else None
        files = submission["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as err:
        report.add(name, "checksum", f"unreadable submission.json ({type(err).__name__}: {err})")
        return
    for rel, digest in sorted(files.items()):
        full = layout.root + str(rel)
        if full not in bundle.names:
            report.add(full, "checksum", "listed in submission.json but missing")
            continue
        actual = digests.get(full)
        if actual is None:
            raw = _read(bundle, full, report)
            actual = hashlib.sha256(raw).hexdigest() if raw is not None else None
        if actual is not None and actual != digest:
            report.add(full, "checksum", f"sha256 {actual[:12]}... does not match submission.json ({str(digest)[:12]}...)")
    data_files = [*images.values(), *masks.values(), layout.listing]
    for full in sorted(f for f in data_files if f in bundle.names and f[len(layout.root):] not in files):
        report.add(full, "checksum", "not listed in submission.json")
    if "pairs" in submission and submission["pairs"] != report.pairs:
        report.add(name, "checksum", f"says {submission['pairs']} pairs, the files hold {report.pairs}")


def print_report(report: Report, label: str) -> None:
    for problem in report.problems:
        print(problem)
    counts = Counter(p.kind for p in report.problems)
    if counts:
        print(f"{len(report.problems)} violations: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))
    present = {c: n for c, n in report.images_per_class.items() if n}
    print(f"pairs: {report.pairs}   classes present: {len(present)} of {NUM_CLASSES - 1}")
    if report.images_per_class:
        print("images per class: " + ", ".join(f"{c} {n}" for c, n in report.images_per_class.items()))
    print(f"VALID: {label}" if report.valid else f"INVALID: {label} ({len(report.problems)} violations)")
