"""The report's small HTML vocabulary: escaping, embedded images, tables, notes, the page shell.

Self-contained on purpose: the page carries its own CSS and every image as a data URI, so it
opens anywhere, offline.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from html import escape

from PIL import Image

from ..core.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES
from . import figures


class Markup(str):
    """HTML that is inserted as it is."""


def esc(value: object) -> str:
    return escape(str(value))


def img(data: bytes, alt: str, fmt: str = "png") -> str:
    """An image embedded as a data URI, with its size so the page does not reflow as it loads."""
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


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"


def num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


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
    """The colour key of the label values a contact sheet shows."""
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


def document(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], missing: Sequence[str],
             footer: str) -> str:
    """The whole page: a numbered section per (anchor, title, body), a contents line, and a
    warning box that lists what is ``missing`` (``footer`` is markup)."""
    nav = "\n".join(f'<a href="#{key}">{n}. {esc(name)}</a>' for n, (key, name, _) in enumerate(sections, 1))
    warning = ""
    if missing:
        items = "".join(f"<li>{esc(m)}</li>" for m in missing)
        warning = f'<div class="missing"><strong>This run is incomplete.</strong><ul>{items}</ul></div>'
    body = "".join(f'<section id="{key}"><h2>{n}. {esc(name)}</h2>{content}</section>'
                   for n, (key, name, content) in enumerate(sections, 1))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}: syntagen_st run report</title><style>{CSS}</style></head><body><main>"
        f"<h1>Run {esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p><nav>{nav}</nav>{warning}{body}"
        f"<footer>{footer}</footer></main></body></html>\n"
    )
