"""The loop's terminal output: what each step is, and what each round found.

Pure text from a round's numbers (the same ones ``rounds/<r>/stats.json`` holds), so a person
can follow the loop from the terminal alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.classes import VOC_CLASSES
from ..core.config import RefineConfig
from ..core.gate import gate_rule, gate_verdict
from ..core.layout import Step, round_title

_SHOWN_DROPS = 5
_ROUND_TASKS = {"data": "add samples", "refine": "predict held out, relabel, filter, steer"}
_FINAL_TASKS = {"export": "select and export the dataset", "train": "train the fixed protocol on the export"}


def step_title(name: str, rounds: int, folds: int) -> str:
    """'round1/fold0' -> 'round 2 of 3: train fold model 1 of 2 ...', as each step starts."""
    step = Step.parse(name)
    if step.stage == "final":
        return "final: " + _FINAL_TASKS.get(step.task, step.task)
    where = round_title(step.number, rounds)
    if step.fold is not None:
        return f"{where}: train fold model {step.fold + 1} of {folds} (on the other folds' samples)"
    return f"{where}: " + _ROUND_TASKS.get(step.task, step.task)


def _iou(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def round_summary(stats: Mapping, drops: Mapping[str, str], rounds: int, cfg: RefineConfig) -> str:
    """A few lines on a finished round: per class (in the pool), the held-out IoU with the labels
    on their cores, which the gate decides on, and over every pixel; the gate's verdict; pixels
    relabelled, drops and why, next weights."""
    r = int(stats["round"])
    pixels = int(stats.get("pixels", 0))
    relabelled = int(stats["pixels_relabelled"])
    share = f"{100 * relabelled / pixels:.2f}%" if pixels else "n/a"
    lines = [
        f"{round_title(r, rounds)} done: {stats['samples']} samples, {relabelled:,} pixels relabelled ({share} of "
        f"{pixels:,}), {stats['dropped']} dropped",
        f"  gate: {gate_rule(cfg)}",
    ]
    in_pool = set(stats.get("classes_in_pool", []))
    iou = stats["iou_model_vs_labels"]
    core = stats.get("core_iou_model_vs_labels", {})
    persistence = stats.get("core_persistence", {})
    weights = stats["weights"]
    reliable = set(stats["reliable"])
    label = "weight next round" if r + 1 < rounds else "weight in selection"
    lines.append(f"  {'class':<13}{'core IoU':>9}{'all-pixel IoU':>15}  {'relabel':<32}{label}")
    for name in VOC_CLASSES:
        if name not in in_pool and name != "background":
            continue
        verdict = gate_verdict(core.get(name), name in reliable, cfg, background=name == "background",
                               persistence=persistence.get(name))
        weight = f"{weights[name]:.2f}" if name in weights else ""
        lines.append(f"  {name:<13}{_iou(core.get(name)):>9}{_iou(iou.get(name)):>15}  {verdict:<32}{weight}")
    absent = [name for name in weights if name not in in_pool]
    if absent:
        lines.append(f"  not in the pool yet: {', '.join(f'{n} {weights[n]:.2f}' for n in absent)}")
    if not reliable - {"background"}:
        lines.append("  no foreground class passes the gate yet: labels are left alone and nothing is dropped")
    for sid in sorted(drops)[:_SHOWN_DROPS]:
        lines.append(f"  dropped {sid}: {drops[sid]}")
    if len(drops) > _SHOWN_DROPS:
        lines.append(f"  ... and {len(drops) - _SHOWN_DROPS} more (rounds/{r}/samples.jsonl)")
    return "\n".join(lines)
