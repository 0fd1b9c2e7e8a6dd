"""The whole job: ``python -m syntagen_st.fit --rounds 3 [--config configs/smoke.yaml]``.

Generates, trains, refines and steers for N rounds, then exports the best <= 10,000 pairs,
trains the fixed protocol on exactly them, evaluates on VOC val when --voc-root is given, and
records the model checksum. Rerunning the same command resumes a killed run.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import config_from, config_parser, prepare_run_folder, run_main
from .data import find_samples, find_voc_samples
from .export import not_an_entry_warning, read_submission
from .distributed import launch
from .loop import Loop, Run
from .preflight import preflight
from .rank_watch import watched


# Settings that do not change a run's results: speed, placement, names, and generate.num_images
# (fit draws from loop.generate_total instead).
_FREE_KEYS = {"name", "model.device", "generate.batch_size", "generate.num_images", "train.num_workers",
              "train.devices", "train.num_nodes", "train.accelerator", "train.logger", "train.wandb_project"}


# Settings a run may continue with after a change (--resume): the later steps use the new values.
_RESUMABLE_KEYS = {"loop.rounds", "loop.generate_total", "loop.max_pairs", "loop.round_steps", "train"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(
        "syntagen_st.fit", "Self-training active refinement: generate, train, refine, export.",
        shortcuts=("rounds", "source", "devices", "num_nodes"), progress=True,
    )
    parser.add_argument("--out", help="run folder (default runs/<name>)")
    parser.add_argument("--voc-root", help="VOC tree to evaluate the final model on (val split)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing run even if the config changed")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start again")
    ns = parser.parse_args(argv)
    cfg = config_from(parser, ns)
    # Everything a user can get wrong is checked before the run folder is touched.
    if cfg.loop.source.startswith("folder:"):
        find_samples(cfg.loop.source[len("folder:"):])
    if ns.voc_root:
        find_voc_samples(ns.voc_root, "val")
    # Every rank re-runs the command up to here; from here on rank 0 alone writes the run's own files.
    dist = launch(cfg.train)
    with watched(dist, "syntagen_st.fit"):
        loop, train = cfg.loop, cfg.train
        if dist.is_main:
            if cfg.loop.source == "sd":
                print(preflight(cfg, cfg.loop.generate_total), flush=True)
            print(f"then {loop.rounds} rounds x {cfg.refine.folds} fold models x {loop.round_steps} steps, and a final "
                  f"{train.arch} training of {train.max_steps:,} steps at batch {train.batch_size}"
                  + (f" over {dist.world} processes" if dist.world > 1 else ""), flush=True)
        root = Path(ns.out) if ns.out else Path("runs") / cfg.name
        dist.main_first(lambda: prepare_run_folder(
            root, cfg, _FREE_KEYS, overwrite=ns.overwrite, resume=ns.resume, resumable=_RESUMABLE_KEYS,
        ), others=False)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        Loop(cfg, Run(root), ns.voc_root, progress=not ns.no_progress, dist=dist).run()
        if not dist.is_main:
            return 0
        checksum = (root / "final" / "checksum.txt").read_text().split()[0]
        print(f"done: {root}/export ({root}/export/submission.json), model sha256 {checksum}")
        warning = not_an_entry_warning(read_submission(root / "export"))
        if warning:
            print(warning, file=sys.stderr)
        return 0


if __name__ == "__main__":
    run_main(main, "syntagen_st.fit")
