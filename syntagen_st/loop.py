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
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np

from . import refine as rf
from .classes import VOC_CLASSES, canonical, class_index
from .config import Config
from .data import Sample, find_samples, find_voc_samples, latest_refined, load_sample
from .device import resolve_device
from .distributed import SINGLE, Dist
from .errors import UserError
from .export import dataset_digest, export_run, record_model, verify_files
from .prompts import PromptRecord
from .dashboards import RoundLogger
from .store import Pool, atomic_write_json, atomic_write_text, load_mask, read_jsonl, save_image, save_mask, write_jsonl
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
    """The rounds. Over several processes (``dist``) every rank walks the same steps; rank 0 owns
    the run folder (state.json, step folders, merged files) and the others compute their shards."""

    def __init__(self, cfg: Config, run: Run, voc_root: str | None = None, progress: bool = True, dist: Dist = SINGLE) -> None:
        self.cfg, self.folder, self.voc_root, self.dist = cfg, run, voc_root, dist
        self.progress = progress and dist.is_main
        self.reporter = RoundLogger(cfg, run.root)

    # ------------------------------------------------------------------ driver

    def run(self) -> None:
        rounds = self.cfg.loop.rounds
        for r in range(rounds):
            self._step(f"round{r}/data", lambda r=r: self.add_data(r))
            self._train_folds(r)
            self._step(f"round{r}/refine", lambda r=r: self.refine_round(r))
            self._write_report()
        # Named after the round count: a run resumed with more rounds exports and trains again.
        root = self.folder.root
        self._step(f"final{rounds}/export", self.export_final, restart=root / "export")
        stale = self.dist.is_main and self._final_stale()
        self._step(f"final{rounds}/train", self.train_final, restart=root / "final" if stale else None)
        if self.dist.is_main:
            self.reporter.finish()
        self._write_report()

    def _write_report(self) -> None:
        """The HTML report of the run so far (rank 0); a failure to write it never stops the run."""
        if not self.dist.is_main:
            return
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
        """A step every rank takes part in (each does its share inside ``fn``)."""
        if self._not_done([name]):
            self._run_together([(name, fn, restart)], every_rank=True)

    def _train_folds(self, r: int) -> None:
        """The round's fold models, one per rank at a time: all K at once with >= K processes, in
        turn with fewer. Each rank trains on rank 0's reading of the pool: a step that only some
        ranks take must not read the folder collectively."""
        names = {f"round{r}/fold{k}": k for k in range(self.cfg.refine.folds)}
        pending = self._not_done(list(names))
        if not pending:
            return
        active = self.dist.from_main(self.active)
        steps = [(name, partial(self.train_fold, r, names[name], active), self.folder.round_dir(r) / f"fold{names[name]}")
                 for name in pending]
        for start in range(0, len(steps), self.dist.world):
            self._run_together(steps[start : start + self.dist.world], every_rank=False)

    def _not_done(self, names: list[str]) -> list[str]:
        """Rank 0 reads state.json; every rank gets its answer."""
        return self.dist.from_main(lambda: [n for n in names if n not in self.folder.done_steps()])

    def _run_together(self, steps: list[tuple[str, Callable[[], None], Path | None]], every_rank: bool) -> None:
        """Rank 0 clears the steps' folders; then every rank runs the step (``every_rank``) or rank i
        runs step i; once all have finished, rank 0 marks them done."""
        if self.dist.is_main:
            for name, _, restart in steps:
                if restart is not None and restart.exists():
                    # A step killed mid-way starts again from nothing, so the result is the same as an
                    # uninterrupted run's (a Lightning resume of a round model would reshuffle its data).
                    shutil.rmtree(restart)
                print(step_title(name, self.cfg.loop.rounds, self.cfg.refine.folds), flush=True)
        self.dist.barrier()
        start = time.perf_counter()
        if every_rank:
            steps[0][1]()
        elif self.dist.rank < len(steps):
            steps[self.dist.rank][1]()
        self.dist.barrier()
        if self.dist.is_main:
            for name, _, _ in steps:
                self.folder.mark_done(name, time.perf_counter() - start)

    # ------------------------------------------------------------------ round steps

    def add_data(self, r: int) -> None:
        loop = self.cfg.loop
        if loop.source.startswith("folder:"):
            if r == 0 and self.dist.is_main:
                import_folder(loop.source[len("folder:"):], self.folder.pool)
            return
        from .generate import SampleGenerator, round_records

        def records() -> list[PromptRecord]:
            # What earlier rounds generated is subtracted, so resuming with more rounds spreads the
            # rest of the budget instead of exceeding it.
            earlier = sum(1 for row in self.folder.pool.rows() if row["round"] < r)
            split = loop.budget_split if r == 0 else "equal"
            count = round_budgets(loop.generate_total - earlier, loop.rounds - r, split)[0]
            return round_records(self.cfg, r, count, self.weights_for(r), self.folder.root)

        # Prompts are saved (and a language model writing them freed) before SD loads; every rank
        # generates from rank 0's records.
        SampleGenerator(self.cfg, device=self.dist.device).fill(self.folder.pool, self.dist.from_main(records), self.progress, self.dist)

    def weights_for(self, r: int) -> dict[str, float] | None:
        if r == 0:
            return None
        return json.loads((self.folder.round_dir(r - 1) / "weights.json").read_text())

    def active(self) -> list[Active]:
        """Kept samples with their current (latest refined) labels, in id order (as this rank reads
        the folder: ranks take rank 0's reading through ``dist.from_main``)."""
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

    def train_fold(self, r: int, k: int, active: list[Active]) -> None:
        from .train import train

        fold = self.folds(active)
        samples = [a.sample for a in active if fold[a.id] != k]
        cfg = copy.deepcopy(self.cfg.train)
        cfg.max_steps = self.cfg.loop.round_steps
        cfg.checkpoint_every = cfg.max_steps
        # On one device whatever the process count: the model depends only on the round and the fold.
        train(cfg, samples, self.folder.round_dir(r) / f"fold{k}", seed=derived_seed(self.cfg.seed, f"r{r}k{k}"),
              run_name=f"{self.cfg.name}-r{r}-fold{k}", progress=self.progress, single_device=True, device=self.dist.device)

    def refine_round(self, r: int) -> None:
        """Relabel, score, filter and steer with the round's fold models, in the method's order.

        Over several ranks each predicts and relabels its shard; the per-class counts and the
        sample scores are merged, and rank 0 takes the decisions and writes the round's files."""
        cfg = self.cfg.refine
        rdir = self.folder.round_dir(r)
        dist = self.dist

        def read() -> tuple[dict[str, dict], list[Active]]:
            # A redo after a crash must read the labels as they were before this round.
            (rdir / "samples.jsonl").unlink(missing_ok=True)
            previous = latest_refined(self.folder.root)
            return ({row["id"]: row for row in read_jsonl(previous)} if previous else {}), self.active()

        earlier, active = dist.from_main(read)
        judged = {i for i, row in earlier.items() if row.get("judged")}
        held_out = self._held_out_predictions(r, active)

        # 1. Held-out reliability on the cores of the original attention labels: the classes the
        # model may relabel. Refined labels are a model's own output, so in later rounds they
        # would vouch for the model (harsh shapes, round 2: person opened on them and lost 7 points).
        evidence = rf.ClassEvidence()
        for a, model in held_out():
            original = load_mask(self.folder.pool.mask_path(a.id))
            evidence = evidence + rf.class_evidence(original, model.pred, cfg.core_margin)
        evidence = rf.ClassEvidence(*(dist.all_reduce_sum(getattr(evidence, f.name)) for f in fields(rf.ClassEvidence)))
        reliable = rf.reliable_classes(evidence, cfg.min_reliability, cfg.max_core_agreement, cfg.min_class_pixels)

        # 2. Relabel and score each sample, gathering the class statistics.
        totals = rf.ClassTotals()
        scores: dict[str, rf.SampleScore] = {}
        confidence: dict[str, np.ndarray] = {}
        relabelled = pixels = 0
        for a, model in held_out():
            # Attention confidence exists for labels not yet refined (they have scores).
            item = load_sample(a.sample, confidence=a.sample.scores is not None)
            label = item["mask"]
            # Like the filter, relabelling takes a sample once, in the first round that can judge it:
            # relabelling refined labels again compounds a model's errors (harsh shapes, round 2:
            # car 0.578 -> 0.500 against the truth).
            refined = label if a.id in judged else rf.relabel(
                label, model, reliable, cfg.relabel_confidence, cfg.keep_confidence, item.get("weight"), cfg.label_sure)
            scores[a.id] = rf.sample_score(label, model.pred, model.top, _allowed(a), cfg.confidence_weight)
            counted = rf.class_totals(label, refined, model.pred, model.top)
            totals, confidence[a.id] = totals + counted, counted.confidence_sum
            relabelled += int((refined != label).sum())
            pixels += label.size
            save_mask(rdir / "labels" / f"{a.id}.png", refined)
            save_mask(rdir / "pred" / f"{a.id}.png", model.pred)  # the held-out prediction, for the report
        totals = rf.ClassTotals(*(dist.all_reduce_sum(getattr(totals, f.name)) for f in fields(rf.ClassTotals)))
        # Float sums are added sample by sample in the single-process order: the same bits for any world size.
        confidence = {i: v for shard in dist.all_gather_objects(confidence) for i, v in shard.items()}
        totals.confidence_sum = sum((confidence[a.id] for group in self._fold_groups(active) for a in group),
                                    rf.ClassTotals().confidence_sum)
        relabelled, pixels = (int(n) for n in dist.all_reduce_sum(np.array([relabelled, pixels], np.int64)))
        scores = {i: score for shard in dist.all_gather_objects(scores) for i, score in shard.items()}
        dist.barrier()  # every rank's label files are written
        if not dist.is_main:
            return

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
        self.reporter.log_round(r, stats, self._examples(r, active))
        print(round_summary(stats, drops, self.cfg.loop.rounds), flush=True)

    def _held_out_predictions(self, r: int, active: list[Active]) -> Callable[[], Iterator[tuple[Active, rf.Restricted]]]:
        """A pass over every active sample with the prediction of the fold model that did not train
        on it, restricted to the sample's classes; fold by fold, in batches. Each call is a pass."""
        from . import network
        from .refine_shard import predict_shard

        device = self.dist.device or resolve_device(self.cfg.model.device, "model.device")
        models = [network.load_model(self.folder.round_dir(r) / f"fold{k}" / "model.safetensors", device)
                  for k in range(self.cfg.refine.folds)]
        groups = self._fold_groups(active)

        def one_pass() -> Iterator[tuple[Active, rf.Restricted]]:
            # This rank's share; over all ranks every sample once, in the single-process batches.
            for a, p in predict_shard(models, groups, self.cfg.train.batch_size, self.dist, lambda a: a.sample.image):
                yield a, rf.restricted(p, _allowed(a))

        return one_pass

    def _fold_groups(self, active: list[Active]) -> list[list[Active]]:
        fold = self.folds(active)
        return [[a for a in active if fold[a.id] == k] for k in range(self.cfg.refine.folds)]

    def _examples(self, r: int, active: list[Active], count: int = 8) -> list[tuple[Path, np.ndarray, np.ndarray, np.ndarray]]:
        """The first samples of a pass (image, attention label, refined label, held-out prediction),
        read back from the round's files: the same ones whichever rank predicted them."""
        rdir = self.folder.round_dir(r)
        first = [a for group in self._fold_groups(active) for a in group][:count]
        return [(a.sample.image, load_sample(a.sample)["mask"], load_mask(rdir / "labels" / f"{a.id}.png"),
                 load_mask(rdir / "pred" / f"{a.id}.png")) for a in first]

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
        if self.dist.is_main:
            export_run(self.cfg, self.folder.root, self.selected(), self.folder.root / "export", self.progress)

    def train_final(self) -> None:
        """The fixed protocol on exactly the exported files; with --voc-root it validates on VOC
        val (W&B curves, final/metrics.json). A kill resumes through Lightning's checkpoint."""
        from .metrics import format_table
        from .train import train

        root = self.folder.root
        export = root / "export"
        final = root / "final"
        def check_export() -> tuple[list[Sample], list[Sample] | None]:
            verify_files(export)  # the files on disk are those submission.json lists
            final.mkdir(parents=True, exist_ok=True)
            atomic_write_text(final / "export_digest.txt", dataset_digest(export) + "\n")
            return find_samples(export), (find_voc_samples(self.voc_root) if self.voc_root else None)

        # The export's VOC tree links to its entry files: the model reads exactly those bytes.
        # Data-parallel over every rank, the total batch split between them, on rank 0's lists.
        samples, val_samples = self.dist.from_main(check_export)
        train(self.cfg.train, samples, final, val_data=val_samples, seed=derived_seed(self.cfg.seed, "final"),
              run_name=f"{self.cfg.name}-final", progress=self.progress, dist=self.dist)
        if not self.dist.is_main:
            return
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
