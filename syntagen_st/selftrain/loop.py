"""The self-training rounds, step by step, resumable.

A round: generate its share of the budget (or import a folder in round 0), train K fold models
on the current labels, predict every active sample with the fold model that did not train on
it, then relabel, score, filter and steer. After the last round: select the best <= max_pairs,
export them, train the fixed protocol on exactly the exported files, evaluate, checksum.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..core.layout import final_step, fold_step, round_step
from .dashboard import RoundLogger
from .pool import active_samples
from .runner import StepRunner
from .steps import (
    Job,
    add_data,
    export_final,
    final_stale,
    prune_fold_checkpoints,
    refine_round,
    train_final,
    train_fold,
)
from .summary import step_title


def run_loop(job: Job, after_round: Callable[[], None] | None = None) -> None:
    """Every round, then the export and the final training. ``after_round`` runs on rank 0 after
    each round and at the end (``fit`` writes the report there)."""
    cfg, run, dist = job.cfg, job.run, job.dist
    rounds = cfg.loop.rounds
    runner = StepRunner(run, dist, partial(step_title, rounds=rounds, folds=cfg.refine.folds))
    reporter = RoundLogger(cfg, run)

    def done_with_round() -> None:
        if after_round is not None and dist.is_main:
            after_round()

    for r in range(rounds):
        runner.step(round_step(r, "data"), partial(add_data, job, r))
        _train_folds(job, runner, r)
        runner.step(round_step(r, "refine"), partial(refine_round, job, r, reporter))
        if not job.keep_checkpoints and dist.is_main:
            prune_fold_checkpoints(run, r, cfg.refine.folds)
        done_with_round()
    # Named after the round count: a run resumed with more rounds exports and trains again.
    runner.step(final_step(rounds, "export"), partial(export_final, job), restart=run.export.root)
    stale = dist.is_main and final_stale(run)
    runner.step(final_step(rounds, "train"), partial(train_final, job), restart=run.final.root if stale else None)
    if dist.is_main:
        reporter.finish()
    done_with_round()


def _train_folds(job: Job, runner: StepRunner, r: int) -> None:
    """The round's fold models, one per rank at a time: all K at once with >= K processes, in turn
    with fewer. Each rank trains on rank 0's reading of the pool: a step that only some ranks take
    must not read the folder collectively."""
    folds = {fold_step(r, k): k for k in range(job.cfg.refine.folds)}
    pending = runner.pending(list(folds))
    if not pending:
        return
    active = job.dist.from_main(lambda: active_samples(job.run))
    tasks = [(name, partial(train_fold, job, r, folds[name], active), job.run.fold(r, folds[name]).root)
             for name in pending]
    for start in range(0, len(tasks), job.dist.world):
        runner.together(tasks[start : start + job.dist.world], every_rank=False)
