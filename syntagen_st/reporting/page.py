"""One offline HTML page about a run: ``python -m syntagen_st.report RUN [--out FILE]``.

Writes ``RUN/report/index.html`` (``fit`` writes it after each round and at the end): the run at a
glance, per-class IoU over the rounds, steering, the class balance of the export, per-class
contact sheets, refinement at work and the final evaluation. Every figure is embedded as a data
URI; there is no script and nothing is fetched, so the file opens anywhere. A run that is
unfinished or damaged gives a page that says what is missing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES
from ..core.rules import MAX_PAIRS
from ..core.store import atomic_write_text
from . import figures
from .facts import LabelScan, RunFacts, read_run, scan_labels

SHEET_SAMPLES = 3
"""Samples per class on a contact sheet: the best, median and worst scored."""
SHOWN_CHANGES = 6
SHOWN_DROPS = 6
DROP_TABLE_ROWS = 200
WEAK_WEIGHT = 1.2


def write_report(run: str | Path, out: str | Path | None = None, progress: bool = False) -> Path:
    """Write the report of ``run`` to ``out`` (default ``RUN/report/index.html``); return its path."""
    start = time.perf_counter()
    facts = read_run(run)
    page = Page(facts, progress).html(start)
    path = Path(out) if out else facts.run.report
    atomic_write_text(path, page)
    return path


# ---------------------------------------------------------------- html helpers


def esc(value: object) -> str:
    return html.escape(str(value))


def img(data: bytes, alt: str, fmt: str = "png") -> str:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    uri = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/{fmt};base64,{uri}" alt="{esc(alt)}" width="{width}" height="{height}">'


def table(header: Sequence[str] | None, rows: Sequence[Sequence[object]], row_class: Sequence[str] | None = None,
          text: Sequence[int] = ()) -> str:
    """A table; numbers align right, the first column and the ``text`` columns left. Cells are
    escaped unless they are already markup (``Markup``)."""

    def cell(tag: str, n: int, value: object) -> str:
        align = ' class="l"' if n == 0 or n in text else ""
        return f"<{tag}{align}>{value if isinstance(value, Markup) else esc(value)}</{tag}>"

    head = "<thead><tr>" + "".join(cell("th", n, h) for n, h in enumerate(header)) + "</tr></thead>" if header else ""
    body = []
    for n, row in enumerate(rows):
        cls = f' class="{row_class[n]}"' if row_class and row_class[n] else ""
        body.append(f"<tr{cls}>" + "".join(cell("td", k, c) for k, c in enumerate(row)) + "</tr>")
    return f'<div class="scroll"><table>{head}<tbody>{"".join(body)}</tbody></table></div>'


class Markup(str):
    """HTML that is inserted as it is."""


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def swatch(value: int) -> str:
    r, g, b = figures.class_colour(value)
    name = "ignore (255)" if value == IGNORE_INDEX else VOC_CLASSES[value]
    return f'<span class="key"><span class="swatch" style="background:rgb({r},{g},{b})"></span>{esc(name)}</span>'


def legend(values: set[int]) -> str:
    shown = sorted(v for v in values if 0 < v < NUM_CLASSES) + ([IGNORE_INDEX] if IGNORE_INDEX in values else [])
    return '<p class="legend">' + " ".join(swatch(v) for v in shown) + ' <span class="key">clear: background</span></p>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1d;line-height:1.45;background:#fff}
main{max-width:1240px;margin:0 auto;padding:8px 16px 48px}
h1{font-size:1.6rem;margin:16px 0 4px}h2{font-size:1.3rem;margin-top:40px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{font-size:1.05rem;margin:24px 0 6px}
img{max-width:100%;height:auto;display:block}
nav{font-size:.95rem}nav a{margin-right:14px;white-space:nowrap}
.sub{color:#555;margin:0;word-break:break-all}
.missing{background:#fff4c2;border-left:5px solid #e0a800;padding:8px 14px;margin:16px 0}
.missing li{margin:2px 0}
.note{color:#555;font-style:italic}
.scroll{overflow-x:auto;margin:8px 0}
table{border-collapse:collapse;font-size:.9rem;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid #e2e2e2;text-align:right;vertical-align:top;white-space:nowrap}
td.l,th.l{white-space:normal}
th{background:#f4f4f4;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.weak td{background:#fdebd0}
.glance td:first-child{font-weight:600;white-space:nowrap}
.glance td{overflow-wrap:anywhere}
.sheets{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,560px),1fr));gap:0 32px}
.sheet{margin:4px 0 18px}
.cols{display:grid;font-size:.8rem;color:#444;text-align:center;margin-bottom:2px}
.caption{font-size:.8rem;color:#444;margin:2px 0 10px;word-break:break-word}
.legend{font-size:.85rem;margin:4px 0}
.key{display:inline-block;margin-right:10px;white-space:nowrap}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #777;margin-right:4px;vertical-align:-1px}
.bar{display:inline-block;height:10px;background:#4c72b0;vertical-align:middle}
footer{color:#777;font-size:.8rem;margin-top:40px}
code{font-size:.9em}
"""


# ---------------------------------------------------------------- the page


class Page:
    """Builds the sections from a run's facts; one pass over the labels feeds all of them."""

    def __init__(self, facts: RunFacts, progress: bool = False) -> None:
        self.facts = facts
        self.pool = facts.run.pool
        self.rows = facts.sample_rows
        self.classes = facts.classes
        self.ids, self.view = self._dataset_view()
        self.scan: LabelScan = scan_labels(
            self.ids, {i: facts.label_path(i) for i in self.ids}, {i: self.pool.mask_path(i) for i in self.ids}, progress)
        self.index = {sid: n for n, sid in enumerate(self.scan.ids)}

    def _dataset_view(self) -> tuple[list[str], str]:
        """The samples the balance and the contact sheets describe, and how to name them."""
        facts = self.facts
        if facts.export is not None:
            return facts.export.ids, f"the {len(facts.export.ids):,} exported pairs"
        if facts.latest is not None:
            kept = [i for i, row in sorted(self.rows.items()) if row.get("kept", True)]
            return kept, f"the {len(kept):,} kept samples after round {facts.latest.index} (nothing exported yet)"
        ids = sorted(facts.pool_rows)
        return ids, f"the {len(ids):,} pool samples with their attention labels (no round finished yet)"

    # ------------------------------------------------------------ assembly

    def html(self, start: float) -> str:
        facts = self.facts
        name = facts.config.get("name") or facts.root.name
        sections = [
            ("glance", "The run at a glance", self.glance()),
            ("iou", "Per-class IoU over the rounds", self.iou()),
            ("steering", "Steering: prompt weights", self.steering()),
            ("balance", "Class balance of the export", self.balance()),
            ("sheets", "Per-class contact sheets", self.sheets()),
            ("refinement", "Refinement at work", self.refinement()),
            ("final", "Final evaluation", self.final()),
        ]
        nav = "\n".join(f'<a href="#{key}">{n}. {esc(title)}</a>' for n, (key, title, _) in enumerate(sections, 1))
        missing = ""
        if facts.missing:
            items = "".join(f"<li>{esc(m)}</li>" for m in facts.missing)
            missing = f'<div class="missing"><strong>This run is incomplete.</strong><ul>{items}</ul></div>'
        body = "".join(f'<section id="{key}"><h2>{n}. {esc(title)}</h2>{content}</section>'
                       for n, (key, title, content) in enumerate(sections, 1))
        written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(name)}: syntagen_st run report</title><style>{CSS}</style></head><body><main>"
            f"<h1>Run {esc(name)}</h1><p class=\"sub\">{esc(facts.root.resolve())}</p><nav>{nav}</nav>{missing}{body}"
            f"<footer>Written {written} in {time.perf_counter() - start:.1f} s by "
            f"<code>python -m syntagen_st.report {esc(facts.root)}</code>. Offline page: every figure is embedded."
            "</footer></main></body></html>\n"
        )

    # ------------------------------------------------------------ 1. glance

    def glance(self) -> str:
        facts, cfg = self.facts, self.facts.config
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
        dropped = sum(1 for row in self.rows.values() if not row.get("kept", True))
        exported = "not yet"
        if facts.export is not None:
            pairs = facts.export.meta.get("pairs", len(facts.export.ids))
            exported = f"{pairs:,} of {MAX_PAIRS:,} allowed (export/{facts.export.meta_name})"
        miou = (facts.metrics or {}).get("mIoU")
        voc = (f"{100 * miou:.2f}" if isinstance(miou, (int, float)) else "—") if facts.metrics else \
            "not evaluated (fit --voc-root, or python -m syntagen_st.evaluate RUN --voc-root PATH)"
        rows = [
            ("Model", model_name),
            ("Source", "Stable Diffusion" if source == "sd" else source),
            ("Seed", cfg.get("seed", "?")),
            ("Rounds done", f"{len(facts.finished_rounds)} of {facts.planned_rounds} rounds"),
            ("Classes", f"{len(self.classes)}: {', '.join(self.classes)}"),
            ("Images generated" if source == "sd" else "Images", images),
            ("Samples dropped", f"{dropped:,}" if facts.latest else "—"),
            ("Pairs exported", exported),
            ("Final model sha256", Markup(f"<code>{esc(facts.checksum)}</code>") if facts.checksum else "not trained yet"),
            ("VOC val mIoU %", voc),
        ]
        out = '<div class="glance">' + table(None, rows, text=[1]) + "</div>"
        return out + "<h3>Time per step</h3>" + self._timing()

    def _timing(self) -> str:
        facts, seconds = self.facts, self.facts.seconds
        if not seconds:
            return note("No step durations recorded (state.json has none: a run from an older version, or none finished).")
        folds = int(facts.config.get("refine", {}).get("folds") or 0)
        header = ["step", "data", f"{folds} fold models", "refine", "total"]
        rows, total = [], 0.0
        for r in range(facts.planned_rounds):
            parts = [seconds.get(f"round{r}/data"), sum(seconds.get(f"round{r}/fold{k}", 0.0) for k in range(folds)) or None,
                     seconds.get(f"round{r}/refine")]
            spent = sum(p for p in parts if p)
            total += spent
            rows.append([f"round {r}", *(duration(p) for p in parts), duration(spent) if spent else "—"])
        finals = sorted({s.split("/")[0] for s in seconds if s.startswith("final")})
        for step in finals:
            export, train = seconds.get(f"{step}/export"), seconds.get(f"{step}/train")
            spent = (export or 0.0) + (train or 0.0)
            total += spent
            after = f" (after {step[len('final'):]} rounds)" if len(finals) > 1 else ""
            rows.append([f"export{after}", "", "", "", duration(export)])
            rows.append([f"final training{after}", "", "", "", duration(train)])
        rows.append([Markup("<strong>all steps</strong>"), "", "", "", Markup(f"<strong>{duration(total)}</strong>")])
        return table(header, rows) + note(
            "data: generating (or importing) the round's samples; fold models: training the held-out models; "
            "refine: predicting, relabelling, scoring and steering. A step that was killed and redone shows its last run.")

    # ------------------------------------------------------------ 2. IoU over rounds

    def _weights(self, stats: dict) -> dict[str, float]:
        """A round's prompt weights over the run's classes, scaled to mean 1 over them (weights.json
        spreads mean 1 over all 20 VOC classes, which misleads for a run that uses fewer)."""
        raw = {c: stats.get("weights", {}).get(c) for c in self.classes}
        known = [w for w in raw.values() if isinstance(w, (int, float))]
        mean = float(np.mean(known)) if known and np.mean(known) > 0 else 1.0
        return {c: (w / mean if isinstance(w, (int, float)) else math.nan) for c, w in raw.items()}

    def _weak(self) -> set[str]:
        """Classes the latest round steered towards: at least WEAK_WEIGHT x a uniform share of prompts."""
        latest = self.facts.latest
        weights = self._weights(latest.stats) if latest else {}
        return {c for c in self.classes if weights.get(c, 0.0) >= WEAK_WEIGHT}

    def iou(self) -> str:
        done = self.facts.finished_rounds
        if not done:
            return note("No round has finished yet: nothing to show.")
        weak = self._weak()
        rounds = [r.index for r in done]
        iou = {c: [r.stats.get("iou_model_vs_labels", {}).get(c) for r in done] for c in self.classes}
        latest = done[-1].stats
        next_weight = self._weights(latest)
        intro = (
            "<p>Each round trains fold models on the current labels; each sample is predicted by the model that did "
            "not train on it, and the IoU of those predictions against the labels is shown per class. High: the model "
            "reproduces the labels (they are learnable and consistent); low: the labels are noisy or the class is "
            f"thin. <strong>Weak classes</strong> (bold lines, shaded rows marked ▲) are those whose weakness after round "
            f"{rounds[-1]} (1 − mean of held-out IoU, model confidence and kept-pixel share) earned them at least "
            f"{WEAK_WEIGHT:g} x a uniform share of the next prompts: "
            f"{esc(', '.join(sorted(weak, key=VOC_CLASSES.index))) if weak else 'none'}.</p>")
        plot = img(figures.iou_over_rounds(rounds, iou, weak), "per-class held-out IoU over the rounds")
        names = ["background", *self.classes]
        reliable = set(latest.get("reliable", []))
        rows = []
        for c in names:
            values = [r.stats.get("iou_model_vs_labels", {}).get(c) for r in done]
            rows.append([c + (" ▲ weak" if c in weak else ""), *(pct(v) for v in values),
                         pct(latest.get("weakness", {}).get(c)) if c != "background" else "",
                         f"{next_weight[c]:.2f}" if c in next_weight else "",
                         "yes" if c in reliable else "no"])
        header = ["class", *(f"round {r} IoU %" for r in rounds), f"weakness % (r{rounds[-1]})",
                  f"next weight (r{rounds[-1]})", f"may relabel (r{rounds[-1]})"]
        return intro + plot + table(header, rows, ["weak" if c in weak else "" for c in names]) + note(
            "'may relabel': the held-out IoU reached refine.min_reliability on enough pixels, so the model may "
            "rewrite that class's labels. — : the class was neither labelled nor predicted.")

    # ------------------------------------------------------------ 3. steering

    def steering(self) -> str:
        done = self.facts.finished_rounds
        if not done:
            return note("No round has finished yet: round 0 draws every class with the same weight.")
        planned = self.facts.planned_rounds
        columns = ["r0\n(uniform)"]
        weights = {c: [1.0] for c in self.classes}
        for r in done:
            used_by = "final\nselection" if r.index + 1 >= planned else f"r{r.index + 1}"
            columns.append(used_by)
            for c, w in self._weights(r.stats).items():
                weights[c].append(w)
        plot = img(figures.weights_heatmap(columns, weights), "prompt weights per round and class")
        return (
            "<p>How often each class is named in a round's prompts, relative to a uniform share (1.00). Column "
            "<em>rN</em> holds the weights round N drew its prompts with, set after round N−1 from the weakness of each "
            "class; the last column weights the final selection of the exported pairs. Red: more than uniform."
            + (f" Scaled to mean 1 over the run's {len(self.classes)} classes (weights.json spreads mean 1 over all 20)."
               if len(self.classes) < len(VOC_CLASSES) - 1 else "") + "</p>" + plot)

    # ------------------------------------------------------------ 4. balance

    def balance(self) -> str:
        if not self.ids:
            return note("No samples yet.")
        idx = [VOC_CLASSES.index(c) for c in self.classes]
        present = self.scan.pixels[:, idx] > 0
        images = present.sum(axis=0)
        pixels = self.scan.pixels[:, idx].sum(axis=0)
        image_share = images / max(images.sum(), 1)
        pixel_share = pixels / max(pixels.sum(), 1)
        uniform = 1 / len(self.classes)
        plot = img(figures.class_balance(self.classes, image_share, pixel_share, uniform), "class balance")
        rows = [[c, f"{images[n]:,}", pct(image_share[n]), f"{pixels[n]:,}", pct(pixel_share[n]),
                 f"{image_share[n] / uniform:.2f}"] for n, c in enumerate(self.classes)]
        thin = [c for n, c in enumerate(self.classes) if image_share[n] < 0.5 * uniform]
        extra = f"<p>Below half the uniform share of images: <strong>{esc(', '.join(thin))}</strong>.</p>" if thin else ""
        unread = note(f"{len(self.scan.unreadable)} labels could not be read and are not counted: "
                      + ", ".join(self.scan.unreadable[:10])) if self.scan.unreadable else ""
        return (
            f"<p>Counted from the label files of {esc(self.view)}. An image counts for every class its label holds; "
            "shares are of all (image, class) pairs and of all foreground pixels. Uniform: each of the run's "
            f"{len(self.classes)} classes an equal share.</p>" + extra + plot
            + table(["class", "images", "% of images", "pixels", "% of pixels", "image share / uniform"], rows) + unread)

    # ------------------------------------------------------------ 5. contact sheets

    def _image(self, sid: str) -> np.ndarray | None:
        try:
            with Image.open(self.pool.image_path(sid)) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError):
            return None

    @staticmethod
    def _mask(path: Path | None) -> np.ndarray | None:
        if path is None:
            return None
        try:
            with Image.open(path) as image:
                return np.asarray(image) if image.mode in ("P", "L") else None
        except (OSError, ValueError):
            return None

    def _row(self, sid: str, masks: Sequence[Path | None], caption: str, values: set[int]) -> str:
        loaded = [self._mask(p) for p in masks]
        for m in loaded:
            if m is not None:
                values.update(int(v) for v in np.unique(m))
        return img(figures.panel_row(self._image(sid), loaded), f"sample {sid}", "jpeg") + f'<p class="caption">{caption}</p>'

    def _sheet(self, heads: Sequence[str], rows: str, values: set[int]) -> str:
        cols = f'<div class="cols" style="grid-template-columns:repeat({len(heads)},1fr)">' + "".join(
            f"<span>{esc(h)}</span>" for h in heads) + "</div>"
        width = len(heads) * (figures.THUMB + 3) + 3
        return legend(values) + f'<div class="sheet" style="max-width:{width}px">{cols}{rows}</div>'

    def _caption(self, sid: str, extra: str = "") -> str:
        row, pool_row = self.rows.get(sid, {}), self.facts.pool_rows.get(sid, {})
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

    def sheets(self) -> str:
        if not self.ids:
            return note("No samples yet.")
        latest = self.facts.latest
        heads = ["image", "attention label", "refined label", "held-out prediction"]
        pred_round = f"round {latest.index}" if latest else "no round finished"
        out = [f"<p>For each class, up to {SHEET_SAMPLES} of {esc(self.view)} whose label holds it — the best, median "
               f"and worst by sample score — as image, attention label, current (refined) label, and the prediction of "
               f"the {esc(pred_round)} model that did not train on the sample. Labels are drawn over the image in the "
               "VOC palette; grey panels are missing files.</p>"]
        scores = {sid: (self.rows.get(sid, {}).get("score") or 0.0) for sid in self.ids}
        links = []
        for c in self.classes:
            k = VOC_CLASSES.index(c)
            holders = sorted((sid for sid in self.ids if self.scan.pixels[self.index[sid], k] > 0),
                             key=lambda s: (-scores[s], s))
            anchor = f"sheet-{c}"
            links.append(f'<a href="#{anchor}">{esc(c)}</a> ({len(holders)})')
            head = f'<h3 id="{anchor}">{esc(c)} — {len(holders):,} sample{"" if len(holders) == 1 else "s"}</h3>'
            if not holders:
                out.append(f"<div>{head}{note(f'No label among {self.view} holds any {c} pixels.')}</div>")
                continue
            picks = list(dict.fromkeys(holders[i] for i in (0, len(holders) // 2, len(holders) - 1)))[:SHEET_SAMPLES]
            values: set[int] = set()
            rows = "".join(
                self._row(sid, [self.pool.mask_path(sid), self.facts.label_path(sid), self.facts.pred_path(sid)],
                          self._caption(sid, rank), values)
                for sid, rank in zip(picks, ("best", "median", "worst") if len(picks) == 3 else ("best", "worst")))
            out.append(f"<div>{head}{self._sheet(heads, rows, values)}</div>")
        intro = out[0] + '<p class="legend">Classes: ' + " · ".join(links) + "</p>"
        return intro + '<div class="sheets">' + "".join(out[1:]) + "</div>"

    # ------------------------------------------------------------ 6. refinement

    def refinement(self) -> str:
        done = self.facts.finished_rounds
        if not done:
            return note("No round has finished yet: nothing was refined.")
        rounds = table(
            ["round", "samples", "pixels relabelled", "dropped", "classes the model may relabel"],
            [[f"round {r.index}", f"{r.stats.get('samples', 0):,}", f"{r.stats.get('pixels_relabelled', 0):,}",
              f"{r.stats.get('dropped', 0):,}", ", ".join(r.stats.get("reliable", [])) or "none"] for r in done], text=[4])
        return rounds + "<h3>Labels that changed most</h3>" + self._changes() + "<h3>Dropped samples</h3>" + self._drops()

    def _changes(self) -> str:
        changed = np.nan_to_num(self.scan.changed, nan=-1.0)
        order = [n for n in np.argsort(-changed, kind="stable") if changed[n] > 0][:SHOWN_CHANGES]
        if not order:
            return note(f"No label of {self.view} differs from its attention label: no round model was reliable "
                        "enough to relabel (as expected of short or early rounds).")
        mean = float(np.nanmean(self.scan.changed)) if np.isfinite(self.scan.changed).any() else math.nan
        values: set[int] = set()
        rows = "".join(
            self._row(self.scan.ids[n], [self.pool.mask_path(self.scan.ids[n]), self.facts.label_path(self.scan.ids[n])],
                      self._caption(self.scan.ids[n], f"{pct(self.scan.changed[n])}% of pixels changed, "
                                    f"{pct(self.scan.to_ignore[n])}% became ignore"), values)
            for n in order)
        return (f"<p>Among {esc(self.view)}, refinement changed {pct(mean)}% of the pixels on average. The "
                f"{len(order)} samples it changed most, before (attention label) and after:</p>"
                + self._sheet(["image", "before: attention label", "after: current label"], rows, values))

    def _drops(self) -> str:
        dropped = sorted((row for row in self.rows.values() if not row.get("kept", True)),
                         key=lambda row: (row.get("score") if row.get("score") is not None else math.inf, row["id"]))
        if not dropped:
            return note("No sample was dropped (a sample is judged once, by the first round whose model is reliable for "
                        "some class; refine.drop_fraction of those judged are dropped).")
        when = {}
        for r in self.facts.finished_rounds:
            for row in r.rows:
                if not row.get("kept", True):
                    when.setdefault(row["id"], r.index)
        values: set[int] = set()
        rows = "".join(
            self._row(row["id"], [self.pool.mask_path(row["id"]), self.facts.pred_path(row["id"], when.get(row["id"]))],
                      self._caption(row["id"], f"dropped in round {when.get(row['id'], '?')}"), values)
            for row in dropped[:SHOWN_DROPS])
        shown = dropped[:DROP_TABLE_ROWS]
        rest = len(dropped) - len(shown)
        listing = table(
            ["sample", "dropped in", "score", "agreement", "confidence", "reason"],
            [[row["id"], f"round {when.get(row['id'], '?')}", _num(row.get("score")), _num(row.get("agreement")),
              _num(row.get("confidence")), row.get("reason") or "—"] for row in shown], text=[5])
        more = note(f"{rest:,} more dropped samples are listed in rounds/{self.facts.latest.index}/samples.jsonl.") \
            if rest > 0 else ""
        return (f"<p>{len(dropped):,} samples were dropped. The {min(len(dropped), SHOWN_DROPS)} lowest scored, with the "
                "held-out prediction of the round that dropped them:</p>"
                + self._sheet(["image", "attention label", "held-out prediction"], rows, values) + listing + more)

    # ------------------------------------------------------------ 7. final

    def final(self) -> str:
        metrics = self.facts.metrics
        if not metrics or not isinstance(metrics.get("per_class_iou"), dict):
            why = "fit ran without --voc-root" if self.facts.checksum else "the final model is not trained yet"
            return note(f"No final evaluation: {why}. python -m syntagen_st.evaluate RUN --voc-root PATH "
                        "writes final/metrics.json.")
        rows = []
        for name in VOC_CLASSES:
            value = metrics["per_class_iou"].get(name)
            bar = Markup(f'<span class="bar" style="width:{round(100 * value)}px"></span>') if isinstance(value, (int, float)) else ""
            rows.append([name, pct(value, 2), bar])
        rows.append([Markup("<strong>mIoU</strong>"), Markup(f"<strong>{pct(metrics.get('mIoU'), 2)}</strong>"), ""])
        images = metrics.get("val_images") or metrics.get("images")
        return (f"<p>The final model (trained on exactly the exported pairs) on VOC 2012 val"
                f"{f', {images:,} images' if isinstance(images, int) else ''}; IoU per class in %.</p>"
                + table(["class", "IoU %", ""], rows, text=[2]))


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
