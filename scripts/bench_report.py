"""How long the report of a full-size run takes to write, and how big the page is.

    python scripts/bench_report.py                   # builds a synthetic 10,000-sample run in a temp folder
    python scripts/bench_report.py --work /tmp/big   # keeps (and reuses) the synthetic run there

Builds a run folder the way fit leaves it after 3 rounds of a 10,000-image budget (512 x 512
masks with one to three classes and an unsure band, refined labels that differ from them, 10%
of the judged samples dropped, a 9,000-pair VOC export, final metrics), then times
``write_report`` on it and prints one line against the targets (under a minute, under 15 MB).
The masks the report decodes for every sample (attention labels and exported labels) are all
distinct files; the pictures it opens for a few dozen thumbnails are hard links to 16 distinct
images, to keep the folder small. Not a test: the time depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from syntagen_st.core.classes import FOREGROUND_CLASSES, VOC_CLASSES  # noqa: E402
from syntagen_st.core.store import mask_to_png  # noqa: E402
from syntagen_st.reporting.page import write_report  # noqa: E402
from syntagen_st.selftrain.pool import round_budgets  # noqa: E402

SIZE = 512
TOTAL = 10_000
ROUNDS = 3


def _mask(rng: np.random.Generator, classes: list[int]) -> np.ndarray:
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    for c in classes:
        x, y = rng.integers(0, SIZE - 128, 2)
        w, h = rng.integers(96, 320, 2)
        draw.ellipse((x - 6, y - 6, x + w + 6, y + h + 6), fill=255)
        draw.ellipse((x, y, x + w, y + h), fill=c)
    return np.asarray(image)


def _refined(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    y, x = rng.integers(0, SIZE - 96, 2)
    out[y: y + int(rng.integers(8, 96)), x: x + int(rng.integers(8, 96))] = 255 if rng.random() < 0.5 else 0
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.link(src, dst)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def build(run: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pool, voc = run / "pool", run / "export" / "VOCdevkit" / "VOC2012"
    for sub in ("images", "masks", "manifest"):
        (pool / sub).mkdir(parents=True, exist_ok=True)
    pictures = []
    for k in range(16):
        noise = rng.integers(0, 255, (SIZE // 16, SIZE // 16, 3), dtype=np.uint8)
        picture = Image.fromarray(noise).resize((SIZE, SIZE), Image.BICUBIC).filter(ImageFilter.GaussianBlur(4))
        pictures.append((run / f".pictures/{k}.png", run / f".pictures/{k}.jpg"))
        pictures[-1][0].parent.mkdir(parents=True, exist_ok=True)
        picture.save(pictures[-1][0])
        picture.save(pictures[-1][1], quality=95)
    (run / "config.yaml").write_text(
        "seed: 0\nname: bench-report\nmodel: {pretrained: stable-diffusion-v1-5/stable-diffusion-v1-5}\n"
        f"loop: {{rounds: {ROUNDS}, generate_total: {TOTAL}, source: sd, max_pairs: 10000}}\nrefine: {{folds: 2}}\n")

    rows, ids, start = [], [], 0
    for r, count in enumerate(round_budgets(TOTAL, ROUNDS, "front")):
        for index in range(count):
            sid = f"r{r:02d}_{index:06d}"
            classes = sorted(rng.choice(np.arange(1, 21), int(rng.integers(1, 4)), replace=False).tolist())
            rows.append({"id": sid, "round": r, "index": index, "classes": [VOC_CLASSES[c] for c in classes],
                         "prompt": f"a photo of {' and '.join(VOC_CLASSES[c] for c in classes)}", "seed": index})
            ids.append((sid, classes))
        for s in range(start, len(rows), 8):
            shard = pool / "manifest" / f"{rows[s]['id']}.jsonl"
            shard.write_text("".join(json.dumps(row) + "\n" for row in rows[s: s + 8]))
        start = len(rows)

    latest = run / "rounds" / str(ROUNDS - 1)
    for n, (sid, classes) in enumerate(tqdm(ids, desc="synthetic masks")):
        _link(pictures[n % 16][0], pool / "images" / f"{sid}.png")
        mask = _mask(rng, classes)
        mask_to_png(mask).save(pool / "masks" / f"{sid}.png")
        (latest / "labels").mkdir(parents=True, exist_ok=True)
        mask_to_png(_refined(rng, mask)).save(latest / "labels" / f"{sid}.png")
        _link(pool / "masks" / f"{sid}.png", latest / "pred" / f"{sid}.png")

    done, seconds, dropped = [], {}, {}
    for r in range(ROUNDS):
        active = [sid for sid, _ in ids if int(sid[1:3]) <= r and sid not in dropped]
        judged = [sid for sid in active if int(sid[1:3]) == r]
        for sid in sorted(judged, key=lambda s: rng.random())[: len(judged) // 10]:
            dropped[sid] = r
        rdir = run / "rounds" / str(r)
        if r < ROUNDS - 1:
            for sid in active:
                _link(latest / "labels" / f"{sid}.png", rdir / "labels" / f"{sid}.png")
        sample_rows = []
        for sid, _ in ids:
            if sid in dropped and dropped[sid] <= r:
                sample_rows.append({"id": sid, "kept": False, "reason": f"score in the worst 10% (round {dropped[sid]})",
                                    "judged": True, "mask": f"rounds/{dropped[sid]}/labels/{sid}.png",
                                    "score": 0.1, "agreement": 0.1, "confidence": 0.3})
            elif sid in active:
                score = float(rng.random())
                sample_rows.append({"id": sid, "kept": True, "reason": None, "judged": True,
                                    "mask": f"rounds/{r}/labels/{sid}.png", "score": score,
                                    "agreement": score, "confidence": score})
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sample_rows))
        weights = {c: float(w) for c, w in zip(FOREGROUND_CLASSES, rng.uniform(0.5, 2.0, 20))}
        _json(rdir / "weights.json", weights)
        _json(rdir / "stats.json", {
            "round": r, "samples": len(active), "dropped": len(judged) // 10, "drop_reasons": [],
            "pixels_relabelled": int(rng.integers(1e6, 1e8)), "reliable": list(VOC_CLASSES[: 1 + 5 * r]),
            "iou_model_vs_labels": {c: float(rng.uniform(0.2, 0.9)) for c in VOC_CLASSES},
            "weakness": {c: float(rng.uniform(0.1, 0.7)) for c in VOC_CLASSES}, "weights": weights})
        for step in ("data", "fold0", "fold1", "refine"):
            done.append(f"round{r}/{step}")
            seconds[f"round{r}/{step}"] = float(rng.uniform(60, 3600))

    exported = sorted(sid for sid, _ in ids if sid not in dropped)
    for n, sid in enumerate(exported):
        _link(latest / "labels" / f"{sid}.png", voc / "SegmentationClass" / f"{sid}.png")
        _link(pictures[n % 16][1], voc / "JPEGImages" / f"{sid}.jpg")
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(f"{sid}\n" for sid in exported))
    _json(run / "export" / "manifest.json", {"pairs": len(exported), "seed": 0, "model_sha256": "0" * 64})
    done += [f"final{ROUNDS}/export", f"final{ROUNDS}/train"]
    seconds |= {f"final{ROUNDS}/export": 300.0, f"final{ROUNDS}/train": 7200.0}
    _json(run / "final" / "metrics.json", {"mIoU": 0.55, "val_images": 1449,
                                           "per_class_iou": {c: float(rng.uniform(0.3, 0.9)) for c in VOC_CLASSES}})
    (run / "final" / "checksum.txt").write_text("0" * 64 + "  model.safetensors\n")
    _json(run / "state.json", {"done": done, "seconds": seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the synthetic run (built once, then reused)")
    ns = parser.parse_args()
    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="bench_report_"))
    run = work / "run"
    if not (run / "state.json").exists():
        build(run)
    start, cpu = time.perf_counter(), _cpu_seconds()
    page = write_report(run, progress=True)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    size = page.stat().st_size / 1e6
    # CPU seconds (this process and its workers) beside the wall time: on a shared machine the
    # wall time mostly measures the neighbours.
    print(f"report of a {TOTAL:,}-sample run: {seconds:.1f} s ({seconds / 60:.2f} of the 1 minute target; "
          f"{cpu:.1f} CPU s on {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), "
          f"{size:.1f} MB ({size / 15:.2f} of the 15 MB target): {page}")


def _cpu_seconds() -> float:
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


if __name__ == "__main__":
    main()
