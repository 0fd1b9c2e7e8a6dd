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
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import refine as rf
from .classes import VOC_CLASSES, canonical, class_index
from .config import Config
from .data import Sample, find_samples, latest_refined, load_sample
from .device import resolve_device
from .errors import UserError
from .export import dataset_digest, export_run, record_model, verify_files
from .dashboards import RoundLogger
from .store import Pool, atomic_write_json, atomic_write_text, read_jsonl, save_image, save_mask, write_jsonl
from .summary import round_summary, step_title



def round_budgets(total: int, rounds: int, split: str) -> list[int]:
    """How many images each round generates; the counts add up to ``total``."""
    if split == "front" and rounds > 1:
        first = math.ceil(total / 2)
        return [first, *round_budgets(total - first, rounds - 1, "equal")]
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def assign_folds(ids: list[str], folds: int, seed: int) -> dict[str, int]:
    """Cross-fitting folds of a round's samples: a seeded shuffle dealt out in turn, so every
    fold gets n // folds or one more, and a sample's fold depends only on the set and the seed."""
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:fold:{i}".encode()).digest())
    return {sid: n % folds for n, sid in enumerate(order)}


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
        try:
            done = json.loads(self.state_file.read_text())["done"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            done = err
        if not isinstance(done, list) or not all(isinstance(step, str) for step in done):
            raise UserError(f"{self.state_file}: unreadable run state ({done!r}); pass --overwrite to start again")
        return done

    def mark_done(self, step: str, seconds: float | None = None) -> None:
        """Record ``step`` as done, with how long it took (the report shows the durations)."""
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        state["done"] = [*self.done_steps(), step]
        if seconds is not None:
            state.setdefault("seconds", {})[step] = round(seconds, 3)
        atomic_write_json(self.state_file, state)


class Loop:
    def __init__(self, cfg: Config, run: Run, voc_root: str | None = None, progress: bool = True) -> None:
        self.cfg, self.folder, self.voc_root, self.progress = cfg, run, voc_root, progress
        self.reporter = RoundLogger(cfg, run.root)

    # ------------------------------------------------------------------ driver

    def run(self) -> None:
        rounds = self.cfg.loop.rounds
        for r in range(rounds):
            self._step(f"round{r}/data", lambda r=r: self.add_data(r))
            for k in range(self.cfg.refine.folds):
                self._step(f"round{r}/fold{k}", lambda r=r, k=k: self.train_fold(r, k), restart=self.folder.round_dir(r) / f"fold{k}")
            self._step(f"round{r}/refine", lambda r=r: self.refine_round(r))
            self._write_report()
        # Named after the round count: a run resumed with more rounds exports and trains again.
        root = self.folder.root
        self._step(f"final{rounds}/export", self.export_final, restart=root / "export")
        self._step(f"final{rounds}/train", self.train_final, restart=root / "final" if self._final_stale() else None)
        self.reporter.finish()
        self._write_report()

    def _write_report(self) -> None:
        """The HTML report of the run so far; a failure to write it never stops the run."""
        try:
            from .report import write_report

            write_report(self.folder.root)
        except Exception as err:  # noqa: BLE001 - a figure that fails must not cost a training run
            warnings.warn(f"report not written: {type(err).__name__}: {err}", stacklevel=2)

    def _final_stale(self) -> bool:
        """A final model trained on an earlier export must not be resumed into this one."""
        trained_on = self.folder.root / "final" / "export_digest.txt"
        return trained_on.exists() and trained_on.read_text().strip() != dataset_digest(self.folder.root / "export")

    def _step(self, name: str, fn, restart: Path | None = None) -> None:
        if name in self.folder.done_steps():
            return
        if restart is not None and restart.exists():
            # A step killed mid-way starts again from nothing, so the result is the same as an
            # uninterrupted run's (a Lightning resume of a round model would reshuffle its data).
            shutil.rmtree(restart)
        print(step_title(name, self.cfg.loop.rounds, self.cfg.refine.folds), flush=True)
        start = time.perf_counter()
        fn()
        self.folder.mark_done(name, time.perf_counter() - start)

    # ------------------------------------------------------------------ round steps

    def add_data(self, r: int) -> None:
        loop = self.cfg.loop
        if loop.source.startswith("folder:"):
            if r == 0:
                import_folder(loop.source[len("folder:"):], self.folder.pool)
            return
        from .generate import SampleGenerator, round_records

        # What earlier rounds generated is subtracted, so resuming with more rounds spreads the
        # rest of the budget instead of exceeding it.
        earlier = sum(1 for row in self.folder.pool.rows() if row["round"] < r)
        split = loop.budget_split if r == 0 else "equal"
        count = round_budgets(loop.generate_total - earlier, loop.rounds - r, split)[0]
        # Prompts are saved (and a language model writing them freed) before SD loads.
        records = round_records(self.cfg, r, count, self.weights_for(r), self.folder.root)
        SampleGenerator(self.cfg).fill(self.folder.pool, records, self.progress)

    def weights_for(self, r: int) -> dict[str, float] | None:
        if r == 0:
            return None
        return json.loads((self.folder.round_dir(r - 1) / "weights.json").read_text())

    def active(self) -> list[Active]:
        """Kept samples with their current (latest refined) labels, in id order."""
        rows = {row["id"]: row for row in self.folder.pool.rows()}
        out = []
        for sample in find_samples(self.folder.root):
            row = rows[sample.image.stem]
            out.append(Active(sample, tuple(row["classes"]), int(row["round"])))
        return out

    def folds(self, active: list[Active]) -> dict[str, int]:
        if len(active) < self.cfg.refine.folds:
            raise UserError(f"{len(active)} samples are too few for refine.folds={self.cfg.refine.folds}; add data")
        return assign_folds([a.id for a in active], self.cfg.refine.folds, self.cfg.seed)

    def train_fold(self, r: int, k: int) -> None:
        from .train import train

        active = self.active()
        fold = self.folds(active)
        samples = [a.sample for a in active if fold[a.id] != k]
        cfg = copy.deepcopy(self.cfg.train)
        cfg.max_steps = self.cfg.loop.round_steps
        cfg.checkpoint_every = cfg.max_steps
        train(cfg, samples, self.folder.round_dir(r) / f"fold{k}", seed=derived_seed(self.cfg.seed, f"r{r}k{k}"),
              run_name=f"{self.cfg.name}-r{r}-fold{k}", progress=self.progress)

    def refine_round(self, r: int) -> None:
        """Relabel, score, filter and steer with the round's fold models, in the method's order."""
        cfg = self.cfg.refine
        rdir = self.folder.round_dir(r)
        # A redo after a crash must read the labels as they were before this round.
        (rdir / "samples.jsonl").unlink(missing_ok=True)
        previous = latest_refined(self.folder.root)
        earlier = {row["id"]: row for row in read_jsonl(previous)} if previous else {}
        judged = {i for i, row in earlier.items() if row.get("judged")}
        active = self.active()
        held_out = self._held_out_predictions(r, active)

        # 1. Held-out reliability, on the labels' cores and over every pixel: the classes the
        # model may relabel.
        evidence = rf.ClassEvidence()
        for a, model in held_out():
            evidence = evidence + rf.class_evidence(load_sample(a.sample)["mask"], model.pred, cfg.core_margin)
        reliable = rf.reliable_classes(evidence, cfg.min_reliability, cfg.max_core_agreement, cfg.min_class_pixels)

        # 2. Relabel and score each sample, gathering the class statistics.
        totals = rf.ClassTotals()
        scores: dict[str, rf.SampleScore] = {}
        relabelled = pixels = 0
        examples = []
        for a, model in held_out():
            # Attention confidence exists for labels not yet refined (they have scores).
            item = load_sample(a.sample, confidence=a.sample.scores is not None)
            label = item["mask"]
            refined = rf.relabel(label, model, reliable, cfg.relabel_confidence, cfg.keep_confidence,
                                 item.get("weight"), cfg.label_sure)
            scores[a.id] = rf.sample_score(label, model.pred, model.top, _allowed(a), cfg.confidence_weight)
            totals = totals + rf.class_totals(label, refined, model.pred, model.top)
            relabelled += int((refined != label).sum())
            pixels += label.size
            save_mask(rdir / "labels" / f"{a.id}.png", refined)
            save_mask(rdir / "pred" / f"{a.id}.png", model.pred)  # the held-out prediction, for the report
            if len(examples) < 8:
                examples.append((a.sample.image, label, refined, model.pred))

        # 3. Drops: each sample faces the filter once, in the first round whose model can judge
        # it; a model reliable for no foreground class cannot, so then nothing is dropped.
        candidates = {a.id: scores[a.id] for a in active if a.id not in judged} if reliable[1:].any() else {}
        drops = rf.select_drops(candidates, cfg.drop_fraction)

        # 4. Weakness and the next round's prompt weights.
        weakness = rf.class_weakness(totals.iou(), totals.mean_confidence(), totals.kept_share())
        weights = rf.prompt_weights(weakness, cfg.weakness_power, cfg.min_weight)

        # 5. Write and log; samples.jsonl makes the round's labels current, so it is written last.
        stats = {
            "round": r,
            "samples": len(active),
            "dropped": len(drops),
            "drop_reasons": sorted(set(drops.values())),
            "pixels_relabelled": relabelled,
            "pixels": pixels,
            "classes_in_pool": sorted({c for a in active for c in a.classes}, key=class_index),
            "iou_model_vs_labels": _named(totals.iou()),
            "core_iou_model_vs_labels": _named(evidence.core_iou()),
            "reliable": [VOC_CLASSES[c] for c in np.flatnonzero(reliable)],
            "weakness": _named(weakness),
            "weights": weights,
        }
        atomic_write_json(rdir / "stats.json", stats)
        atomic_write_json(rdir / "weights.json", weights)
        write_jsonl(rdir / "samples.jsonl", _sample_rows(r, earlier, active, scores, drops, judged | set(candidates)))
        self.reporter.log_round(r, stats, examples)
        print(round_summary(stats, drops, self.cfg.loop.rounds), flush=True)

    def _held_out_predictions(self, r: int, active: list[Active]) -> Callable[[], Iterator[tuple[Active, rf.Restricted]]]:
        """A pass over every active sample with the prediction of the fold model that did not train
        on it, restricted to the sample's classes; fold by fold, in batches. Each call is a pass."""
        from . import network

        device = resolve_device(self.cfg.model.device, "model.device")
        models = [network.load_model(self.folder.round_dir(r) / f"fold{k}" / "model.safetensors", device)
                  for k in range(self.cfg.refine.folds)]
        fold = self.folds(active)

        def one_pass() -> Iterator[tuple[Active, rf.Restricted]]:
            for k, model in enumerate(models):
                group = [a for a in active if fold[a.id] == k]
                probs = network.predict_proba(model, [a.sample.image for a in group], batch_size=self.cfg.train.batch_size)
                for a, p in zip(group, probs):
                    yield a, rf.restricted(p, _allowed(a))

        return one_pass

    # ------------------------------------------------------------------ final steps

    def selected(self) -> list[Sample]:
        """The best kept samples, at most max_pairs: by last score times the mean weight of the
        sample's classes after the last round, so a full budget keeps the weak classes' samples."""
        last = latest_refined(self.folder.root)
        score = {row["id"]: row.get("score", 0.0) for row in read_jsonl(last)} if last else {}
        weights = self.weights_for(self.cfg.loop.rounds) or {}

        def value(a: Active) -> float:
            return score.get(a.id, 0.0) * float(np.mean([weights.get(c, 1.0) for c in a.classes] or [1.0]))

        active = sorted(self.active(), key=lambda a: (-value(a), a.id))
        return sorted((a.sample for a in active[: self.cfg.loop.max_pairs]), key=lambda s: s.image.stem)

    def export_final(self) -> None:
        """The entry layout, VOC tree, submission.json and card in RUN/export (export.py's function)."""
        export_run(self.cfg, self.folder.root, self.selected(), self.folder.root / "export", self.progress)

    def train_final(self) -> None:
        """The fixed protocol on exactly the exported files; with --voc-root it validates on VOC
        val (W&B curves, final/metrics.json). A kill resumes through Lightning's checkpoint."""
        from .metrics import format_table
        from .train import train

        root = self.folder.root
        export = root / "export"
        final = root / "final"
        verify_files(export)  # the files on disk are those submission.json lists
        final.mkdir(parents=True, exist_ok=True)
        atomic_write_text(final / "export_digest.txt", dataset_digest(export) + "\n")
        # The export's VOC tree links to its entry files: the model reads exactly those bytes.
        train(self.cfg.train, export, final, val_data=self.voc_root,
              seed=derived_seed(self.cfg.seed, "final"), run_name=f"{self.cfg.name}-final", progress=self.progress)
        record_model(export, (final / "checksum.txt").read_text().split()[0])
        if self.voc_root:
            print(format_table(json.loads((final / "metrics.json").read_text())))


def _sample_rows(
    r: int, earlier: dict[str, dict], active: list[Active], scores: dict, drops: dict[str, str], judged: set[str]
) -> list[dict]:
    """Round r's samples.jsonl: every active sample, plus those dropped in earlier rounds."""
    out = {i: row for i, row in earlier.items() if not row["kept"]}
    for a in active:
        s = scores[a.id]
        out[a.id] = {
            "id": a.id, "kept": a.id not in drops, "reason": drops.get(a.id), "judged": a.id in judged,
            "mask": f"rounds/{r}/labels/{a.id}.png",
            "score": s.score, "agreement": s.agreement, "confidence": s.confidence,
        }
    return [out[i] for i in sorted(out)]


def _allowed(a: Active) -> list[int]:
    return [class_index(c) for c in a.classes]


def _named(values: np.ndarray) -> dict[str, float | None]:
    return {VOC_CLASSES[c]: (None if np.isnan(v) else round(float(v), 4)) for c, v in enumerate(values)}


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
        item = load_sample(sample)  # a broken pair stops the import with one line naming its file
        rgb, mask = item["image"], item["mask"]
        classes = named.get(sample.image.stem) or [VOC_CLASSES[v] for v in np.unique(mask) if 0 < v < len(VOC_CLASSES)]
        save_image(pool.image_path(sid), rgb)
        save_mask(pool.mask_path(sid), mask)
        rows.append({"id": sid, "round": 0, "index": index, "source": str(sample.image), "classes": classes,
                     "prompt": None, "class_prompt": None, "seed": None, "label_source": "folder"})
    if rows:
        pool.write_manifest_shard(rows[0]["id"], rows)
    return len(rows)
