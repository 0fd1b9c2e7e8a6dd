"""What a run folder holds, read without trusting it to be complete: the input of the report.

A run may have been killed, or may still be running: each part that is missing or unreadable
becomes a line in ``RunFacts.missing`` instead of an error. Only a folder that is no run at all
(no readable config.yaml) is a UserError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..core.classes import FOREGROUND_CLASSES, IGNORE_INDEX, NUM_CLASSES, canonical
from ..core.cli import read_run_config
from ..core.config import RefineConfig
from ..core.errors import UserError
from ..core.gate import refine_config
from ..core.layout import RunLayout, Step, round_tasks, round_title
from ..core.store import read_jsonl


@dataclass
class RoundFacts:
    """One planned round: its status and, once it finished, its stats.json and samples.jsonl."""

    index: int
    status: str
    """'done', 'in progress or stopped', 'not started' or 'unreadable'."""
    detail: str = ""
    stats: dict | None = None
    rows: list[dict] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass
class ExportFacts:
    """The exported dataset: its sample ids, where their masks are, and its metadata file."""

    ids: list[str]
    mask_dir: Path
    meta: dict
    meta_name: str

    def mask_path(self, sample_id: str) -> Path:
        return self.mask_dir / f"{sample_id}.png"


@dataclass
class RunFacts:
    root: Path
    config: dict
    done_steps: list[str]
    seconds: dict[str, float]
    pool_rows: dict[str, dict]
    rounds: list[RoundFacts]
    export: ExportFacts | None
    checksum: str | None
    metrics: dict | None
    missing: list[str]

    @cached_property
    def run(self) -> RunLayout:
        return RunLayout(self.root)

    @cached_property
    def refine(self) -> RefineConfig:
        """The run's refine settings as the loop read them (defaults where config.yaml lacks one)."""
        return refine_config(self.config.get("refine"))

    @property
    def planned_rounds(self) -> int:
        return len(self.rounds)

    @property
    def finished_rounds(self) -> list[RoundFacts]:
        return [r for r in self.rounds if r.done]

    @property
    def latest(self) -> RoundFacts | None:
        done = self.finished_rounds
        return done[-1] if done else None

    @property
    def classes(self) -> list[str]:
        """The foreground classes the run used: the prompts' classes (or, for a folder source,
        those its samples name), in VOC order."""
        named: set[str] = set()
        source = str(self.config.get("loop", {}).get("source", "sd"))
        if not source.startswith("folder:"):
            for name in self.config.get("generate", {}).get("classes") or []:
                try:
                    named.add(canonical(name))
                except ValueError:
                    continue
        for row in self.pool_rows.values():
            named.update(c for c in row.get("classes") or [] if c in FOREGROUND_CLASSES)
        return [c for c in FOREGROUND_CLASSES if c in named] or list(FOREGROUND_CLASSES)

    @cached_property
    def sample_rows(self) -> dict[str, dict]:
        """The latest finished round's row of every sample (kept or dropped)."""
        latest = self.latest
        return {row["id"]: row for row in latest.rows} if latest else {}

    @cached_property
    def exported(self) -> set[str]:
        return set(self.export.ids) if self.export else set()

    def label_path(self, sample_id: str) -> Path:
        """The sample's current label: exported, else latest refined, else the attention label."""
        if sample_id in self.exported:
            return self.export.mask_path(sample_id)
        row = self.sample_rows.get(sample_id)
        if row and row.get("mask"):
            return self.root / row["mask"]
        return self.run.pool.mask_path(sample_id)

    def pred_path(self, sample_id: str, r: int | None = None) -> Path | None:
        """The held-out prediction of round ``r`` (default: the latest finished one)."""
        if r is None:
            if self.latest is None:
                return None
            r = self.latest.index
        return self.run.prediction(r, sample_id)


def read_run(root: str | Path) -> RunFacts:
    """Everything the report shows about ``root`` that can be read without decoding images."""
    run = RunLayout(root)
    if not run.root.is_dir():
        raise UserError(f"{run.root} is not a folder")
    config = _read_config(run)
    missing: list[str] = []
    done, seconds = _read_state(run, missing)
    pool_rows = _read_pool(run, missing)
    planned = int(config.get("loop", {}).get("rounds") or 0)
    on_disk = run.rounds_on_disk()
    rounds = [_read_round(run, r, done, config) for r in range(max([planned, *(r + 1 for r in on_disk)]))]
    not_done = [r for r in rounds if not r.done]
    if not_done:
        what = "; ".join(f"{round_title(r.index)} {r.status}" + (f" ({r.detail})" if r.detail else "") for r in not_done)
        missing.append(f"{len(not_done)} of {len(rounds)} rounds missing: {what}")
    export = _read_export(run, missing)
    checksum = _read_text(run.final.checksum)
    if checksum is None:
        missing.append("no final model yet (final/checksum.txt)")
    metrics = _read_json(run.final.metrics)
    return RunFacts(run.root, config, done, seconds, pool_rows, rounds, export,
                    checksum.split()[0] if checksum else None, metrics, missing)


def _read_config(run: RunLayout) -> dict:
    path = run.config
    if not path.is_file():
        raise UserError(f"{run.root} is not a syntagen_st run folder (no config.yaml); pass the folder fit wrote")
    return read_run_config(path)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _read_state(run: RunLayout, missing: list[str]) -> tuple[list[str], dict[str, float]]:
    state = _read_json(run.state)
    if state is None:
        missing.append("state.json is unreadable: step status and durations unknown" if run.state.exists()
                       else "no step has finished yet (no state.json)")
        return [], {}
    seconds = state.get("seconds") if isinstance(state.get("seconds"), dict) else {}
    return [str(s) for s in state.get("done", [])], {str(k): float(v) for k, v in seconds.items()}


def _read_pool(run: RunLayout, missing: list[str]) -> dict[str, dict]:
    try:
        return {row["id"]: row for row in run.pool.rows()}
    except (UserError, OSError) as err:
        missing.append(f"pool manifest unreadable: {err}")
        return {}


def _read_round(run: RunLayout, r: int, done: list[str], config: dict) -> RoundFacts:
    rdir = run.round_dir(r)
    stats, samples = run.stats(r), run.samples(r)
    if stats.is_file() and samples.is_file():
        data = _read_json(stats)
        try:
            rows = read_jsonl(samples, "refinement file", required=("id",))
        except (UserError, OSError) as err:
            return RoundFacts(r, "unreadable", str(err))
        if data is None:
            return RoundFacts(r, "unreadable", f"{stats} is not readable JSON")
        return RoundFacts(r, "done", "", data, rows)
    parsed = [_step(s) for s in done]
    steps = [s.task for s in parsed if s is not None and s.stage == "round" and s.number == r]
    later = any(s is not None and s.stage == "round" and s.number == r + 1 for s in parsed)
    if steps or rdir.exists() or later:
        folds = int(config.get("refine", {}).get("folds") or 0)
        todo = [s for s in round_tasks(folds) if s not in steps]
        detail = f"steps done: {', '.join(steps) or 'none'}; not done: {', '.join(todo) or 'none'}"
        if "refine" in steps:
            detail = "marked done but rounds/{r}/stats.json or samples.jsonl is missing".format(r=r)
        return RoundFacts(r, "in progress or stopped", detail)
    return RoundFacts(r, "not started")


def _step(name: str) -> Step | None:
    try:
        return Step.parse(name)
    except ValueError:
        return None


def _read_export(run: RunLayout, missing: list[str]) -> ExportFacts | None:
    """The export in either layout: the entry's ``train.txt`` + ``mask/``, or the VOC tree."""
    entry = run.export
    export, voc = entry.root, entry.voc
    layouts = [(entry.train_list, export / "mask"),
               (voc / "ImageSets" / "Segmentation" / entry.TRAIN_LIST, voc / "SegmentationClass")]
    meta_name = next((n for n in (entry.SUBMISSION, "manifest.json") if (export / n).is_file()), None)
    split = next(((s, m) for s, m in layouts if s.is_file()), None)
    if meta_name is None or split is None:
        # The metadata file is written last: without it the export is unfinished.
        missing.append("no finished export yet" + (" (export/ exists but has no submission.json or manifest.json)"
                                                   if export.exists() and meta_name is None else ""))
        return None
    ids = [line.strip() for line in split[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    return ExportFacts(ids, split[1], _read_json(export / meta_name) or {}, meta_name)


# ---------------------------------------------------------------- the one pass over the labels


@dataclass
class LabelScan:
    """Per-sample counts from one pass over the current labels and the attention labels."""

    ids: list[str]
    pixels: np.ndarray
    """(n, 21) pixels per class of each sample's current label (255 not counted)."""
    changed: np.ndarray
    """(n,) share of pixels whose current label differs from the attention label (NaN: unknown)."""
    to_ignore: np.ndarray
    """(n,) share of pixels turned into 255 by refinement (NaN: unknown)."""
    unreadable: list[str]


def _read_label(path: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Label values of a palette / grayscale PNG and its pixels per class (21,); None when it
    is missing or not a mask."""
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                return None
            image.load()
            # PIL's histogram of the index image is several times faster than np.bincount.
            return np.asarray(image), np.asarray(image.histogram()[:NUM_CLASSES], dtype=np.int64)
    except (OSError, ValueError):
        return None


def change_shares(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Share of pixels whose label changed, and share that became 255 (ignore)."""
    if before.shape != after.shape:
        return float("nan"), float("nan")
    changed = before != after
    count = np.count_nonzero(changed)
    ignored = np.count_nonzero(after[changed] == IGNORE_INDEX) if count else 0
    return count / after.size, ignored / after.size


def _scan_one(paths: tuple[Path | None, Path | None]) -> tuple[np.ndarray, float, float] | None:
    """(pixels per class, changed share, ignored share) of one sample; None if its label is unreadable."""
    after = _read_label(paths[0])
    if after is None:
        return None
    before = _read_label(paths[1])
    return (after[1], *(change_shares(before[0], after[0]) if before is not None else (float("nan"), float("nan"))))


PARALLEL_FROM = 2000
"""Samples from which the scan runs in worker processes (below, starting them costs more)."""


def scan_labels(ids: Iterable[str], current: dict[str, Path], attention: dict[str, Path], progress: bool = False) -> LabelScan:
    """Decode each sample's current label and its attention label once (in parallel for big runs)."""
    ids = list(ids)
    pixels = np.zeros((len(ids), NUM_CLASSES), np.int64)
    changed = np.full(len(ids), np.nan)
    to_ignore = np.full(len(ids), np.nan)
    unreadable = []
    jobs = [(current.get(sid), attention.get(sid)) for sid in ids]
    workers = min(os.cpu_count() or 1, 8)
    pool = ProcessPoolExecutor(workers) if len(ids) >= PARALLEL_FROM and workers > 1 else None
    try:
        results = pool.map(_scan_one, jobs, chunksize=128) if pool else map(_scan_one, jobs)
        for n, result in enumerate(tqdm(results, total=len(ids), desc="report: labels", disable=not progress, leave=False)):
            if result is None:
                unreadable.append(ids[n])
                continue
            pixels[n], changed[n], to_ignore[n] = result
    finally:
        if pool:
            pool.shutdown()
    return LabelScan(ids, pixels, changed, to_ignore, unreadable)
