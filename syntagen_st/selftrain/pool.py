"""The samples a round works on: the pool's kept samples with their current labels, their
cross-fitting folds, each round's share of the budget, and datasets imported as round 0."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.classes import VOC_CLASSES, canonical, class_index
from ..core.config import LabelConfig
from ..core.errors import UserError
from ..core.guided import refine_label
from ..core.layout import RunLayout
from ..core.seeds import fold_key, sample_id
from ..core.store import Pool, read_jsonl, save_image, save_mask
from ..segmentation.data import Sample, find_samples, load_sample

log = logging.getLogger(__name__)


MIN_SIDE = 16
"""An imported image narrower than this teaches nothing and breaks the training's random rescale."""


@dataclass
class Active:
    """A sample taking part in a round: its current label and the classes its prompt named."""

    sample: Sample
    classes: tuple[str, ...]
    round: int

    @property
    def id(self) -> str:
        return self.sample.image.stem

    @property
    def allowed(self) -> list[int]:
        """The VOC ids of the classes the prompt named."""
        return [class_index(c) for c in self.classes]


def active_samples(run: RunLayout) -> list[Active]:
    """Kept samples with their current (latest refined) labels, in id order, as this process reads
    the folder (over several ranks, take rank 0's reading through ``Dist.from_main``)."""
    rows = {row["id"]: row for row in run.pool.rows()}
    out = []
    for sample in find_samples(run.root):
        row = rows[sample.image.stem]
        out.append(Active(sample, tuple(row["classes"]), int(row["round"])))
    return out


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
    order = sorted(ids, key=lambda i: fold_key(seed, i))
    return {sid: n % folds for n, sid in enumerate(order)}


def fold_of(active: list[Active], folds: int, seed: int) -> dict[str, int]:
    """Each active sample's fold; a UserError when there are fewer samples than folds."""
    if len(active) < folds:
        raise UserError(f"{len(active)} samples are too few for refine.folds={folds}; add data")
    return assign_folds([a.id for a in active], folds, seed)


def fold_groups(active: list[Active], folds: int, seed: int) -> list[list[Active]]:
    """The samples of each fold, in id order within a fold."""
    fold = fold_of(active, folds, seed)
    return [[a for a in active if fold[a.id] == k] for k in range(folds)]


def import_folder(path: str | Path, pool: Pool, label: LabelConfig | None = None) -> int:
    """Copy an images/ + masks/ dataset into the pool as round 0 (with classes.jsonl if given).

    Without a class list, a sample's classes are those its mask contains. With ``label`` and its
    ``refine_image`` on, each mask is taken as a prior of ``label.prior_confidence`` and snapped
    to its image's edges (``core/guided.py``): the pool holds the refined label, and each row names
    the mask as given (``source_mask``), which the report shows beside it.
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
    rows, degenerate = [], []
    for index, sample in enumerate(samples):
        sid = sample_id(0, index)
        if sid in done:
            continue
        item = load_sample(sample)  # a broken pair stops the import with one line naming its file
        rgb, mask = item["image"], item["mask"]
        if min(rgb.shape[:2]) < MIN_SIDE or (rgb == rgb[0, 0]).all():
            degenerate.append(sample.image.name)
            continue
        classes = named.get(sample.image.stem) or [VOC_CLASSES[v] for v in np.unique(mask) if 0 < v < len(VOC_CLASSES)]
        if label is not None and label.refine_image:
            mask = refine_label(rgb, mask, [class_index(c) for c in classes], label)[1].numpy()
        save_image(pool.image_path(sid), rgb)
        save_mask(pool.mask_path(sid), mask)
        rows.append({"id": sid, "round": 0, "index": index, "source": str(sample.image),
                     "source_mask": str(sample.mask), "classes": classes,
                     "prompt": None, "class_prompt": None, "seed": None, "label_source": "folder"})
    if degenerate:
        log.warning("%s: skipped %d degenerate images (under %d px a side, or one flat colour): %s", root,
                    len(degenerate), MIN_SIDE, ", ".join(degenerate[:5]) + (" ..." if len(degenerate) > 5 else ""))
    if rows:
        pool.write_manifest_shard(rows[0]["id"], rows)
    return len(rows)
