"""The whole job: ``python -m syntagen_st.fit --rounds 3 [--config configs/smoke.yaml]``.

Generates, trains, refines and steers for N rounds, then exports the best <= 10,000 pairs,
trains the fixed protocol on exactly them, evaluates on VOC val when --voc-root is given, and
records the model checksum. Rerunning the same command resumes a killed run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import config_from, config_parser, config_yaml, load_config_file, run_main
from .config import config_differences
from .data import find_samples, find_voc_samples
from .errors import UserError
from .export import not_an_entry_warning, read_submission
from .loop import Loop, Run
from .preflight import preflight
from .store import atomic_write_text


# Settings that do not change a run's results: speed, placement, names, and generate.num_images
# (fit draws from loop.generate_total instead).
_FREE_KEYS = {"name", "model.device", "generate.batch_size", "generate.num_images", "train.num_workers",
              "train.devices", "train.accelerator", "train.logger", "train.wandb_project"}


# Settings a run may continue with after a change (--resume): the later steps use the new values.
_RESUMABLE_KEYS = {"loop.rounds", "loop.generate_total", "loop.max_pairs", "loop.round_steps", "train"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser("syntagen_st.fit", "Self-training active refinement: generate, train, refine, export.")
    parser.add_argument("--rounds", type=int, help="shortcut for --loop.rounds")
    parser.add_argument("--source", help="shortcut for --loop.source: 'sd' or 'folder:PATH'")
    parser.add_argument("--out", help="run folder (default runs/<name>)")
    parser.add_argument("--voc-root", help="VOC tree to evaluate the final model on (val split)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing run even if the config changed")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start again")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    if ns.rounds is not None:
        ns.loop.rounds = ns.rounds
    if ns.source is not None:
        ns.loop.source = ns.source
    cfg = config_from(parser, ns)
    # Everything a user can get wrong is checked before the run folder is touched.
    if cfg.loop.source.startswith("folder:"):
        find_samples(cfg.loop.source[len("folder:"):])
    if ns.voc_root:
        find_voc_samples(ns.voc_root, "val")
    if cfg.loop.source == "sd":
        print(preflight(cfg, cfg.loop.generate_total), flush=True)
    loop, train = cfg.loop, cfg.train
    print(f"then {loop.rounds} rounds x {cfg.refine.folds} fold models x {loop.round_steps} steps, and a final "
          f"{train.arch} training of {train.max_steps:,} steps at batch {train.batch_size}", flush=True)
    root = Path(ns.out) if ns.out else Path("runs") / cfg.name
    saved = root / "config.yaml"
    if saved.exists():
        old = load_config_file(str(saved)).to_dict()
        diffs = config_differences(old, cfg.to_dict(), _FREE_KEYS)
        if diffs and not (ns.resume or ns.overwrite):
            raise UserError(
                f"{root} holds a run with another config ({'; '.join(diffs[:3])}); "
                "pass --resume to continue it with this config or --overwrite to start again"
            )
        fixed = config_differences(old, cfg.to_dict(), _FREE_KEYS | _RESUMABLE_KEYS)
        if ns.resume and fixed:
            raise UserError(
                f"cannot resume {root} with changed {'; '.join(fixed[:3])}: its samples and folds depend on "
                "them; pass --overwrite to start again"
            )
        if ns.overwrite:
            shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()) and not ns.overwrite:
        raise UserError(f"{root} exists and is not a syntagen_st run; choose another --out or pass --overwrite")
    elif ns.overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, config_yaml(cfg))
    if ns.no_progress:
        os.environ["SYNTAGEN_PROGRESS"] = "0"  # Lightning's bars too
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    Loop(cfg, Run(root), ns.voc_root, progress=not ns.no_progress).run()
    checksum = (root / "final" / "checksum.txt").read_text().split()[0]
    print(f"done: {root}/export ({root}/export/submission.json), model sha256 {checksum}")
    warning = not_an_entry_warning(read_submission(root / "export"))
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main, "syntagen_st.fit")
