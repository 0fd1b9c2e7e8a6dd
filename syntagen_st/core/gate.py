"""The relabelling gate in words: its rule and each class's verdict.

The gate itself is array math in selftrain (``refine.reliable_classes``). Its wording lives here
so that the terminal, W&B, the report and the dataset card, which read a saved config, all state
the same band with the same thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import RefineConfig, recorded_section


def refine_config(section: Mapping | None) -> RefineConfig:
    """The ``refine`` section of a saved config (config.yaml, submission.json) as the loop reads
    it: the settings it predates as it was run (``as_recorded``), defaults for other keys it lacks,
    unknown keys ignored."""
    return recorded_section("refine", section)  # type: ignore[return-value]


def gate_rule(cfg: RefineConfig) -> str:
    """The gate in words, as the terminal, the report and the card state it."""
    return (f"a class may be relabelled when the held-out model's IoU with the attention labels on their cores "
            f"(pixels {cfg.core_margin:.3g} of the side from a boundary or the 255 band) lies in "
            f"[{cfg.min_reliability:g}, {cfg.max_core_agreement:g}] over at least {cfg.min_class_pixels:,} core pixels "
            + (f"and the disagreement (1 - that IoU) persists inward, as class errors do and boundary errors do not "
               f"(on the cores at twice the margin, at least {cfg.min_core_persistence:g} of it) "
               if cfg.min_core_persistence > 0 else "")
            + "(background: the lower bound only, and only once a foreground class passes)")


def gate_verdict(core_iou: float | None, reliable: bool, cfg: RefineConfig, background: bool = False,
                 persistence: float | None = None) -> str:
    """Why a class was or was not opened: 'yes', the side of the band it fell on, or (in the band,
    from stats.json's ``core_persistence``; None for runs from before it) a disagreement that fades
    inward. Background has no upper bound: shut above it, it lacked pixels or a foreground class
    that passed."""
    if reliable:
        return "yes"
    if core_iou is None:
        return "no evidence"
    if core_iou < cfg.min_reliability:
        return "below band"
    if background:
        return "too few pixels or no foreground"
    if core_iou > cfg.max_core_agreement:
        return "above band"
    if persistence is not None and persistence < cfg.min_core_persistence:
        return "fades inward: boundary errors"
    return "too few pixels or no foreground"
