"""The competition's rules and the label values every stage writes and checks, in one place."""

from __future__ import annotations

import numpy as np

from .classes import IGNORE_INDEX, NUM_CLASSES

MAX_PAIRS = 10_000
"""At most this many image / mask pairs in an entry."""
ENTRY_SIZE = (512, 512)
"""An entry's images are 512x512 (width, height)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""Image files a dataset folder may hold (an entry's images are JPEGs or PNGs)."""
ENTRY_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

VALID_LABEL = np.zeros(256, dtype=bool)
"""``VALID_LABEL[mask]``: True where a label value is allowed (0..20 and 255)."""
VALID_LABEL[:NUM_CLASSES] = True
VALID_LABEL[IGNORE_INDEX] = True
VALID_LABEL.flags.writeable = False


def entry_problems(tiny_model: bool, source: str, sizes: set[tuple[int, int]] | None = None) -> list[str]:
    """Why a run's data cannot be a competition entry (empty: it can): made by the tiny test
    pipeline, taken from a folder instead of SD and the seed, or images (``sizes``, width x height;
    None: not known yet) other than 512x512. The export records these in submission.json; the
    report and the card say the same."""
    reasons = []
    if tiny_model:
        reasons.append("it was made with the tiny random-initialised test pipeline, not Stable Diffusion")
    if source != "sd":
        reasons.append(f"its images come from {source}, not from Stable Diffusion and the seed")
    if sizes is not None and sizes != {ENTRY_SIZE}:
        reasons.append(f"its images are {', '.join(f'{w}x{h}' for w, h in sorted(sizes))}, not 512x512")
    return reasons


def invalid_values(mask: np.ndarray) -> list[int]:
    """The label values of a mask outside 0..20 and 255, sorted."""
    values = np.unique(mask)
    return [int(v) for v in values if not VALID_LABEL[v]]

