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
MAX_IMAGE_PIXELS = 4096 * 4096
"""The largest image or mask any command decodes (a VOC image is ~0.2 Mpx, an entry's 0.26 Mpx): a
larger one is refused from its header, before decoding, so memory stays bounded (a 121 Mpx PNG
can be 117 KB on disk)."""


def check_pixels(path: object, size: tuple[int, int]) -> None:
    """A ValueError naming ``path`` when an image of ``size`` (width, height) exceeds MAX_IMAGE_PIXELS."""
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"{path}: {size[0]}x{size[1]} pixels, above the limit of {MAX_IMAGE_PIXELS:,} "
                         "(4096x4096); nothing larger is decoded")

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

