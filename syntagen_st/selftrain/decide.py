"""A round's decisions from its evidence, as pure functions: which classes the model may relabel
(the gate), which samples to drop, and the next round's prompt weights; and the numbers a round
reports (stats.json, the terminal, the report, W&B and the card read the same ones)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.classes import BACKGROUND, VOC_CLASSES, class_index
from ..core.config import RefineConfig
from . import refine as rf


def gate(evidence: rf.ClassEvidence, cfg: RefineConfig) -> np.ndarray:
    """Bool (21,): the classes the held-out model may relabel, by the band rule on the labels'
    cores (``refine.reliable_classes``)."""
    return rf.reliable_classes(evidence, cfg.min_reliability, cfg.max_core_agreement, cfg.min_class_pixels,
                               cfg.min_core_persistence)


def blind(evidence: rf.ClassEvidence, cfg: RefineConfig) -> np.ndarray:
    """Bool (21,): the foreground classes the held-out model has not learnt: IoU with the labels'
    cores below ``min_reliability``, or too few core pixels to tell. It calls their pixels
    background, so its background and its disagreement with their labels are no evidence on a
    sample naming one. (A class the gate shuts for agreeing above ``max_core_agreement`` or for
    fading inward is seen.)"""
    out = ~rf.reliable_from(evidence.core_iou(), evidence.support(), cfg.min_reliability, cfg.min_class_pixels)
    out[BACKGROUND] = False
    return out


@dataclass
class RoundEvidence:
    """What a round's relabelling pass measured, merged over every rank."""

    totals: rf.ClassTotals
    scores: dict[str, rf.SampleScore]
    relabelled: int
    pixels: int


@dataclass
class RoundDecision:
    drops: dict[str, str]
    """Dropped sample id -> the reason recorded in samples.jsonl."""
    judged: set[str]
    """The samples this round judged (faced the filter) for the first time."""
    weakness: np.ndarray
    weights: dict[str, float]


def decide_round(reliable: np.ndarray, measured: RoundEvidence, unjudged: Sequence[str], cfg: RefineConfig) -> RoundDecision:
    """Drops and next prompt weights. Each sample faces the filter once, in the first round whose
    model can judge it; a model reliable for no foreground class cannot, so then nothing is dropped."""
    candidates = {i: measured.scores[i] for i in unjudged} if reliable[1:].any() else {}
    drops = rf.select_drops(candidates, cfg.drop_fraction)
    totals = measured.totals
    weakness = rf.class_weakness(totals.iou(), totals.mean_confidence(), totals.kept_share())
    weights = rf.prompt_weights(weakness, cfg.weakness_power, cfg.min_weight)
    return RoundDecision(drops, set(candidates), weakness, weights)


def named(values: np.ndarray) -> dict[str, float | None]:
    """Per-class values by VOC name, rounded; None where NaN."""
    return {VOC_CLASSES[c]: (None if np.isnan(v) else round(float(v), 4)) for c, v in enumerate(values)}


def round_stats(r: int, classes: Sequence[tuple[str, ...]], reliable: np.ndarray, evidence: rf.ClassEvidence,
                measured: RoundEvidence, decision: RoundDecision) -> dict:
    """stats.json of round ``r`` (``classes``: each active sample's prompted classes)."""
    return {
        "round": r,
        "samples": len(classes),
        "dropped": len(decision.drops),
        "drop_reasons": sorted(set(decision.drops.values())),
        "pixels_relabelled": measured.relabelled,
        "pixels": measured.pixels,
        "classes_in_pool": sorted({c for names in classes for c in names}, key=class_index),
        "iou_model_vs_labels": named(measured.totals.iou()),
        "core_iou_model_vs_labels": named(evidence.core_iou()),
        "deep_core_iou_model_vs_labels": named(evidence.deep_core_iou()),
        "core_persistence": named(evidence.persistence()),
        "reliable": [VOC_CLASSES[c] for c in np.flatnonzero(reliable)],
        "weakness": named(decision.weakness),
        "weights": decision.weights,
    }


def sample_rows(run_labels: Mapping[str, str], earlier: Mapping[str, dict], active_ids: Sequence[str],
                scores: Mapping[str, rf.SampleScore], drops: Mapping[str, str], judged: set[str]) -> list[dict]:
    """A round's samples.jsonl: every active sample (``run_labels``: its refined label's path in the
    run), plus those dropped in earlier rounds."""
    out = {i: row for i, row in earlier.items() if not row["kept"]}
    for sid in active_ids:
        s = scores[sid]
        out[sid] = {
            "id": sid, "kept": sid not in drops, "reason": drops.get(sid), "judged": sid in judged,
            "mask": run_labels[sid], "score": s.score, "agreement": s.agreement, "confidence": s.confidence,
        }
    return [out[i] for i in sorted(out)]
