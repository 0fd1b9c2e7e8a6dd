"""``python -m syntagen_st.export RUN --out DIR [--zip]``: a run's selected samples as the entry to upload.

- ``DIR/image/<id>.jpg`` (512x512 RGB), ``DIR/mask/<id>.png`` (8-bit palette, values 0..20 and
  255), ``DIR/train.txt``: the layout the 2024 entries uploaded;
- ``DIR/VOCdevkit/VOC2012/``: links to the same files, for torchvision's VOCSegmentation;
- ``DIR/submission.json`` (seed, config, weights, versions, checksums) and ``DIR/README.md``, the card;
- ``--zip``: ``DIR.zip``, deterministic (sorted entries, fixed timestamps, no links).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from .core.cli import check_out, command_parser, load_run_config, run_main
from .core.config import Config
from .core.errors import UserError
from .core.layout import EntryLayout, RunLayout
from .core.lock import exclusive

PROG = "syntagen_st.export"


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(f"python -m {PROG}", "Export a run's selected samples as a competition entry.",
                            progress=True)
    parser.add_argument("run", help="a run folder (made by fit)")
    parser.add_argument("--out", required=True, help="the export folder (an earlier export there is replaced)")
    parser.add_argument("--zip", action="store_true", help="also write OUT.zip (deterministic, no links)")
    ns = parser.parse_args(argv)
    run, out = RunLayout(ns.run), check_out(ns.out)
    if Path.cwd().is_relative_to(out.resolve()):
        raise UserError(f"--out {ns.out} holds the current folder, and an export replaces its folder whole; "
                        "choose a folder of its own, e.g. submission")
    if not run.config.is_file() or not run.pool.root.is_dir():
        raise UserError(f"{run.root}: not a run folder (no config.yaml and pool/)")
    if ns.zip:
        check_out(out.with_name(out.name + ".zip"), "--zip: the zip", file=True)
    cfg = load_run_config(run.config)
    check_finished(run, cfg)
    with exclusive(run.lock, str(run.root)), exclusive(EntryLayout(out).lock, str(out)):
        check_finished(run, cfg)  # again: a fit may have ended between the two
        return _export(run, cfg, out, ns.zip, not ns.no_progress)


def check_finished(run: RunLayout, cfg: Config) -> None:
    """Every round of the run is done: the export reads each round's labels and weights."""
    # The stages load torch and Lightning: only once the flags are known to be good.
    from .selftrain.runner import RunState
    from .selftrain.selection import unfinished_round

    missing = unfinished_round(RunState(run).done(), cfg.loop.rounds, cfg.refine.folds)
    if missing == 0 and not RunState(run).done():
        raise UserError(f"{run.root}: no round of fit has run on it (a folder made by generate holds samples only); "
                        "run fit on it to make an entry")
    if missing is not None:
        raise UserError(f"{run.root}: round {missing + 1} of {cfg.loop.rounds} not finished; rerun fit to resume")


def _export(run: RunLayout, cfg: Config, out: Path, zip_too: bool, progress: bool) -> int:
    from .selftrain.selection import selected
    from .submission.export import export_run, not_an_entry_warning, read_submission, record_model, write_zip

    # The final model trained on RUN/export: its checksum belongs to an export of the same files.
    fitted = read_submission(run.export.root) if run.export.submission.is_file() else {}
    submission = export_run(cfg, run, selected(run, cfg), out, progress=progress)
    print(f"exported {submission['pairs']} pairs to {out} (image/, mask/, train.txt, VOCdevkit/, "
          f"{EntryLayout.SUBMISSION}, {EntryLayout.CARD})")
    if fitted.get("model_sha256") and fitted.get("files") == submission["files"]:
        record_model(out, fitted["model_sha256"])
        print(f"final model sha256: {fitted['model_sha256']}")
    else:
        print(f"final model sha256: none: no final model of {run.root} was trained on these files (run fit to the end)")
    if zip_too:
        zip_path = out.with_name(out.name + ".zip")
        print(f"zip: {zip_path} sha256 {write_zip(out, zip_path)}")
    warning = not_an_entry_warning(read_submission(out))
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
