"""What a run resumed with a changed config (``fit --resume``) may keep.

A run's config is its identity: ``reproduce --full`` reruns fit from the config submission.json
records. So a change is honoured only where every round already begun would come out the same
under the new config; the export and the final training are then redone on the new settings.
A change that reaches a begun round is refused in one line naming the keys.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

from ..core.config import Config, LoopConfig, config_differences
from ..core.errors import UserError
from ..core.layout import RunLayout, Step
from .pool import round_budgets
from .runner import RunState

FINAL_ONLY_KEYS = frozenset({"loop.max_pairs", "train.max_steps", "train.checkpoint_every"})
"""Settings only the export and the final training read (the fold models train loop.round_steps)."""


def generated_counts(loop: LoopConfig) -> list[int]:
    """How many images each round generates in a run from scratch (``add_data``'s arithmetic)."""
    counts: list[int] = []
    for r in range(loop.rounds):
        split = loop.budget_split if r == 0 else "equal"
        counts.append(round_budgets(loop.generate_total - sum(counts), loop.rounds - r, split)[0])
    return counts


def first_changed_round(old: Config, new: Config, free: set[str]) -> tuple[int | None, str]:
    """The first round whose results the change reaches (None: only the export and the final
    training), with why."""
    keys = [d.split(":")[0] for d in config_differences(old.to_dict(), new.to_dict(), free)]
    if any(k not in FINAL_ONLY_KEYS and not k.startswith("loop.") for k in keys) or "loop.round_steps" in keys:
        return 0, "its fold models were trained with the old values"
    if not new.loop.source.startswith("folder:"):
        before, after = generated_counts(old.loop), generated_counts(new.loop)
        for r, (a, b) in enumerate(zip(before, after, strict=False)):
            if a != b:
                return r, f"round {r + 1} generates {b} images with them, not {a}"
    if new.loop.rounds < old.loop.rounds:
        return new.loop.rounds, f"a run of {old.loop.rounds} rounds cannot become one of {new.loop.rounds}"
    return None, ""


def begun_rounds(run: RunLayout, rounds: int) -> set[int]:
    """The rounds (of the first ``rounds``, and any with a step or a folder) that have anything on
    disk: a done step, samples, saved prompts or a round folder."""
    begun = {Step.parse(name).number for name in RunState(run).done() if name.startswith("round")}
    begun |= {int(row["round"]) for row in run.pool.rows() if isinstance(row.get("round"), int)}
    begun |= {r for r in range(rounds) if run.prompts(r).exists()}
    return begun | set(run.rounds_on_disk())


def plan_resume(run: RunLayout, new: Config, free: set[str]) -> Callable[[Config], Callable[[], None]]:
    """``prepare_run_folder``'s check of a changed config against the run's saved one: a UserError
    saying why when a begun round depends on the change, else what makes the run continue under it (the
    export and the final training forgotten, so they are redone)."""

    def check(old: Config) -> Callable[[], None]:
        first, why = first_changed_round(old, new, free)
        if first is not None and any(r >= first for r in begun_rounds(run, max(old.loop.rounds, new.loop.rounds))):
            raise UserError(f"{why}, and round {first + 1} has already begun")
        return lambda: redo_final(run)

    return check


def redo_final(run: RunLayout) -> None:
    """Forget the export and the final training, and delete them: the next steps make them anew."""
    RunState(run).forget(lambda name: Step.parse(name).stage == "final")
    for folder in (run.export.root, run.final.root):
        if folder.exists():
            shutil.rmtree(folder)
