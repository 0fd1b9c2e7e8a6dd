"""PASCAL VOC label space: names, display names used in prompts, and the palette."""

from __future__ import annotations

import re

BACKGROUND = 0
IGNORE_INDEX = 255

# Index order is the VOC label value.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
FOREGROUND_CLASSES: tuple[str, ...] = VOC_CLASSES[1:]

# What Stable Diffusion reads: VOC's run-together names tokenise badly.
DISPLAY_NAMES: dict[str, str] = {
    "aeroplane": "aeroplane", "diningtable": "dining table", "motorbike": "motorbike",
    "pottedplant": "potted plant", "tvmonitor": "tv monitor",
}

ALIASES: dict[str, str] = {
    "airplane": "aeroplane", "plane": "aeroplane", "bike": "bicycle", "dining table": "diningtable",
    "table": "diningtable", "motorcycle": "motorbike", "potted plant": "pottedplant",
    "plant": "pottedplant", "tv monitor": "tvmonitor", "tv": "tvmonitor", "monitor": "tvmonitor",
    "couch": "sofa", "people": "person", "man": "person", "men": "person", "woman": "person",
    "women": "person", "child": "person", "children": "person", "boy": "person", "girl": "person",
    "kid": "person", "airliner": "aeroplane", "sailboat": "boat", "ship": "boat", "armchair": "chair",
    "puppy": "dog", "kitten": "cat", "television": "tvmonitor",
}


def display_name(name: str) -> str:
    """The words used for ``name`` in a prompt."""
    return DISPLAY_NAMES.get(name, name)


def canonical(name: str) -> str:
    """Map a user-written class name ("Dining Table", "tv") to its VOC name; ValueError if unknown."""
    key = " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())
    if key in FOREGROUND_CLASSES:
        return key
    if key.replace(" ", "") in FOREGROUND_CLASSES:
        return key.replace(" ", "")
    if key in ALIASES:
        return ALIASES[key]
    raise ValueError(f"unknown class name {name!r}; known: {', '.join(FOREGROUND_CLASSES)}")


def class_index(name: str) -> int:
    return VOC_CLASSES.index(canonical(name))


def classes_in_text(text: str) -> tuple[str, ...]:
    """The classes a caption names, in the order they appear."""
    lowered = text.lower()
    names = {display_name(c): c for c in FOREGROUND_CLASSES} | {c: c for c in FOREGROUND_CLASSES} | ALIASES
    first: dict[str, int] = {}
    # Longest names first, so "dining table" wins over "table"; a match is blanked out in place.
    for name in sorted(names, key=len, reverse=True):
        for match in re.finditer(r"\b" + re.escape(name) + r"(?:s|es)?\b", lowered):
            first[names[name]] = min(first.get(names[name], match.start()), match.start())
            lowered = lowered[: match.start()] + " " * (match.end() - match.start()) + lowered[match.end():]
    return tuple(sorted(first, key=first.get))


def _voc_palette() -> list[int]:
    # The standard VOC colour map: bits of the label spread over the high bits of R, G, B.
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


PALETTE: list[int] = _voc_palette()
