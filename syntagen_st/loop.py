"""The self-training rounds as a resumable state machine.

A round: generate its share of the budget (or import a folder in round 0), train K fold models
on the current labels, predict every active sample with the fold model that did not train on
it, then relabel, score, filter and steer. After the last round: select the best <= max_pairs,
export them, train the fixed protocol on exactly the exported files, evaluate, checksum.

``state.json`` lists the steps that are done; each step writes its files atomically before it
is marked done, and an unfinished step is redone from its start, so a run killed at any point
resumes to the same result.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import refine as rf
from .classes import VOC_CLASSES, canonical, class_index
from .config import Config
from .data import Sample, find_samples, latest_refined
from .errors import UserError
from .export import export_voc
from .labels import confidence_map
from .report import RoundLogger
from .store import Pool, atomic_write_json, load_mask, read_jsonl, save_image, save_mask, sha256_file, write_jsonl

log = logging.getLogger(__name__)


def round_budgets(total: int, rounds: int, split: str) -> list[int]:
    """How many images each round generates; the counts add up to ``total``."""
    if split == "front" and rounds > 1:
        first = math.ceil(total / 2)
        return [first, *round_budgets(total - first, rounds - 1, "equal")]
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def fold_of(sample_id: str, folds: int, seed: int) -> int:
    """A sample's cross-fitting fold, fixed by its id and the run seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:fold:{sample_id}".encode()).digest()[:8], "little") % folds


def derived_seed(seed: int, tag: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:4], "little")


@dataclass
class Active:
    """A sample taking part in a round: its current label and the classes its prompt named."""

    sample: Sample
    classes: tuple[str, ...]
    round: int

    @property
    def id(self) -> str:
        return self.sample.image.stem


class Run:
    """Paths and state of a run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.pool = Pool(self.root / "pool")
        self.state_file = self.root / "state.json"

    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / str(r)

    def done_steps(self) -> list[str]:
        if not self.state_file.exists():
            return []
        return json.loads(self.state_file.read_text())["done"]

    def mark_done(self, step: str) -> None:
        atomic_write_json(self.state_file, {"done": [*self.done_steps(), step]})


class Loop:
    def __init__(self, cfg: Config, run: Run, voc_root: str | None = None, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.voc_root, self.progress = cfg, run, voc_root, progress
        self.reporter = RoundLogger(cfg, run.root)

    # ------------------------------------------------------------------ driver

    def run(self) -> None:
        loop = self.cfg.loop
        budgets = round_budgets(loop.generate_total, loop.rounds, loop.budget_split)
        for r in range(loop.rounds):
            self._step(f"round{r}/data", lambda r=r: self.add_data(r, budgets))
            for k in range(self.cfg.refine.folds):
                self._step(f"round{r}/fold{k}", lambda r=r, k=k: self.train_fold(r, k), restart=self.run_dir.round_dir(r) / f"fold{k}")
            self._step(f"round{r}/refine", lambda r=r: self.refine_round(r))
        self._step("final/export", self.export_final)
        self._step("final/train", self.train_final)
        if self.voc_root:
            self._step("final/evaluate", self.evaluate_final)
        self.reporter.finish()

    def _step(self, name: str, fn, restart: Path | None = None) -> None:
        if name in self.run_dir.done_steps():
            return
        if restart is not None and restart.exists():
            # A short round model killed mid-way is retrained from scratch, so the result is
            # the same as an uninterrupted run's (a Lightning resume would reshuffle the data).
            shutil.rmtree(restart)
        log.info("step %s", name)
        fn()
        self.run_dir.mark_done(name)

    # ------------------------------------------------------------------ round steps

    def add_data(self, r: int, budgets: list[int]) -> None:
        source = self.cfg.loop.source
        if source.startswith("folder:"):
            if r == 0:
                import_folder(source[len("folder:"):], self.run_dir.pool)
            return
        from .generate import SampleGenerator, round_records

        weights = self.weights_for(r)
        records = round_records(self.cfg, r, budgets[r], weights)
        SampleGenerator(self.cfg).fill(self.run_dir.pool, records, self.progress)

    def weights_for(self, r: int) -> dict[str, float] | None:
        if r == 0:
            return None
        return json.loads((self.run_dir.round_dir(r - 1) / "weights.json").read_text())

    def active(self) -> list[Active]:
        """Kept samples with their current (latest refined) labels, in id order."""
        rows = {row["id"]: row for row in self.run_dir.pool.rows()}
        out = []
        for sample in find_samples(self.run_dir.root):
            row = rows[sample.image.stem]
            out.append(Active(sample, tuple(row["classes"]), int(row["round"])))
        return out

    def train_fold(self, r: int, k: int) -> None:
        from .train import train

        folds = self.cfg.refine.folds
        samples = [a.sample for a in self.active() if fold_of(a.id, folds, self.cfg.seed) != k]
        if not samples:
            raise UserError(f"round {r}: fold {k} has no training samples; add data or lower refine.folds")
        cfg = copy.deepcopy(self.cfg.train)
        cfg.max_steps = self.cfg.loop.round_steps
        cfg.checkpoint_every = cfg.max_steps
        train(cfg, samples, self.run_dir.round_dir(r) / f"fold{k}", seed=derived_seed(self.cfg.seed, f"r{r}k{k}"),
              run_name=f"{self.cfg.name}-r{r}-fold{k}")

    def refine_round(self, r: int) -> None:
        from .segmodel import load_model, predict_proba

        cfg = self.cfg.refine
        rdir = self.run_dir.round_dir(r)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        models = [load_model(rdir / f"fold{k}" / "model.safetensors", device) for k in range(cfg.folds)]
        active = self.active()

        def held_out(a: Active) -> np.ndarray:
            model = models[fold_of(a.id, cfg.folds, self.cfg.seed)]
            return next(predict_proba(model, [a.sample.image]))

        def allowed(a: Active) -> list[int]:
            return [class_index(c) for c in a.classes]

        # Pass 1: held-out agreement per class decides which classes the model may relabel.
        confusion = np.zeros((len(VOC_CLASSES), len(VOC_CLASSES)), np.int64)
        for a in active:
            pred, _ = rf.predict(rf.restrict(held_out(a), allowed(a)))
            confusion += rf.confusion_matrix(pred, load_mask(a.sample.mask))
        reliable = rf.reliable_classes(confusion, cfg.min_reliability, cfg.min_class_pixels)

        # Pass 2: relabel, score, and gather the class statistics.
        totals = rf.ClassTotals()
        scores: dict[str, rf.SampleScore] = {}
        relabelled = 0
        examples = []
        for a in active:
            probs = held_out(a)
            label = load_mask(a.sample.mask)
            confidence = _attention_confidence(a.sample, label.shape)
            refined = rf.relabel(label, probs, allowed(a), reliable, cfg.relabel_confidence, cfg.keep_confidence,
                                 confidence, cfg.label_sure)
            pred, top = rf.predict(rf.restrict(probs, allowed(a)))
            scores[a.id] = rf.sample_score(label, pred, top, allowed(a), cfg.confidence_weight)
            totals = totals + rf.class_totals(label, refined, pred, top)
            relabelled += int((refined != label).sum())
            save_mask(rdir / "labels" / f"{a.id}.png", refined)
            if len(examples) < 8:
                examples.append((a.sample.image, label, refined, pred))

        # Each sample faces the filter once, in the round it joined; a model reliable for no
        # foreground class cannot judge samples, so then nothing is dropped.
        candidates = {a.id: scores[a.id] for a in active if a.round == r} if reliable[1:].any() else {}
        drops = rf.select_drops(candidates, cfg.drop_fraction)
        rows = self._sample_rows(r, active, scores, drops)
        weakness = rf.class_weakness(totals.iou(), totals.mean_confidence(), totals.kept_share())
        weights = rf.prompt_weights(weakness, cfg.weakness_power, cfg.min_weight)
        stats = {
            "round": r,
            "samples": len(active),
            "dropped": len(drops),
            "drop_reasons": sorted(set(drops.values())),
            "pixels_relabelled": relabelled,
            "iou_model_vs_labels": _named(totals.iou()),
            "reliable": [VOC_CLASSES[c] for c in np.flatnonzero(reliable)],
            "weakness": _named(weakness),
            "weights": weights,
        }
        atomic_write_json(rdir / "stats.json", stats)
        atomic_write_json(rdir / "weights.json", weights)
        # samples.jsonl makes the round's labels current: it is written last.
        write_jsonl(rdir / "samples.jsonl", rows)
        self.reporter.log_round(r, stats, examples)

    def _sample_rows(self, r: int, active: list[Active], scores: dict, drops: dict[str, str]) -> list[dict]:
        previous = latest_refined(self.run_dir.root)
        rows = {row["id"]: row for row in read_jsonl(previous)} if previous else {}
        out = {i: row for i, row in rows.items() if not row["kept"]}  # dropped earlier: stays dropped
        for a in active:
            s = scores[a.id]
            out[a.id] = {
                "id": a.id, "kept": a.id not in drops, "reason": drops.get(a.id),
                "mask": f"rounds/{r}/labels/{a.id}.png",
                "score": s.score, "agreement": s.agreement, "confidence": s.confidence,
            }
        return [out[i] for i in sorted(out)]

    # ------------------------------------------------------------------ final steps

    def selected(self) -> list[Sample]:
        """The best kept samples by their last score, at most max_pairs."""
        last = latest_refined(self.run_dir.root)
        score = {row["id"]: row.get("score", 0.0) for row in read_jsonl(last)} if last else {}
        samples = [a.sample for a in self.active()]
        samples.sort(key=lambda s: (-score.get(s.image.stem, 0.0), s.image.stem))
        return sorted(samples[: self.cfg.loop.max_pairs], key=lambda s: s.image.stem)

    def export_final(self) -> None:
        from .cli import config_yaml

        export_voc(self.selected(), self.run_dir.root / "export",
                   {"seed": self.cfg.seed, "config": config_yaml(self.cfg)})

    def train_final(self) -> None:
        from .train import train

        val = self.voc_root if self.voc_root else None
        train(self.cfg.train, self.run_dir.root / "export", self.run_dir.root / "final", val_data=val,
              seed=derived_seed(self.cfg.seed, "final"), run_name=f"{self.cfg.name}-final")
        manifest = self.run_dir.root / "export" / "manifest.json"
        meta = json.loads(manifest.read_text())
        meta["model_sha256"] = (self.run_dir.root / "final" / "checksum.txt").read_text().split()[0]
        atomic_write_json(manifest, meta)

    def evaluate_final(self) -> None:
        from .data import find_voc_samples
        from .evaluate import evaluate
        from .metrics import format_table
        from .segmodel import load_model

        weights = self.run_dir.root / "final" / "model.safetensors"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        metrics = evaluate(load_model(weights), find_voc_samples(self.voc_root, "val"), device, self.cfg.train.num_workers)
        metrics |= {"weights_sha256": sha256_file(weights), "data": str(self.voc_root)}
        atomic_write_json(self.run_dir.root / "final" / "metrics.json", metrics)
        print(format_table(metrics))


def _named(values: np.ndarray) -> dict[str, float | None]:
    return {VOC_CLASSES[c]: (None if np.isnan(v) else round(float(v), 4)) for c, v in enumerate(values)}


def _attention_confidence(sample: Sample, shape: tuple[int, int]) -> np.ndarray | None:
    """Per-pixel attention confidence of a label not yet refined (it has scores), else None."""
    if sample.scores is None:
        return None
    with np.load(sample.scores) as npz:
        scores = torch.from_numpy(npz["scores"].astype(np.float32))
    return confidence_map(scores, shape).numpy()


def import_folder(path: str, pool: Pool) -> int:
    """Copy an images/ + masks/ dataset into the pool as round 0 (with classes.jsonl if given).

    Without a class list, a sample's classes are those its mask contains.
    """
    root = Path(path)
    samples = find_samples(root)
    classes_file = root / "classes.jsonl"
    named: dict[str, list[str]] = {}
    if classes_file.exists():
        for lineno, row in enumerate(read_jsonl(classes_file), start=1):
            try:
                named[str(row["id"])] = [canonical(c) for c in row["classes"]]
            except (KeyError, TypeError, ValueError) as err:
                raise UserError(f"{classes_file}:{lineno}: {err}") from None
    done = pool.done_ids()
    rows = []
    for index, sample in enumerate(samples):
        sid = f"r00_{index:06d}"
        if sid in done:
            continue
        with Image.open(sample.image) as image:
            rgb = np.asarray(image.convert("RGB"))
        mask = load_mask(sample.mask)
        classes = named.get(sample.image.stem) or [VOC_CLASSES[v] for v in np.unique(mask) if 0 < v < len(VOC_CLASSES)]
        save_image(pool.image_path(sid), rgb)
        save_mask(pool.mask_path(sid), mask)
        rows.append({"id": sid, "round": 0, "index": index, "source": str(sample.image), "classes": classes,
                     "prompt": None, "class_prompt": None, "seed": None, "label_source": "folder"})
    if rows:
        pool.write_manifest_shard(rows[0]["id"], rows)
    return len(rows)
