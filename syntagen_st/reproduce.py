"""``python -m syntagen_st.reproduce RUN_OR_EXPORT [--ids ID ...] [--sample K] [--full] [--into DIR]``

Regenerate samples from the recorded seed, prompt and model and compare them with the dataset
(images identical, else max / mean pixel difference and PSNR; attention labels: pixel
agreement). ``--full`` reruns the whole ``fit`` from the recorded config into a new folder and
compares the exports, the final model checksum included. Exit code 0 when everything compared is
identical (or every PSNR reaches --min-psnr), else 1.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import fit
from .core.cli import command_parser, run_main
from .core.config import Config
from .core.errors import UserError

PROG = "syntagen_st.reproduce"
DEFAULT_SAMPLE = 8
"""Samples regenerated without --ids or --sample."""


def run_fit(cfg: Config, into: Path) -> None:
    """The fit command on ``cfg``, into the run folder ``into``."""
    with tempfile.TemporaryDirectory(prefix="syntagen-reproduce-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(cfg.to_yaml())
        fit.main(["--config", str(config_file), "--out", str(into), "--no-progress"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser(f"python -m {PROG}", "Regenerate a dataset's samples from its seed and compare.",
                            progress=True)
    parser.add_argument("source", help="a run folder, or an export (folder or zip) with submission.json")
    parser.add_argument("--ids", nargs="+", default=None, help="the sample ids to regenerate")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="regenerate K random samples")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the random pick")
    parser.add_argument("--full", action="store_true", help="rerun the whole fit from the recorded config and compare exports")
    parser.add_argument("--into", default=None, help="--full's run folder (default: SOURCE-reproduced beside it)")
    parser.add_argument("--model", default=None, help="the SD weights here (hub id or folder), if not where recorded")
    parser.add_argument("--device", default=None, help="model.device for generation (auto, cpu, cuda:N)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="regenerate in batches of N instead of each sample's recorded batch length (then not bit-exact)")
    parser.add_argument("--min-psnr", type=float, default=None, help="also accept images at or above this PSNR (dB)")
    ns = parser.parse_args(argv)
    # The generator loads torch and diffusers: only once the flags are known to be good.
    import torch

    from .submission.reproduce import full, open_source, pick_ids, print_samples, regenerate, resolve_config

    if ns.sample < 1:
        raise UserError(f"--sample must be >= 1, got {ns.sample}")
    source = open_source(ns.source)
    try:
        cfg = resolve_config(source, ns.model, ns.device, ns.batch_size, ns.full)
        if ns.full:
            base = Path(ns.source.rstrip("/"))
            into = Path(ns.into) if ns.into else base.with_name(f"{base.stem}-reproduced")
            return 0 if full(source, cfg, into, run_fit) else 1
        ids = pick_ids(source.rows, ns.ids, ns.sample, ns.sample_seed)
        print(f"regenerating {len(ids)} of {len(source.rows)} samples of {source.label} "
              f"({cfg.model.pretrained} on {cfg.model.device}, batches {ns.batch_size or 'as recorded'}, "
              f"{torch.get_num_threads()} CPU threads, seed {cfg.seed})")
        results = regenerate(source, cfg, ids, not ns.no_progress, ns.batch_size)
        identical = print_samples(results, source.labels_are)
        close = ns.min_psnr is not None and min(r["psnr"] for r in results) >= ns.min_psnr
        return 0 if identical or close else 1
    finally:
        if source.bundle is not None:
            source.bundle.close()


if __name__ == "__main__":
    run_main(main, PROG)
