"""``python -m syntagen_st.fit --rounds 3 [--config configs/smoke.yaml]``: the whole job.

Generates, trains, refines and steers for N rounds, then exports the best <= 10,000 pairs,
trains the fixed protocol on exactly them, evaluates on VOC val when --voc-root is given, and
records the model checksum. Rerunning the same command resumes a killed run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .core.cli import check_out, check_run_folder, config_from, config_parser, prepare_run_folder, run_main
from .core.config import NEUTRAL_KEYS, Config
from .core.errors import UserError, first_line
from .core.layout import RunLayout
from .core.lock import exclusive
from .core.rules import ENTRY_SIZE

PROG = "syntagen_st.fit"
RESUMABLE_KEYS = {"loop.rounds", "loop.generate_total", "loop.max_pairs", "loop.round_steps", "train"}
"""Settings a run may continue with after a change (--resume), where no round already begun depends
on them (``selftrain.resume``): the later steps, the export and the final training use the new values."""

log = logging.getLogger(__name__)


def report_writer(run: RunLayout):
    """The report of ``run`` so far, written after each round: a disk that refuses it costs a warning,
    not the run (a bug in the report is a bug, and stops the command)."""

    def write() -> None:
        from .reporting.page import write_report

        try:
            write_report(run.root, by_fit=True)
        except OSError as err:
            log.warning("report not written: %s", first_line(err))

    return write


def _repair(run: RunLayout, cfg: Config, progress: bool) -> None:
    from .selftrain.repair import repair_pool

    ids = repair_pool(run, cfg, progress)
    print(f"repaired {len(ids)} pool samples from their seeds: {', '.join(ids)}" if ids
          else "repair: every pool sample is whole", flush=True)


def next_commands(cfg: Config, run: RunLayout) -> str:
    """What to run after fit: export the entry and its zip, then check it (at the run's image
    size when that is not the competition's, as the smoke config's 128 px)."""
    gen = cfg.generate
    size = f" --image-size {gen.width}" if cfg.loop.source == "sd" and gen.width == gen.height != ENTRY_SIZE[0] else ""
    return (f"next: python -m syntagen_st.export {run.root} --out submission --zip, "
            f"then python -m syntagen_st.validate submission.zip{size}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(
        f"python -m {PROG}", "Self-training active refinement: generate, train, refine, export.",
        shortcuts=("rounds", "source", "devices", "num_nodes"), progress=True, images=True,
    )
    parser.add_argument("--out", help="run folder (default runs/<name>)")
    parser.add_argument("--voc-root", help="VOC tree to evaluate the final model on (val split)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each fold model's Lightning checkpoint after its round is refined (by default "
                             "they are deleted then: no resume needs them, and model.safetensors stays)")
    parser.add_argument("--repair", action="store_true",
                        help="first check every pool sample and regenerate the damaged ones from their seeds "
                             "(bit-identical), then go on")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing run even if the config changed")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start again")
    ns = parser.parse_args(argv)
    cfg = config_from(parser, ns)
    if ns.repair and ns.overwrite:
        raise UserError("--repair keeps the run and --overwrite deletes it: choose one")
    # The stages load torch, diffusers and Lightning: only once the flags and the config are good.
    from .generation.preflight import preflight
    from .scaleout.dist import launch
    from .scaleout.watch import watched
    from .segmentation.data import SampleError, find_samples, find_voc_samples
    from .selftrain.loop import run_loop
    from .selftrain.repair import damage_hint
    from .selftrain.resume import plan_resume
    from .selftrain.steps import Job
    from .submission.export import not_an_entry_warning, read_submission

    # Everything a user can get wrong is checked before the run folder is touched.
    run = RunLayout(check_out(ns.out or f"runs/{cfg.name}"))
    folder = {"free": set(NEUTRAL_KEYS), "overwrite": ns.overwrite, "resume": ns.resume, "resumable": RESUMABLE_KEYS,
              "plan_resume": plan_resume(run, cfg, set(NEUTRAL_KEYS))}
    check_run_folder(run.root, cfg, **folder)
    if cfg.loop.source.startswith("folder:"):
        find_samples(cfg.loop.source[len("folder:"):])
    if ns.voc_root:
        find_voc_samples(ns.voc_root, "val")
    if ns.repair and not RunLayout.is_run(run.root):
        raise UserError(f"--repair: {run.root} holds no run to repair")
    # Every rank re-runs the command up to here; from here on rank 0 alone writes the run's own files.
    dist = launch(cfg.train)
    with watched(dist, PROG):
        loop, train = cfg.loop, cfg.train
        plan = None
        if dist.is_main:
            plan = [preflight(cfg, cfg.loop.generate_total)] if cfg.loop.source == "sd" else []
            plan.append(f"then {loop.rounds} rounds x {cfg.refine.folds} fold models x {loop.round_steps} steps, and a "
                        f"final {train.arch} training of {train.max_steps:,} steps at batch {train.batch_size}"
                        + (f" over {dist.world} processes" if dist.world > 1 else ""))
        # The lock before the plan: a second fit on a folder in use says only that.
        with dist.main_holds(exclusive(run.lock, str(run.root))):
            if plan:
                print("\n".join(plan), flush=True)
            dist.main_first(lambda: prepare_run_folder(run.root, cfg, **folder), others=False)
            if ns.repair:
                dist.main_first(lambda: _repair(run, cfg, not ns.no_progress), others=False)
            job = Job(cfg, run, dist, progress=not ns.no_progress, voc_root=ns.voc_root,
                      keep_checkpoints=ns.keep_checkpoints)
            try:
                run_loop(job, after_round=report_writer(run))
            except SampleError as err:
                raise UserError(damage_hint(err, run)) from None
        if not dist.is_main:
            return 0
        print(f"done: {run.export.root} ({run.export.submission}), model sha256 {run.final.read_checksum()}")
        print(f"report: {run.report}")
        print(next_commands(cfg, run))
        warning = not_an_entry_warning(read_submission(run.export.root))
        if warning:
            print(warning, file=sys.stderr)
        return 0


if __name__ == "__main__":
    run_main(main, PROG)
