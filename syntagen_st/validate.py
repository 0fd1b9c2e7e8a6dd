"""``python -m syntagen_st.validate PATH``: check a competition entry, ours or anyone's.

PATH is a folder or a zip in the entry layout (``image/<id>.jpg``, ``mask/<id>.png``,
``train.txt``; optionally under one top folder) or a VOC tree. Every violation is printed as
``file: problem``, then a count per kind and a summary. Exit code 0 only when the entry is valid,
1 when it is not, 2 when PATH cannot be read at all. Nothing is ever written.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .core.cli import command_parser, run_main
from .core.rules import ENTRY_SIZE
from .submission.bundle import DEFAULT_MAX_BYTES, Bundle, UnsafeZip
from .submission.validate import Report, print_report, validate_bundle

PROG = "syntagen_st.validate"


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(f"python -m {PROG}", "Check a competition entry (folder or zip) against the rules.",
                            progress=True)
    parser.add_argument("path", help="an entry folder or zip (image/, mask/, train.txt) or a VOC tree")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="refuse a zip that expands to more bytes than this (zip bombs)")
    parser.add_argument("--image-size", type=int, default=ENTRY_SIZE[0],
                        help="required image side (512; other values only to check smoke runs, which are no entries)")
    ns = parser.parse_args(argv)
    size = (ns.image_size, ns.image_size)
    label = ns.path if size == ENTRY_SIZE else f"{ns.path} (checked for {size[0]}x{size[1]} images: not a competition entry)"
    try:
        bundle = Bundle(ns.path, ns.max_bytes)
    except UnsafeZip as unsafe:
        print_report(Report(problems=unsafe.problems), f"{ns.path} (refused before reading anything)")
        return 1
    with bundle:
        report = validate_bundle(bundle, size, progress=not ns.no_progress and sys.stderr.isatty())
    print_report(report, label)
    return 0 if report.valid else 1


if __name__ == "__main__":
    run_main(main, PROG)
