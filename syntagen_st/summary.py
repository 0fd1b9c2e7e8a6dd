"""The loop's terminal output: what each step is, and what each round found.

Pure text from a round's numbers (the same ones ``rounds/<r>/stats.json`` holds), so a person
can follow the loop from the terminal alone.
"""

from __future__ import annotations

from collections.abc import Mapping

from .classes import VOC_CLASSES

_SHOWN_DROPS = 5


def step_title(step: str, rounds: int, folds: int) -> str:
    """'round1/fold0' -> 'round 2/3: train fold 1/2 ...', as each step starts."""
    head, _, what = step.partition("/")
    if head.startswith("round"):
        r = int(head[len("round"):])
        where = f"round {r + 1}/{rounds}"
        if what.startswith("fold"):
            k = int(what[len("fold"):])
            return f"{where}: train fold model {k + 1}/{folds} (on the other folds' samples)"
        return f"{where}: " + {"data": "add samples", "refine": "predict held out, relabel, filter, steer"}.get(what, what)
    return "final: " + {"export": "select and export the dataset", "train": "train the fixed protocol on the export"}.get(what, what)


def round_summary(stats: Mapping, drops: Mapping[str, str], rounds: int) -> str:
    """A few lines on a finished round: per-class held-out IoU against the labels (classes in
    the pool), which classes were reliable, pixels relabelled, drops and why, next weights."""
    r = int(stats["round"])
    pixels = int(stats.get("pixels", 0))
    relabelled = int(stats["pixels_relabelled"])
    share = f"{100 * relabelled / pixels:.2f}%" if pixels else "n/a"
    lines = [
        f"round {r + 1}/{rounds} done: {stats['samples']} samples, {relabelled:,} pixels relabelled ({share} of "
        f"{pixels:,}), {stats['dropped']} dropped",
    ]
    in_pool = set(stats.get("classes_in_pool", []))
    iou = stats["iou_model_vs_labels"]
    weights = stats["weights"]
    reliable = set(stats["reliable"])
    label = "weight next round" if r + 1 < rounds else "weight in selection"
    lines.append(f"  {'class':<13}{'held-out IoU':>13}  {'reliable':<9}{label}")
    for name in VOC_CLASSES:
        if name not in in_pool and name != "background":
            continue
        value = iou.get(name)
        shown = "-" if value is None else f"{value:.3f}"
        weight = f"{weights[name]:.2f}" if name in weights else ""
        lines.append(f"  {name:<13}{shown:>13}  {'yes' if name in reliable else '':<9}{weight}")
    absent = [name for name in weights if name not in in_pool]
    if absent:
        lines.append(f"  not in the pool yet: {', '.join(f'{n} {weights[n]:.2f}' for n in absent)}")
    if not reliable - {"background"}:
        lines.append("  no foreground class is reliable yet: labels are left alone and nothing is dropped")
    for sid in sorted(drops)[:_SHOWN_DROPS]:
        lines.append(f"  dropped {sid}: {drops[sid]}")
    if len(drops) > _SHOWN_DROPS:
        lines.append(f"  ... and {len(drops) - _SHOWN_DROPS} more (rounds/{r}/samples.jsonl)")
    return "\n".join(lines)
