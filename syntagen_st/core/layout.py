"""Where everything of a run lives, and the names of its steps: the one owner of the on-disk layout.

A run folder (``fit`` and ``generate`` write it)::

    config.yaml  state.json  .lock                  .lock: held by the command writing the folder
    pool/{images,masks,scores,manifest}/          the samples with their attention labels
    prompts/round<r>.jsonl  round<r>.stats.json   each round's prompt records (and the LLM's counts)
    rounds/<r>/fold<k>/                           a training output (below) per fold model
    rounds/<r>/{labels,pred}/<id>.png             refined labels, held-out predictions
    rounds/<r>/{stats.json,weights.json,samples.jsonl}
    export/                                       the entry (below)
    final/                                        the fixed protocol's training output, export_digest.txt
    report/index.html

A training output (``train --out``, each fold model, ``final/``): model.safetensors,
checksum.txt, checkpoints/last.ckpt, train_config.yaml, metrics.json, wandb_id.txt.

An entry (``export --out``): image/<id>.jpg, mask/<id>.png, train.txt, submission.json,
README.md, and VOCdevkit/VOC2012/ linking to the same files.

Step names in state.json are ``round<r>/data``, ``round<r>/fold<k>``, ``round<r>/refine``,
``final<R>/export`` and ``final<R>/train`` (R: the round count they followed).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .store import Pool

_STEP = re.compile(r"^(round|final)(\d+)/(\w+)$")


@dataclass(frozen=True)
class Step:
    """A step of the loop: ``Step("round", 1, "fold0")`` is ``round1/fold0``."""

    stage: str
    """'round' or 'final'."""
    number: int
    """The round index, or for 'final' the number of rounds it followed."""
    task: str
    """data, fold<k>, refine (rounds); export, train (final)."""

    def __str__(self) -> str:
        return f"{self.stage}{self.number}/{self.task}"

    @classmethod
    def parse(cls, name: str) -> Step:
        match = _STEP.match(name)
        if match is None:
            raise ValueError(f"not a step name: {name!r}")
        return cls(match.group(1), int(match.group(2)), match.group(3))

    @property
    def fold(self) -> int | None:
        """k of a ``fold<k>`` task, else None."""
        return int(self.task[4:]) if self.task.startswith("fold") and self.task[4:].isdigit() else None


def round_step(r: int, task: str) -> str:
    return str(Step("round", r, task))


def fold_step(r: int, k: int) -> str:
    return round_step(r, f"fold{k}")


def final_step(rounds: int, task: str) -> str:
    return str(Step("final", rounds, task))


def round_title(r: int | None, rounds: int | None = None) -> str:
    """Round ``r`` as people read it, counted from 1: 'round 1', 'round 1 of 3' (None: 'round ?').

    On disk and in state.json rounds count from 0 (rounds/0, round0/data, final3/...), which
    reproduce depends on; every text a person reads (terminal, report, card, W&B) uses this.
    """
    return ("round ?" if r is None else f"round {r + 1}") + (f" of {rounds}" if rounds else "")


def round_tasks(folds: int) -> list[str]:
    """A round's tasks, in order."""
    return ["data", *(f"fold{k}" for k in range(folds)), "refine"]


LOCK = ".lock"
"""The file a command holds (flock) while it writes a run folder or a training output."""


class TrainOutput:
    """The folder of one training: weights, checksum, checkpoint, settings, metrics."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.lock = self.root / LOCK
        self.weights = self.root / "model.safetensors"
        self.checksum = self.root / "checksum.txt"
        self.checkpoints = self.root / "checkpoints"
        self.last_checkpoint = self.checkpoints / "last.ckpt"
        self.settings = self.root / "train_config.yaml"
        self.metrics = self.root / "metrics.json"

    def read_checksum(self) -> str:
        """The sha256 in checksum.txt (``<sha256>  <name>``)."""
        return self.checksum.read_text().split()[0]


class EntryLayout:
    """The files of an exported entry."""

    VOC = Path("VOCdevkit") / "VOC2012"
    SUBMISSION = "submission.json"
    CARD = "README.md"
    TRAIN_LIST = "train.txt"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.submission = self.root / self.SUBMISSION
        self.card = self.root / self.CARD
        self.train_list = self.root / self.TRAIN_LIST
        self.voc = self.root / self.VOC
        # Beside the entry, not in it: an entry holds only what it uploads.
        whole = Path(os.path.abspath(self.root))  # "." has no name of its own
        self.lock = whole.with_name(f".{whole.name}{LOCK}")

    @staticmethod
    def image_name(sid: str) -> str:
        return f"image/{sid}.jpg"

    @staticmethod
    def mask_name(sid: str) -> str:
        return f"mask/{sid}.png"

    def image(self, sid: str) -> Path:
        return self.root / self.image_name(sid)

    def mask(self, sid: str) -> Path:
        return self.root / self.mask_name(sid)


class RunLayout:
    """Every path of a run folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.lock = self.root / LOCK
        self.state = self.root / "state.json"
        self.pool = Pool(self.root / "pool")
        self.prompts_dir = self.root / "prompts"
        self.rounds_dir = self.root / "rounds"
        self.export = EntryLayout(self.root / "export")
        self.final = TrainOutput(self.root / "final")
        self.export_digest = self.final.root / "export_digest.txt"
        self.report = self.root / "report" / "index.html"

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a run's pool (its config may still be missing)."""
        return (Path(path) / "pool" / "manifest").is_dir()

    def prompts(self, r: int) -> Path:
        return self.prompts_dir / f"round{r}.jsonl"

    def prompt_stats(self, r: int) -> Path:
        return self.prompts_dir / f"round{r}.stats.json"

    def round_dir(self, r: int) -> Path:
        return self.rounds_dir / str(r)

    def fold(self, r: int, k: int) -> TrainOutput:
        return TrainOutput(self.round_dir(r) / f"fold{k}")

    def label_name(self, r: int, sid: str) -> str:
        """A refined label's path relative to the run folder, as samples.jsonl records it."""
        return f"rounds/{r}/labels/{sid}.png"

    def label(self, r: int, sid: str) -> Path:
        return self.root / self.label_name(r, sid)

    def prediction(self, r: int, sid: str) -> Path:
        return self.round_dir(r) / "pred" / f"{sid}.png"

    def stats(self, r: int) -> Path:
        return self.round_dir(r) / "stats.json"

    def weights(self, r: int) -> Path:
        return self.round_dir(r) / "weights.json"

    def samples(self, r: int) -> Path:
        return self.round_dir(r) / "samples.jsonl"

    def rounds_on_disk(self) -> list[int]:
        """The rounds that have a folder, in order."""
        return sorted(int(d.name) for d in self.rounds_dir.glob("*") if d.is_dir() and d.name.isdigit())

    def latest_samples(self) -> Path | None:
        """samples.jsonl of the highest round that has one: the current labels."""
        done = [r for r in self.rounds_on_disk() if self.samples(r).is_file()]
        return self.samples(done[-1]) if done else None
