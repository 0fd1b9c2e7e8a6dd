"""Which kept samples make the dataset: the best <= loop.max_pairs."""

from __future__ import annotations

import json

import numpy as np

from ..core.config import Config
from ..core.layout import RunLayout, round_step, round_tasks
from ..core.store import read_jsonl
from ..segmentation.data import Sample
from .pool import Active, active_samples


def weights_for(run: RunLayout, r: int) -> dict[str, float] | None:
    """The class weights round ``r`` draws its prompts with (None: uniform, round 0)."""
    if r == 0:
        return None
    return json.loads(run.weights(r - 1).read_text())


def selected(run: RunLayout, cfg: Config) -> list[Sample]:
    """The best kept samples, at most max_pairs: by last score times the mean weight of the
    sample's classes after the last round, so a full budget keeps the weak classes' samples."""
    last = run.latest_samples()
    score = {row["id"]: row.get("score", 0.0) for row in read_jsonl(last)} if last else {}
    weights = weights_for(run, cfg.loop.rounds) or {}

    def value(a: Active) -> float:
        return score.get(a.id, 0.0) * float(np.mean([weights.get(c, 1.0) for c in a.classes] or [1.0]))

    active = sorted(active_samples(run), key=lambda a: (-value(a), a.id))
    return sorted((a.sample for a in active[: cfg.loop.max_pairs]), key=lambda s: s.image.stem)


def unfinished_round(done: list[str], rounds: int, folds: int) -> int | None:
    """The first of ``rounds`` rounds with a step not in ``done`` (state.json's list), or None:
    the export reads every round's labels and weights."""
    for r in range(rounds):
        if any(round_step(r, task) not in done for task in round_tasks(folds)):
            return r
    return None
