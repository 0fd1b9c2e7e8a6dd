"""The step runner: each step of the loop runs once, on every rank, and state.json says which are done.

Every rank walks the same steps; rank 0 owns the run folder: it reads state.json for all of
them, clears a step's folder before a redo, and marks a step done once every rank has finished
it. A step writes its files atomically before it is marked done, and an unfinished step is redone
from its start, so a run killed at any point resumes to the same result.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..core.errors import UserError
from ..core.layout import RunLayout
from ..core.store import atomic_write_json
from ..scaleout.dist import Dist

Task = tuple[str, Callable[[], None], Path | None]
"""A step: its name, what it does, and the folder cleared before it (re)starts (or None)."""


class RunState:
    """state.json: the steps that are done, in order, and how long each took."""

    def __init__(self, run: RunLayout) -> None:
        self.path = run.state

    def done(self) -> list[str]:
        if not self.path.exists():
            return []
        try:
            done = json.loads(self.path.read_text())["done"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            done = err
        if not isinstance(done, list) or not all(isinstance(step, str) for step in done):
            raise UserError(f"{self.path}: unreadable run state ({done!r}); pass --overwrite to start again")
        return done

    def mark_done(self, step: str, seconds: float | None = None) -> None:
        """Record ``step`` as done, with how long it took (the report shows the durations)."""
        state = json.loads(self.path.read_text()) if self.path.exists() else {}
        state["done"] = [*self.done(), step]
        if seconds is not None:
            state.setdefault("seconds", {})[step] = round(seconds, 3)
        atomic_write_json(self.path, state)

    def forget(self, which: Callable[[str], bool]) -> None:
        """Mark the done steps ``which`` names as not done (their durations go with them)."""
        if not self.path.exists():
            return
        state = json.loads(self.path.read_text())
        state["done"] = [step for step in self.done() if not which(step)]
        state["seconds"] = {k: v for k, v in state.get("seconds", {}).items() if not which(k)}
        atomic_write_json(self.path, state)


class StepRunner:
    """Runs steps over the ranks of ``dist``; ``title`` names a step as it starts (rank 0 prints it)."""

    def __init__(self, run: RunLayout, dist: Dist, title: Callable[[str], str]) -> None:
        self.state, self.dist, self.title = RunState(run), dist, title

    def pending(self, names: list[str]) -> list[str]:
        """The steps of ``names`` not done yet: rank 0 reads state.json, every rank gets its answer."""
        return self.dist.from_main(lambda: [n for n in names if n not in self.state.done()])

    def step(self, name: str, fn: Callable[[], None], restart: Path | None = None) -> None:
        """A step every rank takes part in (each does its share inside ``fn``)."""
        if self.pending([name]):
            self.together([(name, fn, restart)], every_rank=True)

    def together(self, tasks: list[Task], every_rank: bool) -> None:
        """Rank 0 clears the steps' folders; then every rank runs the step (``every_rank``) or rank i
        runs step i; once all have finished, rank 0 marks them done."""
        if self.dist.is_main:
            for name, _, restart in tasks:
                if restart is not None and restart.exists():
                    # A step killed mid-way starts again from nothing, so the result is the same as an
                    # uninterrupted run's (a Lightning resume of a round model would reshuffle its data).
                    shutil.rmtree(restart)
                print(self.title(name), flush=True)
        self.dist.barrier()
        start = time.perf_counter()
        if every_rank:
            tasks[0][1]()
        elif self.dist.rank < len(tasks):
            tasks[self.dist.rank][1]()
        self.dist.barrier()
        if self.dist.is_main:
            for name, _, _ in tasks:
                self.state.mark_done(name, time.perf_counter() - start)
