"""Files on disk: atomic writes, the sample pool, manifests and checksums.

Every file is written to a temporary name in the same folder and renamed, so a reader never
sees half a file. A manifest shard is written only after the files its rows describe.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from .classes import PALETTE
from .errors import UserError
from .rules import check_pixels


def umask() -> int:
    """This process's umask, read without changing it (Linux's /proc; elsewhere set and restored
    once, the only way POSIX offers)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _umask_once()


@functools.cache
def _umask_once() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once the block finishes without an error,
    readable as the umask says (a plain ``open`` would give 0666 & ~umask; mkstemp gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _encode_image(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def save_image(path: str | os.PathLike, image: Image.Image | np.ndarray, fmt: str = "PNG", **kwargs: Any) -> None:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    atomic_write_bytes(path, _encode_image(image.convert("RGB"), fmt, **kwargs))


def mask_to_png(mask: np.ndarray) -> Image.Image:
    """An 8-bit palette PNG with the VOC palette (values 0..20 and 255)."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"a mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    image = Image.fromarray(mask, mode="P")
    image.putpalette(PALETTE)
    return image


def save_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    atomic_write_bytes(path, _encode_image(mask_to_png(mask), "PNG"))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def open_image(path: str | os.PathLike) -> Image.Image:
    """An image opened lazily, refused from its header when it is too large to decode (core.rules);
    a UserError naming the file, never PIL's decompression-bomb traceback."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise UserError(f"{path}: {err}") from None
    try:
        check_pixels(path, image.size)
    except ValueError as err:
        image.close()
        raise UserError(str(err)) from None
    return image


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Label values of a mask PNG (palette or grayscale); never palette colours."""
    with open_image(path) as image:
        if image.mode not in ("P", "L"):
            raise UserError(f"{path}: a mask must be a palette or grayscale PNG, got mode {image.mode}")
        return np.array(image)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: str | os.PathLike, what: str = "JSON-lines file", required: tuple[str, ...] = ()) -> list[dict]:
    """The objects of a JSON-lines file, each with the ``required`` keys; a UserError naming
    the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable {what} ({err})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{path}: unreadable {what} (a line is not a JSON object)")
    for key in required:
        if not all(key in row for row in rows):
            raise UserError(f"{path}: unreadable {what} (a row has no {key!r})")
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


class Pool:
    """A folder of samples: images/, masks/ (attention labels), scores/, manifest/*.jsonl.

    The manifest is a set of shards, one per written batch, each written atomically after the
    files of its rows; a sample exists exactly when a manifest row names it.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.masks = self.root / "masks"
        self.scores = self.root / "scores"
        self.manifest = self.root / "manifest"

    def image_path(self, sample_id: str) -> Path:
        return self.images / f"{sample_id}.png"

    def mask_path(self, sample_id: str) -> Path:
        return self.masks / f"{sample_id}.png"

    def scores_path(self, sample_id: str) -> Path:
        return self.scores / f"{sample_id}.npz"

    def write_sample(self, sample_id: str, image: np.ndarray, mask: np.ndarray, **scores: np.ndarray) -> None:
        save_image(self.image_path(sample_id), image)
        save_mask(self.mask_path(sample_id), mask)
        save_npz(self.scores_path(sample_id), **scores)

    def write_manifest_shard(self, name: str, rows: list[dict]) -> None:
        write_jsonl(self.manifest / f"{name}.jsonl", rows)

    def rows(self) -> list[dict]:
        """All manifest rows, in sample-id order."""
        rows: list[dict] = []
        for shard in sorted(self.manifest.glob("*.jsonl")):
            rows.extend(read_jsonl(shard, "manifest shard", required=("id",)))
        return sorted(rows, key=lambda row: row["id"])

    def done_ids(self) -> set[str]:
        return {row["id"] for row in self.rows()}

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows())
