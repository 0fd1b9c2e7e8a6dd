"""``python -m syntagen_st.report RUN [--out FILE]``

One offline HTML page about a run (``RUN/report/index.html`` by default); ``fit`` writes it
after each round and at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

from .core.cli import command_parser, run_main
from .core.layout import RunLayout
from .core.lock import exclusive

PROG = "syntagen_st.report"


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(f"python -m {PROG}", "Write the HTML report of a run.", progress=True)
    parser.add_argument("run", help="run folder written by python -m syntagen_st.fit")
    parser.add_argument("--out", help="HTML file (default RUN/report/index.html)")
    ns = parser.parse_args(argv)
    # The stages load torch, diffusers and Lightning: only once the flags and the config are good.
    from .reporting.page import write_report

    run = RunLayout(ns.run)
    # A run that fit is writing would be read half-written: refused (fit writes the report itself).
    with exclusive(run.lock, str(run.root)) if RunLayout.is_run(run.root) else nullcontext():
        path = write_report(ns.run, ns.out, progress=not ns.no_progress)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
