"""Shared fixtures. Everything runs offline on the CPU with tiny random-initialised models."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from syntagen_st.core.config import Config  # noqa: E402

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
"""The shipped smoke config, found from the tests folder so pytest may run from anywhere."""

SMALL = [
    "--config", SMOKE, "--generate.height", "64", "--generate.width", "64", "--generate.steps", "2",
    "--loop.rounds", "2", "--loop.generate_total", "12", "--loop.round_steps", "4", "--train.max_steps", "4",
    "--train.crop_size", "32", "--refine.min_class_pixels", "0", "--refine.min_reliability", "0",
    "--refine.max_core_agreement", "1", "--refine.min_core_persistence", "0", "--refine.drop_fraction", "0.2",
    "--no-progress",
]
"""The smoke config, shrunk: 2 rounds of 6 images at 64 px, 4-step models. Every class passes the
gate (min_reliability 0, max_core_agreement 1, min_core_persistence 0), so the relabel and drop
paths run even with such weak models."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[object], capsys=None,
            prog: str | None = None) -> tuple[int, str, str]:
    """A command run the way ``python -m`` runs it (``run_main``, named after its module unless
    ``prog`` is given): exit code, and with ``capsys`` what it printed (earlier output discarded)."""
    from syntagen_st.core.cli import run_main

    if capsys is not None:
        capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_main(main, prog or main.__module__, [str(a) for a in argv])
    out = capsys.readouterr() if capsys is not None else None
    return done.value.code, (out.out if out else ""), (out.err if out else "")


def bleeding_square(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A one-sample images/ + masks/ dataset at ``root``: a bright square on a dark 256 px image,
    labelled as class 8 by a blob that bleeds 4 px over every edge (an image-guided refinement must
    snap it); returns the folder, the image and the label."""
    from PIL import Image

    from syntagen_st.core.store import save_mask

    (root / "images").mkdir(parents=True)
    image = np.full((256, 256, 3), 40, np.uint8)
    image[64:192, 64:192] = 210
    blob = np.zeros((256, 256), np.uint8)
    blob[60:196, 60:196] = 8
    Image.fromarray(image).save(root / "images" / "a.png")
    save_mask(root / "masks" / "a.png", blob)
    return root, image, blob


def run_tree(root: Path) -> dict[str, bytes]:
    """Every file a run keeps, export/ and final/ included; not the fold models' and the final
    training's Lightning folders (checkpoints name their own path), logs, state.json, or the
    report (it shows step timings)."""
    skip = ("fold", "checkpoints", "wandb", "logs", "state.json", "report")
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(skip) for part in p.relative_to(root).parts)
    }


@dataclass(frozen=True)
class FinishedRun:
    """A fit run to the end in a process of its own: its folder and what it printed."""

    root: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> FinishedRun:
    """THE shared smoke run: ``fit`` with SMALL (relabelling at >= 0.05 confidence, so labels
    change), run once per session as a user runs it. Tests only read it; one that needs to change
    a run copies it first."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    # With progress bars, as a user sees them (they go to stderr).
    args = [a for a in SMALL if a != "--no-progress"]
    result = subprocess.run([sys.executable, "-m", "syntagen_st.fit", *args, "--refine.relabel_confidence", "0.05",
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return FinishedRun(out, result.stdout, result.stderr)


def smoke_config(**generate) -> Config:
    """The smoke config's generator settings, shrunk further for tests."""
    cfg = Config()
    cfg.model.pretrained = "tiny"
    cfg.model.device = "cpu"
    cfg.model.dtype = "float32"
    cfg.generate.steps = 3
    cfg.generate.height = cfg.generate.width = 64
    cfg.generate.batch_size = 2
    cfg.generate.num_images = 4
    for key, value in generate.items():
        setattr(cfg.generate, key, value)
    return cfg


@pytest.fixture(scope="session")
def tiny_generator():
    """One tiny SD 1.x-layout SampleGenerator for the whole session (64 px, 3 steps)."""
    from syntagen_st.generation.sampler import SampleGenerator

    return SampleGenerator(smoke_config())


# ---------------------------------------------------------------- segmentation data (train / evaluate tests)

SEG_COLOURS = {1: (220, 40, 40), 8: (40, 200, 40), 15: (40, 60, 220)}
"""Tiny segmentation sets: one coloured rectangle per image, its colour names its class."""


def _seg_pair(rng, size: int):
    import numpy as np

    image = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    cls = int(rng.choice(list(SEG_COLOURS)))
    h, w = rng.integers(size // 3, size // 2 + 1, size=2)
    y, x = rng.integers(0, size - h), rng.integers(0, size - w)
    image[y : y + h, x : x + w] = SEG_COLOURS[cls]
    mask[max(y - 1, 0) : y + h + 1, max(x - 1, 0) : x + w + 1] = 255  # VOC-style unsure border
    mask[y : y + h, x : x + w] = cls
    return image, mask


@pytest.fixture(scope="session")
def make_seg_dataset():
    """make(root, kind="plain"|"voc"|"pool", n=8, size=64, seed=0) -> root: a tiny dataset on disk.

    plain: images/*.png + masks/*.png; voc: VOCdevkit/VOC2012 with train.txt (first half) and
    val.txt (second half); pool: images/, masks/, scores/*.npz, manifest/000.jsonl.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from syntagen_st.core.store import Pool, save_image, save_mask

    def make(root, kind: str = "plain", n: int = 8, size: int = 64, seed: int = 0) -> Path:
        root = Path(root)
        rng = np.random.default_rng(seed)
        pairs = [_seg_pair(rng, size) for _ in range(n)]
        ids = [f"s{i:04d}" for i in range(n)]
        if kind == "plain":
            for i, (image, mask) in zip(ids, pairs):
                save_image(root / "images" / f"{i}.png", image)
                save_mask(root / "masks" / f"{i}.png", mask)
        elif kind == "voc":
            voc = root / "VOCdevkit" / "VOC2012"
            for i, (image, mask) in zip(ids, pairs):
                (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(voc / "JPEGImages" / f"{i}.jpg", quality=95)
                save_mask(voc / "SegmentationClass" / f"{i}.png", mask)
            sets = voc / "ImageSets" / "Segmentation"
            sets.mkdir(parents=True)
            (sets / "train.txt").write_text("".join(f"{i}\n" for i in ids[: n // 2]))
            (sets / "val.txt").write_text("".join(f"{i}\n" for i in ids[n // 2 :]))
        elif kind == "pool":
            pool = Pool(root)
            rows = []
            for i, (image, mask) in zip(ids, pairs):
                cls = int(mask[(mask > 0) & (mask < 255)][0])
                score = (mask == cls).astype(np.float16)[::4, ::4][None]
                pool.write_sample(i, image, mask, class_ids=np.array([cls], np.uint8), scores=score)
                rows.append({"id": i, "round": 0, "classes": [cls], "prompt": "p", "class_prompt": "c", "seed": 0})
            pool.write_manifest_shard("000", rows)
        else:
            raise ValueError(kind)
        return root

    return make


def numpy_confusion(preds, truths):
    """The textbook (21, 21) confusion matrix by bincount: rows truth, columns prediction, 255 ignored."""
    import numpy as np

    cm = np.zeros((21, 21), dtype=np.int64)
    for pred, truth in zip(preds, truths):
        keep = truth != 255
        cm += np.bincount(21 * truth[keep].astype(np.int64) + pred[keep].astype(np.int64), minlength=21 * 21).reshape(21, 21)
    return cm


def numpy_iou(preds, truths):
    """IoU = TP / (TP + FP + FN) per class from numpy_confusion, NaN where there is no union."""
    import numpy as np

    cm = numpy_confusion(preds, truths)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def wandb_history_keys(run_file: str, expected: set[str] = frozenset(), timeout_s: float = 60.0) -> set[str]:
    """Keys of the history records in an offline run's .wandb file, once ``expected`` are among
    them (or the timeout has passed): wandb's service process writes the file after ``finish()``
    returns, so a test waits for what it reads."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (expected <= (keys := _history_keys(run_file))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return keys


def _history_keys(run_file: str) -> set[str]:
    """The keys written so far (the file is a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        return set()
    block, pos, parts, keys = 32768, 7, [], set()
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too little room for a record header: the block is padded
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment: a whole record
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


# ---------------------------------------------------------------- tiny chat language model (LLM prompt tests)

LLM_CLASSES = ("dog", "sofa")
"""The classes the tiny chat model learns to write captions of."""


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 chat model trained for a few seconds on template captions of dogs and
    sofas, saved as a transformers folder (so tests load it as a user's local model)."""
    from syntagen_st.testing.llm import build_tiny_llm, tiny_chat_corpus, train_tiny_llm

    chats = tiny_chat_corpus(list(LLM_CLASSES))
    model, tokenizer = build_tiny_llm(chats)
    train_tiny_llm(model, tokenizer, chats, steps=60)
    folder = tmp_path_factory.mktemp("tiny-llm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
