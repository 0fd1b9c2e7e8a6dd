"""The competition's rules and the label values every stage writes and checks, in one place."""

from __future__ import annotations

import os

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
"""The default largest image or mask any command decodes (a VOC image is ~0.2 Mpx, an entry's
0.26 Mpx): a larger one is refused from its header, before decoding, so memory stays bounded (a
121 Mpx PNG can be 117 KB on disk). ``--max-image-pixels`` changes it."""
PIXEL_LIMIT_CEILING = 178_956_970
"""The highest limit that can be set: PIL refuses to open anything larger (its decompression-bomb guard)."""
PIXEL_LIMIT_ENV = "SYNTAGEN_MAX_IMAGE_PIXELS"
"""Where ``--max-image-pixels`` puts the limit, so loader workers and ranks started later read it too."""


def max_image_pixels() -> int:
    """The pixel limit in force: ``--max-image-pixels`` of this command, else MAX_IMAGE_PIXELS."""
    value = os.environ.get(PIXEL_LIMIT_ENV, "")
    return int(value) if value.isdigit() and 0 < int(value) <= PIXEL_LIMIT_CEILING else MAX_IMAGE_PIXELS


def pixel_limit(text: str) -> int:
    """``--max-image-pixels``: a pixel count (``16777216`` or ``4096x4096``), put in force for this
    command and the processes it starts; a ValueError (one line from the parser) if it is not one."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ValueError(f"{text!r} is not a pixel count (e.g. 16777216 or 4096x4096)")
    limit = parts[0] * (parts[1] if len(parts) == 2 else 1)
    if limit > PIXEL_LIMIT_CEILING:
        raise ValueError(f"{limit:,} pixels is above {PIXEL_LIMIT_CEILING:,}, the most PIL opens")
    os.environ[PIXEL_LIMIT_ENV] = str(limit)
    return limit


def check_pixels(path: object, size: tuple[int, int]) -> None:
    """A ValueError naming ``path`` when an image of ``size`` (width, height) exceeds the pixel limit."""
    limit = max_image_pixels()
    if size[0] * size[1] > limit:
        raise ValueError(f"{path}: {size[0]}x{size[1]} pixels, above the limit of {limit:,}; nothing larger is "
                         "decoded (--max-image-pixels raises it)")

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

