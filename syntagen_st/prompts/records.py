"""Prompt records: built-in templates, user prompt files, class appending, weighted sampling.

Each sample draws its prompt from its own generator seeded from (run seed, sample id), so a
sample's prompt does not depend on how many samples are generated or in what order.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.classes import FOREGROUND_CLASSES, canonical, classes_in_text, display_name
from ..core.errors import UserError
from ..core.seeds import sample_id, sample_seed

_SCENES: dict[str, tuple[str, ...]] = {
    "aeroplane": ("on an airport runway", "flying in a blue sky", "parked at an airport gate"),
    "bicycle": ("on a city street", "leaning against a brick wall", "on a country road"),
    "bird": ("perched on a branch", "standing on a lawn", "by a lake"),
    "boat": ("on a calm lake", "in a harbour", "on the open sea"),
    "bottle": ("on a kitchen table", "on a bar counter", "on a wooden shelf"),
    "bus": ("on a city street", "at a bus stop", "on a highway"),
    "car": ("on a city street", "in a parking lot", "on a country road"),
    "cat": ("on a sofa", "on a windowsill", "in a garden"),
    "chair": ("in a living room", "in an office", "on a patio"),
    "cow": ("in a green pasture", "on a farm", "in a field"),
    "diningtable": ("in a dining room", "in a restaurant", "in a kitchen"),
    "dog": ("in a park", "on a beach", "in a backyard"),
    "horse": ("in a field", "in front of a stable", "on a dirt track"),
    "motorbike": ("on a road", "in a parking lot", "on a mountain road"),
    "person": ("on a city street", "in a park", "in a living room"),
    "pottedplant": ("on a windowsill", "in a living room", "on a balcony"),
    "sheep": ("in a green pasture", "on a hillside", "on a farm"),
    "sofa": ("in a living room", "in a bright lounge", "in an apartment"),
    "train": ("at a railway station", "on railway tracks", "crossing a bridge"),
    "tvmonitor": ("on a desk", "in a living room", "mounted on a wall"),
}

# Classes that plausibly share a picture with each class, so multi-class prompts look natural.
_COMPANIONS: dict[str, tuple[str, ...]] = {
    "aeroplane": ("person", "car"),
    "bicycle": ("person", "car"),
    "bird": ("boat", "person"),
    "boat": ("person", "bird"),
    "bottle": ("diningtable", "person"),
    "bus": ("car", "person"),
    "car": ("bus", "person", "bicycle"),
    "cat": ("dog", "sofa", "chair"),
    "chair": ("diningtable", "person", "pottedplant", "tvmonitor"),
    "cow": ("sheep", "person"),
    "diningtable": ("chair", "bottle", "person", "pottedplant"),
    "dog": ("person", "cat", "sofa"),
    "horse": ("person",),
    "motorbike": ("person", "car"),
    "person": ("horse", "bicycle", "motorbike", "dog", "boat", "chair", "sofa", "car", "bottle", "diningtable"),
    "pottedplant": ("chair", "sofa", "diningtable"),
    "sheep": ("cow", "dog", "person"),
    "sofa": ("tvmonitor", "cat", "dog", "person", "pottedplant"),
    "train": ("person",),
    "tvmonitor": ("sofa", "chair", "person"),
}
_STYLES = ("a photo of", "a high quality photo of", "a close-up photo of", "a wide shot of", "a candid photo of")
_VIEWS = ("", "front view", "side view", "seen from above", "from a low angle")
_LIGHTS = ("", "in daylight", "at sunset", "on a cloudy day", "at night", "under soft indoor light")
_EXTRA_PROB = (0.55, 0.35, 0.10)  # chance of 0, 1 or 2 companions


@dataclass(frozen=True)
class PromptRecord:
    """One sample's prompt. ``class_prompt`` is what SD sees: the prompt with class names appended."""

    id: str
    round: int
    index: int
    prompt: str
    classes: tuple[str, ...]
    class_prompt: str
    seed: int
    prompt_source: str = "template"
    """Where the caption came from: 'template', 'file' or 'llm'."""

    def to_row(self) -> dict:
        row = asdict(self)
        row["classes"] = list(self.classes)
        return row

    @classmethod
    def from_row(cls, row: dict) -> PromptRecord:
        """The record of a prompt file's or a manifest's row; TypeError / ValueError / KeyError if it is not one."""
        return cls(
            str(row["id"]), int(row["round"]), int(row["index"]), str(row["prompt"]),
            tuple(canonical(c) for c in row["classes"]), str(row["class_prompt"]), int(row["seed"]),
            str(row.get("prompt_source") or "template"),
        )


def append_classes(prompt: str, classes: tuple[str, ...]) -> str:
    """Dataset Diffusion's class prompt: the caption, then '; ' and the class names."""
    return f"{prompt}; " + ", ".join(display_name(c) for c in classes)


def template_vocabulary() -> set[str]:
    """Every word the built-in templates can produce (the tiny tokenizer gives each a token)."""
    texts = [*_STYLES, *_VIEWS, *_LIGHTS, "a an and"]
    texts += [s for scenes in _SCENES.values() for s in scenes]
    texts += [display_name(c) for c in FOREGROUND_CLASSES]
    return {w for t in texts for w in re.findall(r"[a-z]+", t)}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _weighted_choice(rng: np.random.Generator, options: list[str], weights: dict[str, float]) -> str:
    w = np.array([max(weights.get(o, 1.0), 0.0) for o in options], dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def draw_classes(
    rng: np.random.Generator, allowed: list[str], weights: dict[str, float], max_classes: int
) -> tuple[str, ...]:
    """Draw a class by weight and maybe add co-occurring companions (the first class leads)."""
    primary = _weighted_choice(rng, allowed, weights)
    classes = [primary]
    n_extra = int(rng.choice(len(_EXTRA_PROB), p=_EXTRA_PROB))
    for _ in range(min(n_extra, max_classes - 1)):
        options = [c for c in _COMPANIONS[primary] if c in allowed and c not in classes]
        if not options:
            break
        classes.append(_weighted_choice(rng, options, weights))
    return tuple(classes)


def phrase_caption(rng: np.random.Generator, classes: tuple[str, ...]) -> str:
    """A template caption showing ``classes`` in a scene of the first one."""
    subject = " and ".join(_article(display_name(c)) for c in classes)
    parts = [f"{_STYLES[rng.integers(len(_STYLES))]} {subject} {_SCENES[classes[0]][rng.integers(3)]}"]
    parts += [p for p in (_VIEWS[rng.integers(len(_VIEWS))], _LIGHTS[rng.integers(len(_LIGHTS))]) if p]
    return ", ".join(parts)


def template_prompt(
    rng: np.random.Generator, allowed: list[str], weights: dict[str, float], max_classes: int
) -> tuple[str, tuple[str, ...]]:
    """Draw a class by weight, maybe add co-occurring companions, and phrase a caption."""
    classes = draw_classes(rng, allowed, weights, max_classes)
    return phrase_caption(rng, classes), classes




def load_prompt_file(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """Prompts from JSONL ({"prompt": ..., "classes": [...]}) or plain lines.

    Plain lines get the classes their text names. A prompt naming no known class is refused
    with its line number; blank lines and '#' comments are skipped.
    """
    path = Path(path)
    entries: list[tuple[str, tuple[str, ...]]] = []
    jsonl = path.suffix == ".jsonl"
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        if jsonl:
            try:
                row = json.loads(line)
                prompt = str(row["prompt"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f'{where}: expected a JSON object with a "prompt" key') from None
            names = row.get("classes")
            if names is None:
                classes = classes_in_text(prompt)
            else:
                try:
                    classes = tuple(dict.fromkeys(canonical(n) for n in names))
                except (ValueError, AttributeError) as err:
                    raise UserError(f"{where}: {err}") from None
        else:
            prompt, classes = line, classes_in_text(line)
        if not classes:
            raise UserError(f"{where}: the prompt names no known class: {prompt[:60]!r}")
        entries.append((prompt, classes))
    if not entries:
        raise UserError(f"{path}: no prompts in the file")
    return entries


def make_records(
    run_seed: int,
    round_index: int,
    indices: range,
    allowed: list[str],
    weights: dict[str, float] | None = None,
    max_classes: int = 3,
    prompt_file: list[tuple[str, tuple[str, ...]]] | None = None,
) -> list[PromptRecord]:
    """The prompt records of samples ``indices`` of a round; each depends only on its own id."""
    allowed = [canonical(c) for c in allowed]
    weights = weights or {}
    uniform = len({weights.get(c, 1.0) for c in allowed}) <= 1
    records = []
    for index in indices:
        sid = sample_id(round_index, index)
        seed = sample_seed(run_seed, sid)
        rng = np.random.default_rng(seed)
        source = "template" if prompt_file is None else "file"
        if prompt_file is None:
            prompt, classes = template_prompt(rng, allowed, weights, max_classes)
        elif uniform:
            prompt, classes = prompt_file[index % len(prompt_file)]
        else:
            # Steered: a line's weight is the mean weight of the classes it names.
            line_w = np.array([np.mean([weights.get(c, 1.0) for c in cls]) for _, cls in prompt_file])
            prompt, classes = prompt_file[int(rng.choice(len(prompt_file), p=line_w / line_w.sum()))]
        records.append(
            PromptRecord(sid, round_index, index, prompt, classes, append_classes(prompt, classes), seed, source)
        )
    return records

