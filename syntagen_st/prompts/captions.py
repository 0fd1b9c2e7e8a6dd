"""Captions written by a language model: parse its answer, check each caption, drop near-duplicates.

Pure text functions, so every rule is tested on hand-written answers. A caption that names a
VOC class it was not asked for gets that class added to its class list (the image will likely
show it, and an unnamed object would be labelled background), as long as the class is allowed
and the list stays within ``max_classes``; otherwise it is dropped. A caption whose class
prompt would not fit the text encoder is dropped, not cut: a cut caption reads as broken text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..core.classes import display_name
from .records import append_classes, classes_in_text

# A list marker at the start of a line: "1.", "2)", "(3)", "#4", "-", "*", "•", "Caption 5:".
_MARKER = re.compile(r"^\s*(?:(?:caption|prompt)\s*\d*\s*[:.)-]|\(?#?\d{1,3}\s*[.):\]-]|[-*•·–]|>)\s*", re.I)
_QUOTED = re.compile(r"[\"“”„«»]([^\"“”„«»]{8,})[\"“”„«»]")
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset("a an the of in on at with and by to is are its their his her from".split())
MIN_WORDS = 3


@dataclass(frozen=True)
class Verdict:
    """A checked caption: its final classes when accepted, else the reason it was dropped."""

    caption: str
    classes: tuple[str, ...] = ()
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def _clean(text: str) -> str:
    text = text.replace("**", "").replace("__", "").strip()
    quoted = _QUOTED.search(text)
    if quoted:  # '1. "A dog on a sofa" - cozy' keeps the quoted caption only
        text = quoted.group(1)
    text = text.strip().strip("\"'“”‘’`«» ").strip()
    return re.sub(r"\s+", " ", text).rstrip(" .;:,")


def parse_captions(answer: str) -> list[str]:
    """The caption lines of a model's answer.

    Lines with a list marker (numbers, bullets, "Caption 3:") are captions; when the answer
    has such lines, the others are stray text ("Sure! Here are ..."). Without any marker,
    every non-empty line is a caption. Markdown emphasis, quotes and a final period go.
    """
    lines = [line for line in answer.splitlines() if line.strip()]
    marked = [bool(_MARKER.match(line)) for line in lines]
    if any(marked):
        lines = [_MARKER.sub("", line, count=1) for line, m in zip(lines, marked) if m]
    captions = []
    for line in lines:
        if line.replace("*", "").rstrip().endswith(":"):  # a heading: "Here are the captions:"
            continue
        text = _clean(line)
        if text:
            captions.append(text)
    return captions


def check_caption(
    caption: str,
    requested: tuple[str, ...],
    allowed: set[str],
    max_classes: int,
    count_tokens: Callable[[str], int],
    max_tokens: int,
) -> Verdict:
    """Accept ``caption`` for the classes ``requested``, with the classes it ends up naming."""
    if len(_WORD.findall(caption.lower())) < MIN_WORDS:
        return Verdict(caption, reason="too short")
    named = classes_in_text(caption)
    missing = [c for c in requested if c not in named]
    if missing:
        return Verdict(caption, reason="does not name " + ", ".join(display_name(c) for c in missing))
    extra = tuple(c for c in named if c not in requested)
    barred = [c for c in extra if c not in allowed]
    if barred:
        return Verdict(caption, reason="names another class: " + ", ".join(display_name(c) for c in barred))
    classes = tuple(requested) + extra
    if len(classes) > max_classes:
        return Verdict(caption, reason=f"names {len(classes)} classes, more than {max_classes}")
    tokens = count_tokens(append_classes(caption, classes))
    if tokens > max_tokens:
        return Verdict(caption, reason=f"too long: {tokens} tokens with the class names, limit {max_tokens}")
    return Verdict(caption, classes)


def content_words(caption: str) -> frozenset[str]:
    """The words that carry a caption's meaning (no articles or prepositions, no plural s)."""
    return frozenset(w.rstrip("s") or w for w in _WORD.findall(caption.lower()) if w not in _STOPWORDS)


class NearDuplicates:
    """Remembers accepted captions; a new one is a near-duplicate of an earlier one with the
    same classes when their content words overlap by ``threshold`` (Jaccard) or more."""

    def __init__(self, threshold: float = 0.8) -> None:
        self.threshold = threshold
        self._seen: dict[tuple[str, ...], list[frozenset[str]]] = {}

    def add(self, caption: str, classes: tuple[str, ...]) -> bool:
        """Remember ``caption``; False (and nothing remembered) if it nearly repeats one."""
        words = content_words(caption)
        bucket = self._seen.setdefault(tuple(sorted(classes)), [])
        for other in bucket:
            if len(words & other) >= self.threshold * len(words | other):
                return False
        bucket.append(words)
        return True
