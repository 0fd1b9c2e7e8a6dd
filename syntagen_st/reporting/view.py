"""What the report's sections show, shaped from a run's facts: plain data, no HTML.

Numbers are taken over the run's own classes (a run may prompt fewer than the 20 VOC classes),
and the labels are decoded once, for every section that counts or draws them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.classes import BACKGROUND, VOC_CLASSES
from ..core.config import TINY_MODELS, RefineConfig, is_local_path
from ..core.gate import gate_verdict
from ..core.guided import attention_label, recorded_label_config
from ..core.layout import round_title
from ..core.rules import entry_problems
from .facts import LabelScan, RunFacts, scan_labels

SHEET_SAMPLES = 3
"""Samples per class on a contact sheet: the best, median and worst scored."""
WEAK_WEIGHT = 1.2
"""A class the latest round gave at least this x a uniform share of the prompts counts as weak."""


# ---------------------------------------------------------------- the samples described


@dataclass
class DatasetView:
    """The samples the balance, the contact sheets and the changes describe, and their labels' scan."""

    ids: list[str]
    name: str
    """How the page names them, e.g. 'the 8 exported pairs'."""
    scan: LabelScan

    def __post_init__(self) -> None:
        self._row = {sid: n for n, sid in enumerate(self.scan.ids)}

    def pixels(self, sid: str) -> np.ndarray:
        """Pixels per class (21,) of the sample's current label."""
        return self.scan.pixels[self._row[sid]]


def dataset_view(facts: RunFacts, progress: bool = False) -> DatasetView:
    """The export once there is one, else the kept samples of the latest round, else the pool."""
    if facts.export is not None:
        ids, name = facts.export.ids, f"the {len(facts.export.ids):,} exported pairs"
    elif facts.latest is not None:
        ids = [i for i, row in sorted(facts.sample_rows.items()) if row.get("kept", True)]
        name = f"the {len(ids):,} kept samples after {round_title(facts.latest.index)} (nothing exported yet)"
    else:
        ids = sorted(facts.pool_rows)
        name = f"the {len(ids):,} pool samples with their attention labels (no round finished yet)"
    pool = facts.run.pool
    scan = scan_labels(ids, {i: facts.label_path(i) for i in ids}, {i: pool.mask_path(i) for i in ids}, progress)
    return DatasetView(ids, name, scan)


def read_rgb(path: Path) -> np.ndarray | None:
    """An image as (H, W, 3) uint8; None when it is missing or unreadable (a grey panel)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError):
        return None


def read_mask(path: Path | None) -> np.ndarray | None:
    """A palette / grayscale label as (H, W); None when it is missing or not a mask."""
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            return np.asarray(image) if image.mode in ("P", "L") else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the contact sheets' labels


@dataclass(frozen=True)
class SheetColumns:
    """The panels of a contact-sheet row: the image, the label before the image-guided refinement,
    the refined label (only when ``label.refine_image`` was on: the pool holds it), the relabelled
    (current) label and the held-out prediction."""

    refined: bool
    imported: bool

    @property
    def first(self) -> str:
        return "label as imported" if self.imported else "attention label"

    @property
    def pool_label(self) -> str:
        """What the pool's label is: the refined one, or the first column's itself."""
        return "refined label" if self.refined else self.first

    @property
    def heads(self) -> list[str]:
        return ["image", self.first, *(["refined label"] if self.refined else []), "relabelled label",
                "held-out prediction"]


def sheet_columns(config: Mapping) -> SheetColumns:
    """The columns a run's sheets have, from its config (a config without ``label.refine_image``
    predates the refinement: off)."""
    source = str(config.get("loop", {}).get("source", "sd"))
    return SheetColumns(recorded_label_config(config.get("label")).refine_image, source.startswith("folder:"))


def unrefined_label(facts: RunFacts, sid: str) -> np.ndarray | None:
    """A sample's label before the image-guided refinement: an imported sample's mask as given (the
    manifest's ``source_mask``), a generated one's from its stored attention scores
    (``core/guided.py`` ``attention_label``); None when that is missing or unreadable."""
    row = facts.pool_rows.get(sid, {})
    if row.get("label_source") == "folder":
        return read_mask(Path(row["source_mask"])) if row.get("source_mask") else None
    pool = facts.run.pool
    try:
        with np.load(pool.scores_path(sid)) as stored, Image.open(pool.image_path(sid)) as image:
            scores, class_ids, size = stored["scores"], stored["class_ids"], image.size[::-1]
    except (OSError, KeyError, ValueError):
        return None
    cfg = recorded_label_config(facts.config.get("label"))
    return attention_label(scores, [int(c) for c in class_ids], size, cfg).numpy()


def sheet_masks(facts: RunFacts, sid: str, columns: SheetColumns) -> list[np.ndarray | None]:
    """A sample's labels in the order of ``columns.heads`` after the image (None: a grey panel)."""
    pool_label = read_mask(facts.run.pool.mask_path(sid))
    before = [unrefined_label(facts, sid), pool_label] if columns.refined else [pool_label]
    return [*before, read_mask(facts.label_path(sid)), read_mask(facts.pred_path(sid))]


# ---------------------------------------------------------------- time per step


@dataclass(frozen=True)
class StepTime:
    """One line of the time table: a round with its parts (data, fold models, refine), or a final
    step with its total alone (``parts`` None)."""

    name: str
    total: float | None
    parts: tuple[float | None, float | None, float | None] | None = None


def step_times(seconds: Mapping[str, float], rounds: int, folds: int) -> list[StepTime]:
    """Seconds per round and per final step from state.json's ``seconds`` (a missing step: None)."""
    out = []
    for r in range(rounds):
        folded = sum(seconds.get(f"round{r}/fold{k}", 0.0) for k in range(folds)) or None
        parts = (seconds.get(f"round{r}/data"), folded, seconds.get(f"round{r}/refine"))
        out.append(StepTime(round_title(r), sum(p for p in parts if p) or None, parts))
    finals = sorted({s.split("/")[0] for s in seconds if s.startswith("final")})
    for step in finals:
        after = f" (after {step[len('final'):]} rounds)" if len(finals) > 1 else ""
        out.append(StepTime(f"export{after}", seconds.get(f"{step}/export")))
        out.append(StepTime(f"final training{after}", seconds.get(f"{step}/train")))
    return out


# ---------------------------------------------------------------- steering and the gate


def scaled_weights(stats: Mapping, classes: Sequence[str]) -> dict[str, float]:
    """A round's prompt weights over the run's classes, scaled to mean 1 over them (weights.json
    spreads mean 1 over all 20 VOC classes, which misleads for a run that uses fewer); NaN: none."""
    raw = {c: stats.get("weights", {}).get(c) for c in classes}
    known = [w for w in raw.values() if isinstance(w, (int, float))]
    mean = float(np.mean(known)) if known and np.mean(known) > 0 else 1.0
    return {c: (w / mean if isinstance(w, (int, float)) else math.nan) for c, w in raw.items()}


def weak_classes(facts: RunFacts) -> set[str]:
    """Classes the latest round steered towards: at least WEAK_WEIGHT x a uniform share of prompts."""
    latest = facts.latest
    weights = scaled_weights(latest.stats, facts.classes) if latest else {}
    return {c for c in facts.classes if weights.get(c, 0.0) >= WEAK_WEIGHT}


def weight_columns(facts: RunFacts) -> tuple[list[str], dict[str, list[float]]]:
    """The steering heatmap: a column per set of weights a draw used (the first round's uniform ones, then
    each finished round's, the last one the final selection's), a row per class."""
    columns = [f"{round_title(0)}\n(uniform)"]
    weights = {c: [1.0] for c in facts.classes}
    for r in facts.finished_rounds:
        columns.append("final\nselection" if r.index + 1 >= facts.planned_rounds else round_title(r.index + 1))
        for c, w in scaled_weights(r.stats, facts.classes).items():
            weights[c].append(w)
    return columns, weights


def class_gate(stats: Mapping, cfg: RefineConfig) -> dict[str, tuple[float | None, str]]:
    """Per VOC class of a round: the held-out IoU with the attention labels' cores that the gate
    decided on, and its verdict (the class is in stats.json's ``reliable``, or why not)."""
    core = stats.get("core_iou_model_vs_labels", {})
    persistence = stats.get("core_persistence", {})
    reliable = set(stats.get("reliable", []))
    return {c: (core.get(c), gate_verdict(core.get(c), c in reliable, cfg, background=c == VOC_CLASSES[BACKGROUND],
                                          persistence=persistence.get(c)))
            for c in VOC_CLASSES}


# ---------------------------------------------------------------- balance, sheets, changes, drops


@dataclass
class Balance:
    """Images and foreground pixels per class of the run, and their shares (uniform: 1 / classes)."""

    classes: list[str]
    images: np.ndarray
    pixels: np.ndarray
    image_share: np.ndarray
    pixel_share: np.ndarray

    @property
    def uniform(self) -> float:
        return 1 / len(self.classes)

    @property
    def thin(self) -> list[str]:
        """Classes below half the uniform share of images."""
        return [c for n, c in enumerate(self.classes) if self.image_share[n] < 0.5 * self.uniform]


def class_balance(scan: LabelScan, classes: Sequence[str]) -> Balance:
    """An image counts for every class its label holds; shares are of all (image, class) pairs
    and of all foreground pixels of the run's classes."""
    counts = scan.pixels[:, [VOC_CLASSES.index(c) for c in classes]]
    images = (counts > 0).sum(axis=0)
    pixels = counts.sum(axis=0)
    return Balance(list(classes), images, pixels, images / max(images.sum(), 1), pixels / max(pixels.sum(), 1))


@dataclass(frozen=True)
class ClassSheet:
    name: str
    holders: int
    """Samples whose label holds the class."""
    picks: list[tuple[str, str]]
    """(sample id, 'best' / 'median' / 'worst') by sample score."""


def class_sheets(view: DatasetView, classes: Sequence[str], rows: Mapping[str, dict]) -> list[ClassSheet]:
    """Per class, up to SHEET_SAMPLES samples that hold it: the best, median and worst scored
    (ties by id; an unscored sample counts as 0)."""
    scores = {sid: (rows.get(sid, {}).get("score") or 0.0) for sid in view.ids}
    out = []
    for c in classes:
        k = VOC_CLASSES.index(c)
        holders = sorted((sid for sid in view.ids if view.pixels(sid)[k] > 0), key=lambda s: (-scores[s], s))
        picks = list(dict.fromkeys(holders[i] for i in (0, len(holders) // 2, len(holders) - 1)))[:SHEET_SAMPLES] \
            if holders else []
        ranks = ("best", "median", "worst") if len(picks) == 3 else ("best", "worst")
        out.append(ClassSheet(c, len(holders), list(zip(picks, ranks))))
    return out


def most_changed(scan: LabelScan, n: int) -> list[int]:
    """Positions in the scan of the ``n`` samples whose labels refinement changed most (none unchanged)."""
    changed = np.nan_to_num(scan.changed, nan=-1.0)
    return [int(k) for k in np.argsort(-changed, kind="stable") if changed[k] > 0][:n]


def mean_change(scan: LabelScan) -> float:
    """Mean share of changed pixels over the samples whose change is known; NaN if none is."""
    return float(np.nanmean(scan.changed)) if np.isfinite(scan.changed).any() else math.nan


def dropped_samples(facts: RunFacts) -> tuple[list[dict], dict[str, int]]:
    """The dropped samples' rows, lowest score first (unscored last), and the round that dropped each."""
    dropped = sorted((row for row in facts.sample_rows.values() if not row.get("kept", True)),
                     key=lambda row: (row.get("score") if row.get("score") is not None else math.inf, row["id"]))
    when: dict[str, int] = {}
    for r in facts.finished_rounds:
        for row in r.rows:
            if not row.get("kept", True):
                when.setdefault(row["id"], r.index)
    return dropped, when


def source_line(config: Mapping, export_meta: Mapping | None) -> str:
    """Where the run's images came from, as submission/provenance.py records it: the tiny test
    pipeline, a folder import, or Stable Diffusion with its weights (hub id and revision, or a
    local folder), with the export's commit or files sha256 once there is one."""
    source = str(config.get("loop", {}).get("source", "sd"))
    model = config.get("model", {})
    ref = str(model.get("pretrained", "?"))
    if source.startswith("folder:"):
        return f"folder import: {source[len('folder:'):]} (not generated by Stable Diffusion)"
    if ref in TINY_MODELS:
        return f"the tiny random-initialised test pipeline '{ref}', not Stable Diffusion weights"
    sd = (export_meta or {}).get("stable_diffusion") or {}
    if is_local_path(ref):
        return f"Stable Diffusion from the local folder {ref}" + (f", files sha256 {sd['sha256']}" if sd.get("sha256") else "")
    return (f"Stable Diffusion {ref} from the Hugging Face hub, revision {model.get('revision') or 'main'}"
            + (f", commit {sd['commit']}" if sd.get("commit") else ""))


def not_an_entry(config: Mapping, export_meta: Mapping | None) -> list[str]:
    """Why the run's export is not a competition entry (empty: it can be one): submission.json's
    ``not_an_entry`` once exported, else the same rule (core/rules.py) from the config."""
    if export_meta and "valid_entry" in export_meta:
        return [] if export_meta["valid_entry"] else [str(r) for r in export_meta.get("not_an_entry", [])]
    source = str(config.get("loop", {}).get("source", "sd"))
    gen = config.get("generate", {})
    sizes = {(gen.get("width"), gen.get("height"))} if source == "sd" else None
    return entry_problems(config.get("model", {}).get("pretrained") in TINY_MODELS, source, sizes)
