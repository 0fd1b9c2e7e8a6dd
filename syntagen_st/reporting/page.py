"""One offline HTML page about a run: ``python -m syntagen_st.report RUN [--out FILE]``.

Writes ``RUN/report/index.html`` (``fit`` writes it after each round and at the end): the run at a
glance, per-class IoU over the rounds, steering, the class balance of the export, per-class
contact sheets, refinement at work and the final evaluation. Every figure is embedded as a data
URI; there is no script and nothing is fetched, so the file opens anywhere. A run that is
unfinished or damaged gives a page that says what is missing.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from ..core.layout import final_step, round_title
from ..core.store import atomic_write_text
from . import sections
from .facts import RunFacts, read_run
from .html import document, esc
from .view import dataset_view


def write_report(run: str | Path, out: str | Path | None = None, progress: bool = False, by_fit: bool = False) -> Path:
    """Write the report of ``run`` to ``out`` (default ``RUN/report/index.html``); return its path.
    ``by_fit``: fit writes it (after a round, or at the end), which the footer says."""
    start = time.perf_counter()
    facts = read_run(run)
    # One pass over the labels feeds the balance, the contact sheets and the changes.
    view = dataset_view(facts, progress)
    parts = [
        ("glance", "The run at a glance", sections.glance(facts)),
        ("iou", "Per-class IoU over the rounds", sections.iou(facts)),
        ("steering", "Steering: prompt weights", sections.steering(facts)),
        ("balance", "Class balance of the export", sections.balance(facts, view)),
        ("sheets", "Per-class contact sheets", sections.sheets(facts, view)),
        ("refinement", "Refinement at work", sections.refinement(facts, view)),
        ("final", "Final evaluation", sections.final(facts)),
    ]
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = (f"Written {written} in {time.perf_counter() - start:.1f} s by {writer(facts, by_fit)}. "
              "Offline page: every figure is embedded.")
    name = facts.config.get("name") or facts.root.name
    path = Path(out) if out else facts.run.report
    atomic_write_text(path, document(name, str(facts.root.resolve()), parts, facts.missing, footer))
    return path


def writer(facts: RunFacts, by_fit: bool) -> str:
    """Who wrote the page, as markup: the report command, or fit after round N of R / at the end."""
    if not by_fit:
        return f"<code>python -m syntagen_st.report {esc(facts.root)}</code>"
    if final_step(facts.planned_rounds, "train") in facts.done_steps:
        when = f"at the end of the run ({facts.planned_rounds} rounds, the export and the final training)"
    else:
        when = f"after {round_title(len(facts.finished_rounds) - 1, facts.planned_rounds)}" if facts.finished_rounds \
            else "before any round finished"
    return f"<code>python -m syntagen_st.fit</code>, {esc(when)}"
