"""The report's sections, one function each: a run's facts (and the samples described) in, HTML out.

Each says what it shows and, when the run has not got that far, why it is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.classes import VOC_CLASSES
from ..core.gate import gate_rule
from ..core.guided import recorded_label_config
from ..core.layout import round_title
from ..core.rules import MAX_PAIRS
from . import figures
from .facts import RunFacts
from .html import Markup, duration, esc, img, legend, note, num, pct, table
from .view import (
    SHEET_SAMPLES,
    WEAK_WEIGHT,
    DatasetView,
    class_balance,
    class_gate,
    class_sheets,
    dropped_samples,
    mean_change,
    most_changed,
    not_an_entry,
    read_mask,
    read_rgb,
    scaled_weights,
    sheet_columns,
    sheet_masks,
    source_line,
    step_times,
    weak_classes,
    weight_columns,
)

SHOWN_CHANGES = 6
SHOWN_DROPS = 6
DROP_TABLE_ROWS = 200


# ---------------------------------------------------------------- 1. glance


def glance(facts: RunFacts) -> str:
    cfg = facts.config
    loop = cfg.get("loop", {})
    source = str(loop.get("source", "sd"))
    model = cfg.get("model", {})
    model_name = str(model.get("pretrained", "?")) + (f" @ {model['revision']}" if model.get("revision") else "")
    budget = loop.get("generate_total")
    made = len(facts.pool_rows)
    if source.startswith("folder:"):
        images = f"{made:,} imported from {source[len('folder:'):]}"
    else:
        images = f"{made:,} of a budget of {budget:,} (loop.generate_total)" if isinstance(budget, int) else f"{made:,}"
    dropped = sum(1 for row in facts.sample_rows.values() if not row.get("kept", True))
    exported = "not yet"
    if facts.export is not None:
        pairs = facts.export.meta.get("pairs", len(facts.export.ids))
        exported = f"{pairs:,} of {MAX_PAIRS:,} allowed (export/{facts.export.meta_name})"
    miou = (facts.metrics or {}).get("mIoU")
    voc = (f"{100 * miou:.2f}" if isinstance(miou, (int, float)) else "—") if facts.metrics else \
        "not evaluated (fit --voc-root, or python -m syntagen_st.evaluate RUN --voc-root PATH)"
    rows = [
        ("Model", model_name),
        ("Source", source_line(cfg, facts.export.meta if facts.export else None)),
        ("Seed", cfg.get("seed", "?")),
        ("Rounds done", f"{len(facts.finished_rounds)} of {facts.planned_rounds} rounds"),
        ("Classes", f"{len(facts.classes)}: {', '.join(facts.classes)}"),
        ("Images generated" if source == "sd" else "Images", images),
        ("Samples dropped", f"{dropped:,}" if facts.latest else "—"),
        ("Pairs exported", exported),
        ("Final model sha256", Markup(f"<code>{esc(facts.checksum)}</code>") if facts.checksum else "not trained yet"),
        ("VOC val mIoU %", voc),
    ]
    reasons = not_an_entry(cfg, facts.export.meta if facts.export else None)
    notice = (f'<div class="missing"><strong>Not a valid SyntaGen competition entry</strong>: {esc("; ".join(reasons))}.'
              "</div>") if reasons else ""
    out = notice + '<div class="glance">' + table(None, rows, text=[1]) + "</div>"
    return out + "<h3>Time per step</h3>" + _timing(facts)


def _timing(facts: RunFacts) -> str:
    if not facts.seconds:
        return note("No step durations recorded (state.json has none: a run from an older version, or none finished).")
    folds = int(facts.config.get("refine", {}).get("folds") or 0)
    times = step_times(facts.seconds, facts.planned_rounds, folds)
    rows = [[t.name, *(duration(p) for p in t.parts), duration(t.total) if t.total else "—"] if t.parts is not None
            else [t.name, "", "", "", duration(t.total)] for t in times]
    total = sum(t.total or 0.0 for t in times)
    rows.append([Markup("<strong>all steps</strong>"), "", "", "", Markup(f"<strong>{duration(total)}</strong>")])
    return table(["step", "data", f"{folds} fold models", "refine", "total"], rows) + note(
        "data: generating (or importing) the round's samples; fold models: training the held-out models; "
        "refine: predicting, relabelling, scoring and steering. A step that was killed and redone shows its last run.")


# ---------------------------------------------------------------- 2. IoU over rounds


def iou(facts: RunFacts) -> str:
    done = facts.finished_rounds
    if not done:
        return note("No round has finished yet: nothing to show.")
    weak = weak_classes(facts)
    rounds = [r.index for r in done]
    last = rounds[-1]
    per_round = {c: [r.stats.get("iou_model_vs_labels", {}).get(c) for r in done] for c in facts.classes}
    latest = done[-1].stats
    next_weight = scaled_weights(latest, facts.classes)
    gate = class_gate(latest, facts.refine)
    intro = (
        "<p>Each round trains fold models on the current labels; each sample is predicted by the model that did "
        "not train on it, and the IoU of those predictions against the labels, over every pixel, is shown per class. "
        "High: the model reproduces the labels (they are learnable and consistent); low: the labels are noisy or the "
        f"class is thin. <strong>Weak classes</strong> (bold and marked ▲ in the chart, shaded rows marked ▲ in the table) are those whose weakness "
        f"after {round_title(last)} (1 − mean of held-out IoU, model confidence and kept-pixel share) earned them at least "
        f"{WEAK_WEIGHT:g} x a uniform share of the next prompts: "
        f"{esc(', '.join(sorted(weak, key=VOC_CLASSES.index))) if weak else 'none'}.</p>")
    plot = img(figures.iou_over_rounds([round_title(r) for r in rounds], per_round, weak),
               "per-class held-out IoU over the rounds, a row per class and a column per round")
    names = ["background", *facts.classes]
    rows = []
    for c in names:
        core, verdict = gate[c]
        rows.append([c + (" ▲ weak" if c in weak else ""),
                     *(pct(r.stats.get("iou_model_vs_labels", {}).get(c)) for r in done), pct(core), verdict,
                     pct(latest.get("weakness", {}).get(c)) if c != "background" else "",
                     f"{next_weight[c]:.2f}" if c in next_weight else ""])
    header = ["class", *(f"{round_title(r)} IoU % (all pixels)" for r in rounds), f"core IoU % ({round_title(last)})",
              f"relabel ({round_title(last)})", f"weakness % ({round_title(last)})", f"next weight ({round_title(last)})"]
    refine = facts.refine
    shaded = ["weak" if c in weak else "" for c in names]
    return intro + plot + table(header, rows, shaded, text=[len(rounds) + 2]) + note(
        f"The gate (refine.min_reliability, refine.max_core_agreement, refine.min_class_pixels, "
        f"refine.min_core_persistence): {gate_rule(refine)}. "
        f"'core IoU': that IoU in {round_title(last)}, which the gate decided on; 'IoU % (all pixels)': over every pixel, "
        "which it does not use. 'relabel': the gate's verdict: yes; below band; above band; fades inward: boundary "
        "errors (in the band, but the disagreement fell on the cores at twice the margin); too few pixels or no "
        f"foreground (in the band, but on fewer than {refine.min_class_pixels:,} core pixels, or background while no "
        "foreground class passed); no evidence (neither labelled nor predicted on the cores). — : the class was "
        "neither labelled nor predicted.")


# ---------------------------------------------------------------- 3. steering


def steering(facts: RunFacts) -> str:
    if not facts.finished_rounds:
        return note("No round has finished yet: round 1 draws every class with the same weight.")
    columns, weights = weight_columns(facts)
    plot = img(figures.weights_heatmap(columns, weights), "prompt weights per round and class")
    n = len(facts.classes)
    return (
        "<p>How often each class is named in a round's prompts, relative to a uniform share (1.00). Column "
        "<em>round N</em> holds the weights round N drew its prompts with, set after round N−1 from the weakness of each "
        "class; the last column weights the final selection of the exported pairs. Red: more than uniform."
        + (f" Scaled to mean 1 over the run's {n} classes (weights.json spreads mean 1 over all 20)."
           if n < len(VOC_CLASSES) - 1 else "") + "</p>" + plot)


# ---------------------------------------------------------------- 4. balance


def balance(facts: RunFacts, view: DatasetView) -> str:
    if not view.ids:
        return note("No samples yet.")
    b = class_balance(view.scan, facts.classes)
    plot = img(figures.class_balance(b.classes, b.image_share, b.pixel_share, b.uniform), "class balance")
    rows = [[c, f"{b.images[n]:,}", pct(b.image_share[n]), f"{b.pixels[n]:,}", pct(b.pixel_share[n]),
             f"{b.image_share[n] / b.uniform:.2f}"] for n, c in enumerate(b.classes)]
    thin = f"<p>Below half the uniform share of images: <strong>{esc(', '.join(b.thin))}</strong>.</p>" \
        if b.thin else ""
    unreadable = view.scan.unreadable
    unread = note(f"{len(unreadable)} labels could not be read and are not counted: "
                  + ", ".join(unreadable[:10])) if unreadable else ""
    return (
        f"<p>Counted from the label files of {esc(view.name)}. An image counts for every class its label holds; "
        "shares are of all (image, class) pairs and of all foreground pixels. Uniform: each of the run's "
        f"{len(b.classes)} classes an equal share.</p>" + thin + plot
        + table(["class", "images", "% of images", "pixels", "% of pixels", "image share / uniform"], rows) + unread)


# ---------------------------------------------------------------- 5. contact sheets


def _panels(facts: RunFacts, sid: str, masks: Sequence[Path | np.ndarray | None], extra: str, values: set[int]) -> str:
    """One sample's row of panels (image, then each mask, a file or decoded, over it) and its
    caption; adds the label values drawn to ``values`` for the sheet's legend."""
    loaded = [m if isinstance(m, np.ndarray) else read_mask(m) for m in masks]
    for m in loaded:
        if m is not None:
            values.update(int(v) for v in np.unique(m))
    row = img(figures.panel_row(read_rgb(facts.run.pool.image_path(sid)), loaded), f"sample {sid}", "jpeg")
    return row + f'<p class="caption">{_caption(facts, sid, extra)}</p>'


def _caption(facts: RunFacts, sid: str, extra: str) -> str:
    row, pool_row = facts.sample_rows.get(sid, {}), facts.pool_rows.get(sid, {})
    parts = [f"<strong>{esc(sid)}</strong>"]
    if row.get("score") is not None:
        parts.append(f"score {row['score']:.3f} (agreement {row.get('agreement', math.nan):.3f}, "
                     f"confidence {row.get('confidence', math.nan):.3f})")
    if extra:
        parts.append(extra)
    prompt = pool_row.get("prompt") or pool_row.get("source")
    if prompt:
        parts.append(f"“{esc(str(prompt)[:160])}”")
    return " · ".join(parts)


def _sheet(heads: Sequence[str], rows: str, values: set[int]) -> str:
    cols = f'<div class="cols" style="grid-template-columns:repeat({len(heads)},1fr)">' + "".join(
        f"<span>{esc(h)}</span>" for h in heads) + "</div>"
    width = len(heads) * (figures.THUMB + 3) + 3
    return legend(values) + f'<div class="sheet" style="max-width:{width}px">{cols}{rows}</div>'


def sheets(facts: RunFacts, view: DatasetView) -> str:
    if not view.ids:
        return note("No samples yet.")
    latest = facts.latest
    columns = sheet_columns(facts.config)
    pred_round = round_title(latest.index) if latest else "no round finished"
    first = ("the mask as imported" if columns.imported else
             "the attention label (the one its attention scores give, before the image)")
    if columns.refined:
        label = recorded_label_config(facts.config.get("label"))
        crf = columns.imported and label.prior_method == "crf"
        method = ("a fully connected CRF on the image" + (", 255 where it doubts the mask's class" if label.prior_doubt
                                                          else "") if crf else "the guided filter")
        if columns.imported and label.colour_weight:
            method += ", after the image's colour model of each class"
        absent = ("; no background where the mask places no pixel of a class it names"
                  if columns.imported and label.absent_doubt else "")
        refined = (f"; the refined label: that label snapped to the image's edges with {method} "
                   f"(label.refine_image){absent}, as the pool holds it")
    else:
        refined = ("; label.refine_image was off for this run, so the pool holds the "
                   + ("mask as imported" if columns.imported else "attention label") + " itself: no refined-label column")
    current = "the current label after the rounds' relabelling" + ("" if latest else " (no round has finished: still the pool's)")
    intro = (f"<p>For each class, up to {SHEET_SAMPLES} of {esc(view.name)} whose label holds it — the best, median "
             f"and worst by sample score — as image; {esc(first)}{esc(refined)}; {esc(current)}; and the prediction of "
             f"the {esc(pred_round)} model that did not train on the sample. Labels are drawn over the image in the "
             "VOC palette; grey panels are missing files.</p>")
    links, out = [], []
    for sheet in class_sheets(view, facts.classes, facts.sample_rows):
        c, held = sheet.name, sheet.holders
        anchor = f"sheet-{c}"
        links.append(f'<a href="#{anchor}">{esc(c)}</a> ({held})')
        head = f'<h3 id="{anchor}">{esc(c)} — {held:,} sample{"" if held == 1 else "s"}</h3>'
        if not held:
            out.append(f"<div>{head}{note(f'No label among {view.name} holds any {c} pixels.')}</div>")
            continue
        values: set[int] = set()
        rows = "".join(_panels(facts, sid, sheet_masks(facts, sid, columns), rank, values) for sid, rank in sheet.picks)
        out.append(f"<div>{head}{_sheet(columns.heads, rows, values)}</div>")
    index = '<p class="legend">Classes: ' + " · ".join(links) + "</p>"
    return intro + index + '<div class="sheets">' + "".join(out) + "</div>"


# ---------------------------------------------------------------- 6. refinement


def refinement(facts: RunFacts, view: DatasetView) -> str:
    done = facts.finished_rounds
    if not done:
        return note("No round has finished yet: nothing was refined.")
    rounds = table(
        ["round", "samples", "pixels relabelled", "dropped", "classes the gate opened (the model may relabel)"],
        [[round_title(r.index), f"{r.stats.get('samples', 0):,}", f"{r.stats.get('pixels_relabelled', 0):,}",
          f"{r.stats.get('dropped', 0):,}", ", ".join(r.stats.get("reliable", [])) or "none"] for r in done], text=[4])
    rule = note(f"The gate, each round: {gate_rule(facts.refine)}. Section 2 shows the latest round's core IoU and "
                "verdict per class.")
    return (rounds + rule + "<h3>Labels that changed most</h3>" + _changes(facts, view)
            + "<h3>Dropped samples</h3>" + _drops(facts))


def _changes(facts: RunFacts, view: DatasetView) -> str:
    scan = view.scan
    order = most_changed(scan, SHOWN_CHANGES)
    pool_label = sheet_columns(facts.config).pool_label
    if not order:
        return note(f"No label of {view.name} differs from its {pool_label} in the pool: no round model was reliable "
                    "enough to relabel (as expected of short or early rounds).")
    values: set[int] = set()
    rows = "".join(
        _panels(facts, scan.ids[n], [facts.run.pool.mask_path(scan.ids[n]), facts.label_path(scan.ids[n])],
                f"{pct(scan.changed[n])}% of pixels changed, {pct(scan.to_ignore[n])}% became ignore", values)
        for n in order)
    return (f"<p>Among {esc(view.name)}, refinement changed {pct(mean_change(scan))}% of the pixels on average. The "
            f"{len(order)} samples it changed most, before ({pool_label}, as the pool holds it) and after:</p>"
            + _sheet(["image", f"before: {pool_label}", "after: current label"], rows, values))


def _drops(facts: RunFacts) -> str:
    dropped, when = dropped_samples(facts)
    if not dropped:
        return note("No sample was dropped (a sample is judged once, by the first round whose model is reliable for "
                    "some class; refine.drop_fraction of those judged are dropped).")
    values: set[int] = set()
    rows = "".join(
        _panels(facts, sid, [facts.run.pool.mask_path(sid), facts.pred_path(sid, when.get(sid))],
                f"dropped in {round_title(when.get(sid))}", values)
        for sid in (row["id"] for row in dropped[:SHOWN_DROPS]))
    shown = dropped[:DROP_TABLE_ROWS]
    rest = len(dropped) - len(shown)
    listing = table(
        ["sample", "dropped in", "score", "agreement", "confidence", "reason"],
        [[row["id"], round_title(when.get(row["id"])), num(row.get("score")), num(row.get("agreement")),
          num(row.get("confidence")), row.get("reason") or "—"] for row in shown], text=[5])
    more = note(f"{rest:,} more dropped samples are listed in rounds/{facts.latest.index}/samples.jsonl.") \
        if rest > 0 else ""
    return (f"<p>{len(dropped):,} samples were dropped. The {min(len(dropped), SHOWN_DROPS)} lowest scored, with the "
            "held-out prediction of the round that dropped them:</p>"
            + _sheet(["image", sheet_columns(facts.config).pool_label, "held-out prediction"], rows, values)
            + listing + more)


# ---------------------------------------------------------------- 7. final


def final(facts: RunFacts) -> str:
    metrics = facts.metrics
    if not metrics or not isinstance(metrics.get("per_class_iou"), dict):
        why = "fit ran without --voc-root" if facts.checksum else "the final model is not trained yet"
        return note(f"No final evaluation: {why}. python -m syntagen_st.evaluate RUN --voc-root PATH "
                    "writes final/metrics.json.")
    rows = []
    for name in VOC_CLASSES:
        value = metrics["per_class_iou"].get(name)
        bar = Markup(f'<span class="bar" style="width:{round(100 * value)}px"></span>') \
            if isinstance(value, (int, float)) else ""
        rows.append([name, pct(value, 2), bar])
    rows.append([Markup("<strong>mIoU</strong>"), Markup(f"<strong>{pct(metrics.get('mIoU'), 2)}</strong>"), ""])
    images = metrics.get("val_images") or metrics.get("images")
    return (f"<p>The final model (trained on exactly the exported pairs) on VOC 2012 val"
            f"{f', {images:,} images' if isinstance(images, int) else ''}; IoU per class in %.</p>"
            + table(["class", "IoU %", ""], rows, text=[2]))
