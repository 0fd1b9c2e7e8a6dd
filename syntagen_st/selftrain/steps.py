"""The loop's steps, one function each: add a round's data, train a fold model, refine a round,
export, and train the fixed protocol on the export. Each works on a ``Job`` (the config, the run
folder, this process's place among the ranks) and writes only through the run's layout."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..core.config import Config
from ..core.device import resolve_device
from ..core.layout import RunLayout, round_step
from ..core.seeds import derived_seed
from ..core.store import atomic_write_json, atomic_write_text, load_mask, read_jsonl, save_mask, write_jsonl
from ..generation.sampler import SampleGenerator
from ..prompts.records import PromptRecord
from ..prompts.rounds import round_records
from ..scaleout.dist import SINGLE, Dist
from ..segmentation.data import Sample, find_samples, find_voc_samples, load_sample
from ..segmentation.metrics import format_table
from ..segmentation.trainer import train
from ..submission.export import dataset_digest, export_run, record_model, verify_files
from . import refine as rf
from .combine import guided_view, relabel_filter
from .dashboard import RoundLogger
from .decide import RoundEvidence, blind, decide_round, gate, round_stats, sample_rows
from .heldout import held_out_pass, load_fold_models
from .pool import Active, active_samples, fold_groups, fold_of, import_folder, round_budgets
from .runner import RunState
from .selection import selected, weights_for
from .summary import round_summary

EXAMPLES = 8
"""Samples per round shown as attention / refined / held-out overlays on W&B."""


@dataclass
class Job:
    """What every step works on."""

    cfg: Config
    run: RunLayout
    dist: Dist = SINGLE
    progress: bool = True
    voc_root: str | None = None
    keep_checkpoints: bool = False
    """Keep the fold models' Lightning checkpoints after their round is refined (fit --keep-checkpoints)."""

    @property
    def show(self) -> bool:
        """Progress bars on this process: rank 0 only."""
        return self.progress and self.dist.is_main


def add_data(job: Job, r: int) -> None:
    """Round ``r``'s samples: its share of the budget generated (or, in round 0, a folder imported)."""
    cfg, run, dist = job.cfg, job.run, job.dist
    loop = cfg.loop
    if loop.source.startswith("folder:"):
        if r == 0 and dist.is_main:
            import_folder(loop.source[len("folder:"):], run.pool, cfg.label)
        return

    def records() -> list[PromptRecord]:
        # What earlier rounds generated is subtracted, so resuming with more rounds spreads the
        # rest of the budget instead of exceeding it.
        earlier = sum(1 for row in run.pool.rows() if row["round"] < r)
        split = loop.budget_split if r == 0 else "equal"
        count = round_budgets(loop.generate_total - earlier, loop.rounds - r, split)[0]
        return round_records(cfg, r, count, weights_for(run, r), run)

    # Prompts are saved (and a language model writing them freed) before SD loads; every rank
    # generates from rank 0's records.
    SampleGenerator(cfg, device=dist.device).fill(run.pool, dist.from_main(records), job.show, dist)


def train_fold(job: Job, r: int, k: int, active: list[Active]) -> None:
    """Fold model k of round r, on the samples of the other folds."""
    cfg = job.cfg
    fold = fold_of(active, cfg.refine.folds, cfg.seed)
    samples = [a.sample for a in active if fold[a.id] != k]
    settings = copy.deepcopy(cfg.train)
    settings.max_steps = cfg.loop.round_steps
    settings.checkpoint_every = settings.max_steps
    # On one device whatever the process count: the model depends only on the round and the fold.
    # A damaged sample stops it: a model trained without it would not be the run's.
    train(settings, samples, job.run.fold(r, k).root, seed=derived_seed(cfg.seed, f"r{r}k{k}"),
          run_name=f"{cfg.name}-round{r + 1}-fold{k + 1}", progress=job.show, single_device=True, device=job.dist.device,
          skip_corrupt=False)


def prune_fold_checkpoints(run: RunLayout, r: int, folds: int) -> None:
    """Delete round ``r``'s fold checkpoints once its refine step is done: a fold step is only ever
    redone from nothing, and what the later steps and the report read is model.safetensors, so
    no resume needs them. Called on every pass, so a run stopped between the refine step and the
    pruning is pruned on its rerun."""
    if round_step(r, "refine") not in RunState(run).done():
        return
    for k in range(folds):
        shutil.rmtree(run.fold(r, k).checkpoints, ignore_errors=True)


def refine_round(job: Job, r: int, reporter: RoundLogger) -> None:
    """Relabel, score, filter and steer with the round's fold models, in the method's order.

    Over several ranks each predicts and relabels its shard; the per-class counts and the
    sample scores are merged, and rank 0 takes the decisions and writes the round's files."""
    cfg, run, dist = job.cfg.refine, job.run, job.dist

    def read() -> tuple[dict[str, dict], list[Active]]:
        # A redo after a crash must read the labels as they were before this round.
        run.samples(r).unlink(missing_ok=True)
        previous = run.latest_samples()
        return ({row["id"]: row for row in read_jsonl(previous)} if previous else {}), active_samples(run)

    earlier, active = dist.from_main(read)
    judged = {i for i, row in earlier.items() if row.get("judged")}
    groups = fold_groups(active, cfg.folds, job.cfg.seed)
    device = dist.device or resolve_device(job.cfg.model.device, "model.device")
    held_out = held_out_pass(load_fold_models(run, r, cfg.folds, device), groups, job.cfg.train.batch_size, dist,
                             cfg.flip_tta)

    # 1. The gate, on the cores of the original attention labels. Refined labels are a model's own
    # output, so in later rounds they would vouch for the model (harsh shapes, round 2: person
    # opened on them and lost 7 points).
    evidence = rf.ClassEvidence()
    for a, model in held_out():
        evidence = evidence + rf.class_evidence(load_mask(run.pool.mask_path(a.id)), model.pred, cfg.core_margin)
    evidence = rf.ClassEvidence(*(dist.all_reduce_sum(getattr(evidence, f.name)) for f in fields(rf.ClassEvidence)))
    reliable = gate(evidence, cfg)
    unseen = blind(evidence, cfg)

    # 2. Relabel and score each sample, gathering the class statistics.
    measured = _relabel(job, r, held_out, reliable, unseen, judged, groups)
    dist.barrier()  # every rank's label files are written
    if not dist.is_main:
        return

    # 3. Drops, weakness and the next round's prompt weights.
    decision = decide_round(reliable, measured, [a.id for a in active if a.id not in judged], cfg)

    # 4. Write and log; samples.jsonl makes the round's labels current, so it is written last.
    stats = round_stats(r, [a.classes for a in active], reliable, evidence, measured, decision)
    atomic_write_json(run.stats(r), stats)
    atomic_write_json(run.weights(r), decision.weights)
    labels = {a.id: run.label_name(r, a.id) for a in active}
    write_jsonl(run.samples(r), sample_rows(labels, earlier, [a.id for a in active], measured.scores, decision.drops,
                                            judged | decision.judged))
    reporter.log_round(r, stats, _examples(run, r, groups))
    print(round_summary(stats, decision.drops, job.cfg.loop.rounds, cfg), flush=True)


def _relabel(job: Job, r: int, held_out: Callable, reliable: np.ndarray, unseen: np.ndarray, judged: set[str],
             groups: list[list[Active]]) -> RoundEvidence:
    """This rank's relabelling pass (refined labels and held-out predictions written), with its
    counts merged over every rank."""
    cfg, run, dist = job.cfg.refine, job.run, job.dist
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
        # The gate, the scores and the statistics read the model alone; only what it writes is
        # combined with the label prior and snapped to the image (selftrain/combine.py).
        if a.id in judged:
            refined = label
        else:
            view = guided_view(model, label, item["image"], cfg.relabel_prior, relabel_filter(cfg, job.cfg.label)) \
                if cfg.relabel_image else model
            refined = rf.relabel(label, view, reliable, cfg.relabel_confidence, cfg.keep_confidence, item.get("weight"),
                                 cfg.label_sure, None if cfg.background_when_blind else unseen)
        scores[a.id] = rf.sample_score(label, model.pred, model.top, a.allowed, cfg.confidence_weight,
                                       None if cfg.score_blind_classes else unseen)
        counted = rf.class_totals(label, refined, model.pred, model.top)
        totals, confidence[a.id] = totals + counted, counted.confidence_sum
        relabelled += int((refined != label).sum())
        pixels += label.size
        save_mask(run.label(r, a.id), refined)
        save_mask(run.prediction(r, a.id), model.pred)  # the held-out prediction, for the report
    totals = rf.ClassTotals(*(dist.all_reduce_sum(getattr(totals, f.name)) for f in fields(rf.ClassTotals)))
    # Float sums are added sample by sample in the single-process order: the same bits for any world size.
    confidence = {i: v for shard in dist.all_gather_objects(confidence) for i, v in shard.items()}
    totals.confidence_sum = sum((confidence[a.id] for group in groups for a in group), rf.ClassTotals().confidence_sum)
    relabelled, pixels = (int(n) for n in dist.all_reduce_sum(np.array([relabelled, pixels], np.int64)))
    scores = {i: score for shard in dist.all_gather_objects(scores) for i, score in shard.items()}
    return RoundEvidence(totals, scores, relabelled, pixels)


def _examples(run: RunLayout, r: int, groups: list[list[Active]]) -> list[tuple[Path, np.ndarray, np.ndarray, np.ndarray]]:
    """The first samples of a pass (image, attention label, refined label, held-out prediction),
    read back from the round's files: the same ones whichever rank predicted them."""
    first = [a for group in groups for a in group][:EXAMPLES]
    return [(a.sample.image, load_sample(a.sample)["mask"], load_mask(run.label(r, a.id)),
             load_mask(run.prediction(r, a.id))) for a in first]


def export_final(job: Job) -> None:
    """The entry layout, VOC tree, submission.json and card in RUN/export."""
    if job.dist.is_main:
        export_run(job.cfg, job.run, selected(job.run, job.cfg), job.run.export.root, job.show)


def final_stale(run: RunLayout) -> bool:
    """A final model trained on an earlier export must not be resumed into this one."""
    return run.export_digest.exists() and run.export_digest.read_text().strip() != dataset_digest(run.export.root)


def train_final(job: Job) -> None:
    """The fixed protocol on exactly the exported files; with --voc-root it validates on VOC
    val (W&B curves, final/metrics.json). A kill resumes through Lightning's checkpoint."""
    cfg, run, dist = job.cfg, job.run, job.dist

    def check_export() -> tuple[list[Sample], list[Sample] | None]:
        verify_files(run.export.root)  # the files on disk are those submission.json lists
        run.final.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.export_digest, dataset_digest(run.export.root) + "\n")
        return find_samples(run.export.root), (find_voc_samples(job.voc_root) if job.voc_root else None)

    # The export's VOC tree links to its entry files: the model reads exactly those bytes.
    # Data-parallel over every rank, the total batch split between them, on rank 0's lists.
    samples, val_samples = dist.from_main(check_export)
    train(cfg.train, samples, run.final.root, val_data=val_samples, seed=derived_seed(cfg.seed, "final"),
          run_name=f"{cfg.name}-final", progress=job.show, dist=dist, skip_corrupt=False)
    if not dist.is_main:
        return
    record_model(run.export.root, run.final.read_checksum())
    if job.voc_root:
        print(format_table(json.loads(run.final.metrics.read_text())))
