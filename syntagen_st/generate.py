"""``python -m syntagen_st.generate --config configs/smoke.yaml --num-images 16 --out runs/demo``

Stable Diffusion images with attention masks, written to OUT/pool; rerun to make more or to
finish an interrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .core.cli import check_out, check_run_folder, config_from, config_parser, prepare_run_folder, run_main
from .core.config import NEUTRAL_KEYS
from .core.layout import RunLayout
from .core.lock import exclusive
from .prompts.rounds import round_records

PROG = "syntagen_st.generate"
FREE_KEYS = NEUTRAL_KEYS | {"train", "refine", "loop"}
"""generate reads no train, refine or loop setting: a run folder may change them."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(
        f"python -m {PROG}", "Generate SD images with attention masks into a pool.",
        sections=("model", "generate", "label"), shortcuts=("num_images", "devices", "num_nodes"), progress=True,
    )
    parser.add_argument("--out", required=True, help="run folder; the pool goes to OUT/pool")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing folder and start again")
    ns = parser.parse_args(argv)
    cfg = config_from(parser, ns)
    # The stages load torch, diffusers and Lightning: only once the flags and the config are good.
    from .generation.preflight import preflight
    from .generation.sampler import SampleGenerator
    from .scaleout.dist import launch
    from .scaleout.watch import watched
    run = RunLayout(check_out(ns.out))
    check_run_folder(run.root, cfg, FREE_KEYS, overwrite=ns.overwrite)
    # --devices N: N processes, each generating its share of the batches (rank 0 owns the folder).
    # Generation has no batch to split: any device count will do.
    dist = launch(cfg.train, split_batch=False)
    with watched(dist, PROG):
        plan = preflight(cfg, cfg.generate.num_images) if dist.is_main else None
        # The lock before the plan: a second generate on a folder in use says only that.
        with dist.main_holds(exclusive(run.lock, str(run.root))):
            if plan:
                print(plan, flush=True)
            dist.main_first(lambda: prepare_run_folder(run.root, cfg, FREE_KEYS, overwrite=ns.overwrite), others=False)
            # Prompts first: a language model writing them is freed before Stable Diffusion loads.
            records = dist.from_main(lambda: round_records(cfg, 0, cfg.generate.num_images, run=run))
            made = SampleGenerator(cfg, device=dist.device).fill(run.pool, records, not ns.no_progress, dist)
            made = int(dist.all_reduce_sum(np.array([made], np.int64))[0])
        if dist.is_main:
            print(f"{made} new samples; the pool at {run.pool.root} holds {len(run.pool.done_ids())}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
