"""Does the self-training loop make the data better? Label quality and a downstream model, on shapes.

    python scripts/bench_refine.py                      # every noise level (~12 CPU minutes each)
    python scripts/bench_refine.py --noise harsh --look 1   # one level, another look of the shapes
    python scripts/bench_refine.py --quick              # a ~2 minute sanity run; its figures mean nothing
    python scripts/bench_refine.py --work DIR -- --refine.min_reliability 0.4   # extra flags go to fit
    python scripts/bench_refine.py --work DIR --refine-again   # redo refinement with the current code
    python scripts/bench_refine.py --work DIR --refine-again --no-arms -- --refine.relabel_kernel 0.125
    python scripts/bench_refine.py --work DIR --refine-again --arms image,refined --arm-seeds 5 --arm-seed-start 5

Builds a noisy-shapes training set with known truth (scripts/noisy_shapes.py, ``--scene rich`` by
default: textured backgrounds, decoys, thin parts, holes, blobby 1/8-resolution labels that bleed
across edges, missing objects, swapped classes, failed images) and a clean held-out set (its truth
as labels), runs ``python -m syntagen_st.fit --source folder:TRAIN`` on the training set twice on
the same fold models (the second a ``--refine-again``), once relabelling as before the image was
used (``--refine.relabel_image false``) and once with it, and prints per noise level (clean,
moderate, harsh; ``--noise`` picks some):
1. label mIoU against the truth (255 counted as a miss), overall and per class, for: the labels as
   given; refined by the image alone (the folder import's ``label.refine_image``); relabelled as
   before (no image in the relabel); relabelled with the image; and, over the exported (kept)
   samples, after the filter; with coverage and the ignore-255 mIoU beside them, the thin classes
   (bicycle, chair) apart, and how good each round's held-out fold models are against the truth;
2. the clean held-out mIoU of models trained with the same arch, steps and seed (``--arms``): on
   the unrefined labels of every sample (``unrefined``), on the import's refinement by the image
   alone of every sample (``image``, the run's pool), and on the refined labels of the kept samples
   (``refined``, the export), for each of ``--arm-seeds`` seeds (3) from ``--arm-seed-start``,
   averaged, with each arm's gain over ``unrefined`` and its standard error: one seed's gap is
   noise (the same labels gave 0.46-0.53, and a gain of +4.5 had a standard deviation of 2.3).
The loop's own final training is cut to one step: the arms are trained here, on the same PNGs.
A markdown table of every level ends the output.

``--refine-again`` keeps a work folder's data and round-0 fold models and reruns the loop from
round 0's refinement on: a change to refinement code, or to ``--refine.*`` flags (written into the
run's saved config), is measured without training the folds again.

Torch runs with --threads (default 1): on a shared 2-core machine, two OpenMP threads made each
training step 10-25x slower than one as soon as another process wanted a core.
Not a test: the figures depend on the seed and the budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from noisy_shapes import (  # noqa: E402
    NOISE_LEVELS,
    SCENES,
    THIN_SHAPES,
    label_quality,
    make_dataset,
    make_look,
    scene_noise,
    write_dataset,
)

from syntagen_st.core.classes import VOC_CLASSES, class_index  # noqa: E402
from syntagen_st.core.cli import load_config_file, load_run_config  # noqa: E402
from syntagen_st.core.layout import RunLayout, Step  # noqa: E402
from syntagen_st.core.store import atomic_write_json, atomic_write_text, load_mask, read_jsonl  # noqa: E402
from syntagen_st.segmentation.data import Sample, find_samples  # noqa: E402
from syntagen_st.segmentation.evaluate import evaluate  # noqa: E402
from syntagen_st.segmentation.network import load_model, predict_proba  # noqa: E402
from syntagen_st.segmentation.trainer import train  # noqa: E402
from syntagen_st.selftrain import refine as rf  # noqa: E402
from syntagen_st.selftrain.pool import assign_folds  # noqa: E402
from syntagen_st.selftrain.runner import RunState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Budget:
    train_images: int
    held_images: int
    rounds: int
    round_steps: int
    arm_steps: int
    arm_seeds: int


FULL = Budget(train_images=600, held_images=200, rounds=1, round_steps=600, arm_steps=1000, arm_seeds=3)
QUICK = Budget(train_images=96, held_images=32, rounds=1, round_steps=60, arm_steps=60, arm_seeds=1)


def fit_command(train_dir: Path, run: Path, budget: Budget, size: int, seed: int, extra: list[str]) -> list[str]:
    """The loop on the folder: LR-ASPP from scratch, settings at which it beats the noise."""
    return [
        sys.executable, "-m", "syntagen_st.fit", "--config", str(REPO / "configs" / "smoke.yaml"),
        "--source", f"folder:{train_dir}", "--rounds", str(budget.rounds), "--out", str(run), "--no-progress",
        "--seed", str(seed), "--name", "bench_refine",
        "--train.arch", "lraspp_mobilenet_v3_large", "--train.backbone_weights", "none",
        "--train.crop_size", str(size), "--train.batch_size", "16", "--train.lr", "0.02",
        "--train.logger", "none", "--train.max_steps", "1",
        "--loop.round_steps", str(budget.round_steps), "--refine.folds", "2", "--refine.min_class_pixels", "1000",
        *extra,
    ]


def run_fit(command: list[str], log_file: Path, threads: int) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log_file.open("w") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"fit failed (exit {done.returncode}); the end of {log_file}:\n{tail}")


def source_index(row: dict) -> int:
    """The training-set index of a pool sample (its original file is <index>.png)."""
    return int(Path(row["source"]).stem)


def quality_line(name: str, before: dict[str, float], after: dict[str, float]) -> str:
    return (
        f"{name} (255=miss): {before['miou']:.3f} -> {after['miou']:.3f} "
        f"(coverage {before['coverage']:.3f} -> {after['coverage']:.3f}; "
        f"255 ignored {before['miou_ignore255']:.3f} -> {after['miou_ignore255']:.3f})"
    )


STAGES = ("given", "image", "relabelled", "guided", "kept_given", "filtered")
"""The label columns: as given, refined by the image alone, relabelled without / with the image
(every sample's latest label), and over the exported samples: as given, and after the filter."""


def latest_labels(run: Path, data: dict) -> tuple[list[int], list[np.ndarray]]:
    """Every sample's training-set index and its latest label (a row's mask is its label's path
    relative to the run folder, RunLayout.label_name)."""
    layout = RunLayout(run)
    index = {row["id"]: source_index(row) for row in layout.pool.rows()}
    latest = read_jsonl(layout.latest_samples())
    return [index[r["id"]] for r in latest], [load_mask(layout.root / r["mask"]) for r in latest]


def label_report(run: Path, data: dict, plain: list[np.ndarray]) -> dict:
    """Label quality of every column (``STAGES``), overall and per class; ``plain`` are the
    latest labels of the run relabelled without the image (same samples, same order)."""
    layout = RunLayout(run)
    rows = {row["id"]: row for row in layout.pool.rows()}
    index = {sid: source_index(row) for sid, row in rows.items()}
    every, guided = latest_labels(run, data)
    exported = layout.export.train_list.read_text().split()
    kept = [index[sid] for sid in exported]
    gt, noisy = data["gt"], data["masks"]
    q = {
        "given": label_quality(noisy[every], gt[every]),
        "image": label_quality([load_mask(layout.pool.mask_path(sid)) for sid in (r["id"] for r in read_jsonl(
            layout.latest_samples()))], gt[every]),
        "relabelled": label_quality(plain, gt[every]),
        "guided": label_quality(guided, gt[every]),
        "kept_given": label_quality(noisy[kept], gt[kept]),
        "filtered": label_quality([load_mask(layout.export.mask(sid)) for sid in exported], gt[kept]),
    }
    given = q["given"]
    print(quality_line(f"label mIoU, all {len(every)} samples, refined by the image alone", given, q["image"]))
    print(quality_line("  relabelled as before (no image in the relabel)", given, q["relabelled"]))
    print(quality_line("  relabelled with the image", given, q["guided"]))
    print(quality_line(f"label mIoU, exported {len(kept)}, same samples as given", q["kept_given"], q["filtered"]))
    # What needs no model: pixels of classes the sample did not name become 255 (every gate shut).
    shut = np.zeros(len(VOC_CLASSES), dtype=bool)
    uniform = np.full((len(VOC_CLASSES), *gt[0].shape), 1 / len(VOC_CLASSES), np.float32)
    restricted = [rf.relabel(noisy[i], rf.restricted(uniform, data["classes"][i]), shut, 1.0, 0.0) for i in every]
    no_model = label_quality(restricted, gt[every])
    print(quality_line("  the named-class restriction alone (every gate shut)", given, no_model))

    dropped = [index[r["id"]] for r in read_jsonl(layout.latest_samples()) if not r["kept"]]
    failed = int(data["failed"].sum())
    print(f"dropped {len(dropped)} samples, {int(data['failed'][dropped].sum())} of the {failed} failed images among them")
    stats = [layout.stats(r) for r in layout.rounds_on_disk()]
    reliable = set().union(*(json.loads(p.read_text())["reliable"] for p in stats if p.is_file()))
    print("  class          given   image  relabelled  +image  kept given  filtered  gate")
    for c in np.flatnonzero(~np.isnan(given["per_class"])):
        cells = " ".join(f"{q[k]['per_class'][c]:>{w}.3f}" for k, w in zip(STAGES, (6, 7, 11, 7, 11, 9)))
        print(f"  {VOC_CLASSES[c]:<12} {cells}  {'open' if VOC_CLASSES[c] in reliable else 'shut'}"
              f"{'  (thin)' if c in THIN_SHAPES else ''}")
    present = ~np.isnan(given["per_class"])
    thin = [c for c in THIN_SHAPES if present[c]]
    return {
        **{k: v["miou"] for k, v in q.items()}, "restricted": no_model["miou"],
        "worst_image": float(np.nanmin(q["image"]["per_class"][present] - given["per_class"][present])),
        "worst_guided": float(np.nanmin(q["guided"]["per_class"][present] - given["per_class"][present])),
        "thin": {VOC_CLASSES[c]: (given["per_class"][c], q["image"]["per_class"][c], q["relabelled"]["per_class"][c],
                                  q["guided"]["per_class"][c]) for c in thin},
        "gate": sorted(reliable, key=VOC_CLASSES.index),
    }


def round_report(run: Path, data: dict) -> None:
    """Each round's fold models on the samples they did not train on, against the truth."""
    layout = RunLayout(run)
    cfg = load_run_config(layout.config)
    pool = layout.pool
    rows = {row["id"]: row for row in pool.rows()}
    for r in range(cfg.loop.rounds):
        # The round's active samples are those it wrote a label for; folds are dealt over them.
        ids = [row["id"] for row in read_jsonl(layout.samples(r)) if row["mask"] == layout.label_name(r, row["id"])]
        fold = assign_folds(ids, cfg.refine.folds, cfg.seed)
        models = [load_model(layout.fold(r, k).weights) for k in range(cfg.refine.folds)]
        free, named = [], []
        for sid in ids:
            probs = next(predict_proba(models[fold[sid]], [pool.image_path(sid)]))
            free.append(probs.argmax(0).astype(np.uint8))
            named.append(rf.restricted(probs, [class_index(c) for c in rows[sid]["classes"]]).pred)
        index = [source_index(rows[sid]) for sid in ids]
        gt = data["gt"][index]
        stats = json.loads(layout.stats(r).read_text())
        print(
            f"round {r} fold models ({cfg.loop.round_steps} steps on ~{len(ids) * (cfg.refine.folds - 1) // cfg.refine.folds}"
            f" samples), held-out vs truth: mIoU {label_quality(free, gt)['miou']:.3f}, "
            f"{label_quality(named, gt)['miou']:.3f} restricted to named classes; "
            f"unrefined labels {label_quality(data['masks'][index], gt)['miou']:.3f}; "
            f"reliable: {', '.join(stats['reliable']) or 'none'}; "
            f"model-vs-label IoU {fmt_named(stats['iou_model_vs_labels'])}; "
            f"{stats['pixels_relabelled']} pixels changed, {stats['dropped']} dropped",
            flush=True,
        )


def fmt_named(values: dict[str, float | None]) -> str:
    return " ".join(f"{name} {v:.2f}" for name, v in values.items() if v is not None)


ARMS = ("unrefined", "image", "refined")
"""The comparison models' labels: as given (every sample), the import's refinement by the image alone
(every sample: the run's pool), and the loop's export (the kept samples, refined)."""


def arm_samples(name: str, run: Path, train_dir: Path) -> list[Sample]:
    return find_samples({"unrefined": train_dir, "image": run / "pool", "refined": run}[name])


def arms_report(run: Path, train_dir: Path, held_dir: Path, steps: int, seeds: list[int], names: list[str]) -> dict:
    """One model per arm and seed, same arch / steps, scored on the clean held-out images. One
    seed is not enough: at 1,000 steps from scratch the same labels gave 0.46-0.53 over seeds."""
    cfg = replace(load_run_config(RunLayout(run).config).train, max_steps=steps, checkpoint_every=steps,
                  logger="none")
    arms = {name: arm_samples(name, run, train_dir) for name in names}
    held = find_samples(held_dir)
    scores: dict[str, list[float]] = {name: [] for name in arms}
    for seed in seeds:
        for name, samples in arms.items():
            out = run.parent / f"arm_{name}_seed{seed}"
            if name == "refined":
                # A --refine-again rewrites the export: a model trained on the earlier one would resume as done.
                shutil.rmtree(out, ignore_errors=True)
            weights = train(cfg, samples, out, seed=seed, run_name=f"bench-{name}", progress=False)
            scores[name].append(evaluate(load_model(weights), held, "cpu")["mIoU"])
            print(f"  {name}, seed {seed}: {len(samples)} samples, {steps} steps -> held-out mIoU {scores[name][-1]:.3f}",
                  flush=True)
    span = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of {len(seeds)} seeds, {seeds[0]}-{seeds[-1]}"
    print(f"held-out model mIoU ({len(held)} clean images, {span}): "
          + ", ".join(f"{name} {np.mean(v):.3f}" for name, v in scores.items()))
    figures: dict = {"arms": {name: float(np.mean(v)) for name, v in scores.items()}, "arm_gains": {}}
    for name in (n for n in arms if n != "unrefined" and "unrefined" in arms):
        gains = np.subtract(scores[name], scores["unrefined"])
        se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("nan")
        figures["arm_gains"][name] = {"mean": float(gains.mean()), "se": se, "per_seed": [float(g) for g in gains]}
        print(f"  {name} over unrefined:{gain_text(figures['arm_gains'][name])}, per seed "
              + " ".join(f"{g:+.3f}" for g in gains))
    return figures


def round0_training(name: str) -> bool:
    """Whether a step is round 0's data or one of its fold models."""
    step = Step.parse(name)
    return (step.stage, step.number) == ("round", 0) and (step.task == "data" or step.fold is not None)


def refine_flags(flags: list[str]) -> dict[str, object]:
    """The ``--refine.KEY VALUE`` (or ``=VALUE``) flags among fit flags, values read as YAML."""
    out, i = {}, 0
    while i < len(flags):
        flag = flags[i]
        if flag.startswith("--refine."):
            key, _, value = flag[len("--refine."):].partition("=")
            if not _:
                i += 1
                value = flags[i]
            out[key] = yaml.safe_load(value)
        i += 1
    return out


def refine_again(run: Path, command: list[str]) -> None:
    """Forget everything after round 0's fold models, so the loop redoes refinement on, under the
    refine section ``command`` (a fit command) resolves to: the smoke config's and its
    ``--refine.*`` flags, written into the run's saved config (only refinement reads them, and
    the fold models it keeps do not depend on them)."""
    layout = RunLayout(run)
    state = RunState(layout)
    atomic_write_json(state.path, {"done": [step for step in state.done() if round0_training(step)]})
    cfg = load_run_config(layout.config)  # as it was run: a default changed since must not rewrite it
    cfg.refine = replace(load_config_file(str(REPO / "configs" / "smoke.yaml")).refine, **refine_flags(command))
    atomic_write_text(layout.config, cfg.to_yaml())


def bench(work: Path, level: str, look: int, scene: str, budget: Budget, size: int, seed: int, threads: int,
          extra: list[str], again: bool, arms: list[str], arm_seed_start: int) -> dict:
    noise = scene_noise(level, scene)
    data = make_dataset(budget.train_images, size, seed, noise, make_look(look), SCENES[scene])
    print(f"\n=== noise {level}, look {look}, scene {scene}: {noise}", flush=True)
    print(f"budget: {budget}, {size} px, seed {seed}, extra fit flags: {' '.join(extra) or 'none'}")
    run = work / "run"
    # Two passes on the same fold models: relabelled without the image, then with it.
    passes = (["--refine.relabel_image", "false"], ["--refine.relabel_image", "true"])
    plain: list[np.ndarray] = []
    for n, variant in enumerate(passes):
        command = fit_command(work / "train", run, budget, size, seed, [*extra, *variant])
        if n or (again and RunLayout(run).state.exists()):
            refine_again(run, command)
        else:
            held = make_dataset(budget.held_images, size, seed + 1, noise, make_look(look), SCENES[scene])
            write_dataset(work / "train", data)
            write_dataset(work / "held", held | {"masks": held["gt"]})
        print("$ " + " ".join(command), flush=True)
        start = time.time()
        run_fit(command, work / "fit.log", threads)
        print(f"loop: {time.time() - start:.0f} s wall", flush=True)
        if not n:
            round_report(run, data)
            plain = latest_labels(run, data)[1]
    figures = label_report(run, data, plain)
    if arms:
        figures |= arms_report(run, work / "train", work / "held", budget.arm_steps,
                               list(range(arm_seed_start, arm_seed_start + budget.arm_seeds)), arms)
    return figures


def gain_text(gain: dict) -> str:
    """An arm's mean gain with its standard error (none from one seed)."""
    se = "" if np.isnan(gain["se"]) else f" ± {gain['se']:.3f}"
    return f" ({gain['mean']:+.3f}{se})"


def summary(results: dict[str, dict]) -> str:
    lines = [
        "| noise | as given | image alone | relabelled as before | relabelled + image | kept: as given -> filtered "
        "| worst class: image / relabel + image | thin: given -> image -> relabelled -> + image | gate open "
        "| models (mean over the seeds; gain over unrefined, standard error) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level, f in results.items():
        model = "; ".join(
            f"{name} {v:.3f}" + (gain_text(d) if (d := f["arm_gains"].get(name)) else "")
            for name, v in f["arms"].items()) if "arms" in f else "-"
        thin = "; ".join(f"{name} " + " -> ".join(f"{v:.3f}" for v in vals) for name, vals in f["thin"].items()) or "-"
        g = f["given"]
        lines.append(
            f"| {level} | {g:.3f} | {f['image']:.3f} ({f['image'] - g:+.3f}) | {f['relabelled']:.3f} ({f['relabelled'] - g:+.3f}) "
            f"| {f['guided']:.3f} ({f['guided'] - g:+.3f}) | {f['kept_given']:.3f} -> {f['filtered']:.3f} "
            f"| {f['worst_image']:+.3f} / {f['worst_guided']:+.3f} | {thin} "
            f"| {', '.join(f['gate']) or 'none'} | {model} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- fit flags]")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration for a sanity run (~2 minutes)")
    parser.add_argument("--work", default=None, help="folder for the data and the run (default: a temporary one)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=None, help="training images (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="loop rounds (default 1)")
    parser.add_argument("--round-steps", type=int, default=None, help="steps of each round's fold models (default 600)")
    parser.add_argument("--arm-steps", type=int, default=None, help="steps of each held-out comparison model (default 1000)")
    parser.add_argument("--arm-seeds", type=int, default=None, help="seeds of each comparison model, averaged (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in fit")
    parser.add_argument("--noise", default=",".join(NOISE_LEVELS), help="comma-separated levels (default: all)")
    parser.add_argument("--look", type=int, default=0, help="shapes and colours: 0 fixed, N drawn from N")
    parser.add_argument("--scene", choices=list(SCENES), default="rich", help="plain: the shapes of earlier versions")
    parser.add_argument("--refine-again", action="store_true", help="reuse --work's data and round-0 folds")
    parser.add_argument("--no-arms", action="store_true", help="skip the held-out comparison models")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comparison models, from {', '.join(ARMS)} (default: all)")
    parser.add_argument("--arm-seed-start", type=int, default=None, help="the comparison models' first seed (default --seed)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    levels = args.noise.split(",")
    unknown = [lv for lv in levels if lv not in NOISE_LEVELS]
    if unknown:
        parser.error(f"unknown noise level {unknown[0]!r}; choose from {', '.join(NOISE_LEVELS)}")
    if args.arm_seeds is not None and args.arm_seeds < 1:
        parser.error("--arm-seeds must be >= 1 (--no-arms skips the comparison models)")
    arms = args.arms.split(",")
    if not arms or not set(arms) <= set(ARMS) or len(set(arms)) < len(arms):
        parser.error(f"--arms: distinct names from {', '.join(ARMS)}")
    if args.refine_again and not args.work:
        parser.error("--refine-again needs --work")
    base = QUICK if args.quick else FULL
    budget = replace(
        base, train_images=args.images or base.train_images, rounds=args.rounds or base.rounds, round_steps=args.round_steps or base.round_steps,
        arm_steps=args.arm_steps or base.arm_steps, arm_seeds=base.arm_seeds if args.arm_seeds is None else args.arm_seeds,
    )
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(random weights|LeafSpec)")
    start = time.time()

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_refine_") as tmp:
        root = Path(args.work or tmp)
        for level in levels:
            results[level] = bench(root / level, level, args.look, args.scene, budget, args.size, args.seed,
                                   args.threads, extra, args.refine_again, [] if args.no_arms else arms,
                                   args.seed if args.arm_seed_start is None else args.arm_seed_start)
    print("\n" + summary(results))
    usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    print(f"time: {time.time() - start:.0f} s wall, {cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
