"""How long the report of a full-size run takes to write, and how big the page is.

    python scripts/bench_report.py                   # builds a synthetic 10,000-sample run in a temp folder
    python scripts/bench_report.py --work /tmp/big   # keeps (and reuses) the synthetic run there

Builds a run folder the way fit leaves it after 3 rounds of a 10,000-image budget (512 x 512
masks with one to three classes and an unsure band, refined labels that differ from them, 10%
of the judged samples dropped, a 9,000-pair export with its VOC tree, final metrics), then times
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
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from syntagen_st.core.classes import FOREGROUND_CLASSES, VOC_CLASSES  # noqa: E402
from syntagen_st.core.layout import RunLayout, final_step, round_step, round_tasks  # noqa: E402
from syntagen_st.core.seeds import parse_sample_id, sample_id  # noqa: E402
from syntagen_st.core.store import mask_to_png  # noqa: E402
from syntagen_st.reporting.page import write_report  # noqa: E402
from syntagen_st.selftrain.pool import round_budgets  # noqa: E402
from syntagen_st.selftrain.runner import RunState  # noqa: E402
from syntagen_st.submission.export import link_voc_tree  # noqa: E402

SIZE = 512
TOTAL = 10_000
ROUNDS = 3
FOLDS = 2


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
    layout = RunLayout(run)
    pool, entry = layout.pool, layout.export
    for folder in (pool.images, pool.masks, pool.manifest):
        folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for k in range(16):
        noise = rng.integers(0, 255, (SIZE // 16, SIZE // 16, 3), dtype=np.uint8)
        picture = Image.fromarray(noise).resize((SIZE, SIZE), Image.BICUBIC).filter(ImageFilter.GaussianBlur(4))
        # Beside the run folder, not in it: the run holds only what RunLayout describes.
        pictures.append((run.parent / f".pictures/{k}.png", run.parent / f".pictures/{k}.jpg"))
        pictures[-1][0].parent.mkdir(parents=True, exist_ok=True)
        picture.save(pictures[-1][0])
        picture.save(pictures[-1][1], quality=95)
    layout.config.write_text(
        "seed: 0\nname: bench-report\nmodel: {pretrained: stable-diffusion-v1-5/stable-diffusion-v1-5}\n"
        f"loop: {{rounds: {ROUNDS}, generate_total: {TOTAL}, source: sd, max_pairs: 10000}}\nrefine: {{folds: {FOLDS}}}\n")

    rows, ids, start = [], [], 0
    for r, count in enumerate(round_budgets(TOTAL, ROUNDS, "front")):
        for index in range(count):
            sid = sample_id(r, index)
            classes = sorted(rng.choice(np.arange(1, 21), int(rng.integers(1, 4)), replace=False).tolist())
            rows.append({"id": sid, "round": r, "index": index, "classes": [VOC_CLASSES[c] for c in classes],
                         "prompt": f"a photo of {' and '.join(VOC_CLASSES[c] for c in classes)}", "seed": index})
            ids.append((sid, classes))
        for s in range(start, len(rows), 8):
            shard = pool.manifest / f"{rows[s]['id']}.jsonl"
            shard.write_text("".join(json.dumps(row) + "\n" for row in rows[s: s + 8]))
        start = len(rows)

    last = ROUNDS - 1
    for n, (sid, classes) in enumerate(tqdm(ids, desc="synthetic masks")):
        _link(pictures[n % 16][0], pool.image_path(sid))
        mask = _mask(rng, classes)
        mask_to_png(mask).save(pool.mask_path(sid))
        layout.label(last, sid).parent.mkdir(parents=True, exist_ok=True)
        mask_to_png(_refined(rng, mask)).save(layout.label(last, sid))
        _link(pool.mask_path(sid), layout.prediction(last, sid))

    done, dropped = [], {}
    for r in range(ROUNDS):
        active = [sid for sid, _ in ids if parse_sample_id(sid)[0] <= r and sid not in dropped]
        judged = [sid for sid in active if parse_sample_id(sid)[0] == r]
        for sid in sorted(judged, key=lambda s: rng.random())[: len(judged) // 10]:
            dropped[sid] = r
        if r < last:
            for sid in active:
                _link(layout.label(last, sid), layout.label(r, sid))
        sample_rows = []
        for sid, _ in ids:
            if sid in dropped and dropped[sid] <= r:
                sample_rows.append({"id": sid, "kept": False, "reason": f"score in the worst 10% (round {dropped[sid]})",
                                    "judged": True, "mask": layout.label_name(dropped[sid], sid),
                                    "score": 0.1, "agreement": 0.1, "confidence": 0.3})
            elif sid in active:
                score = float(rng.random())
                sample_rows.append({"id": sid, "kept": True, "reason": None, "judged": True,
                                    "mask": layout.label_name(r, sid), "score": score,
                                    "agreement": score, "confidence": score})
        layout.round_dir(r).mkdir(parents=True, exist_ok=True)
        layout.samples(r).write_text("".join(json.dumps(row) + "\n" for row in sample_rows))
        weights = {c: float(w) for c, w in zip(FOREGROUND_CLASSES, rng.uniform(0.5, 2.0, 20))}
        _json(layout.weights(r), weights)
        _json(layout.stats(r), {
            "round": r, "samples": len(active), "dropped": len(judged) // 10, "drop_reasons": [],
            "pixels_relabelled": int(rng.integers(1e6, 1e8)), "reliable": list(VOC_CLASSES[: 1 + 5 * r]),
            "iou_model_vs_labels": {c: float(rng.uniform(0.2, 0.9)) for c in VOC_CLASSES},
            "weakness": {c: float(rng.uniform(0.1, 0.7)) for c in VOC_CLASSES}, "weights": weights})
        done += [(round_step(r, task), float(rng.uniform(60, 3600))) for task in round_tasks(FOLDS)]

    # The entry as export writes it (image/, mask/, train.txt, the VOC tree of links, submission.json,
    # README.md), its files linked to the last round's labels and to the pictures.
    exported = sorted(sid for sid, _ in ids if sid not in dropped)
    shutil.rmtree(entry.root, ignore_errors=True)
    for n, sid in enumerate(exported):
        _link(layout.label(last, sid), entry.mask(sid))
        _link(pictures[n % 16][1], entry.image(sid))
    entry.train_list.write_text("".join(f"{sid}\n" for sid in exported))
    link_voc_tree(entry.root, exported)
    entry.card.write_text("# bench-report\n\nThe export of a synthetic run (scripts/bench_report.py).\n")
    _json(entry.submission, {"pairs": len(exported), "seed": 0, "model_sha256": "0" * 64})
    done += [(final_step(ROUNDS, "export"), 300.0), (final_step(ROUNDS, "train"), 7200.0)]
    _json(layout.final.metrics, {"mIoU": 0.55, "val_images": 1449,
                                 "per_class_iou": {c: float(rng.uniform(0.3, 0.9)) for c in VOC_CLASSES}})
    layout.final.checksum.write_text(f"{'0' * 64}  {layout.final.weights.name}\n")
    # state.json last, as fit writes it: a run with its final training marked done is whole.
    layout.state.unlink(missing_ok=True)
    state = RunState(layout)
    for step, seconds in done:
        state.mark_done(step, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the synthetic run (built once, then reused)")
    ns = parser.parse_args()
    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="bench_report_"))
    run = work / "run"
    if final_step(ROUNDS, "train") not in RunState(RunLayout(run)).done():
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
