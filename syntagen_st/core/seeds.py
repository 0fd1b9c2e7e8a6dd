"""Seeds and sample ids: every random choice of a run derives from (run seed, a tag), so a sample
is the same whatever the batch size, the number of processes or a resume.

The formulas are part of the on-disk contract: an entry is reproduced from its seed by exactly
these bytes, so none of them may change.
"""

from __future__ import annotations

import hashlib
import re

_SAMPLE_ID = re.compile(r"^r(\d{2,})_(\d{6,})$")


def hash_seed(tag: str, nbytes: int = 8) -> int:
    """A seed below 2**63 from the sha256 of ``tag``: its first ``nbytes`` bytes, little-endian."""
    digest = hashlib.sha256(tag.encode()).digest()
    return int.from_bytes(digest[:nbytes], "little") & (2**63 - 1)


def sample_id(round_index: int, index: int) -> str:
    return f"r{round_index:02d}_{index:06d}"


def parse_sample_id(sid: str) -> tuple[int, int]:
    """(round, index) of a sample id; ValueError for anything else."""
    match = _SAMPLE_ID.match(sid)
    if match is None:
        raise ValueError(f"not a sample id: {sid!r}")
    return int(match.group(1)), int(match.group(2))


def sample_seed(run_seed: int, sid: str) -> int:
    """A sample's seed (its latent noise and prompt): depends only on the run seed and its id."""
    return hash_seed(f"{run_seed}:{sid}")


def derived_seed(run_seed: int, tag: str) -> int:
    """The seed of a training (``r0k1``, ``final``). Four bytes, as runs have always used: a
    wider seed would change every model, and so every checksum already submitted."""
    return hash_seed(f"{run_seed}:{tag}", nbytes=4)


def fold_key(run_seed: int, sid: str) -> bytes:
    """The sort key that shuffles samples into cross-fitting folds."""
    return hashlib.sha256(f"{run_seed}:fold:{sid}".encode()).digest()
