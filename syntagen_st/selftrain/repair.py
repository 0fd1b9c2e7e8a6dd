"""``fit --repair``: find a run's damaged pool files and regenerate those samples from their seeds.

Every generated sample is a pure function of its manifest row (prompt, seed, the length of the
batch it was made in) and the run's config, so a damaged image, mask or scores file can be made
again, bit-identical, instead of starting the run again. It only runs when asked: a damaged file
otherwise stops the command in one line that names it and points here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.config import Config
from ..core.errors import UserError
from ..core.layout import RunLayout
from ..core.store import Pool, load_mask
from ..generation.sampler import SampleGenerator
from ..prompts.records import PromptRecord
from ..segmentation.data import Sample, SampleError, load_image, load_sample
from ..submission.reproduce import recorded_batch, regeneration_batches

REPAIR_PREFIX = ".repair-"
"""The temporary pool a repair regenerates into, beside the run's pool."""


def pool_sample(pool: Pool, row: dict) -> Sample:
    """The files of a pool sample: a generated one has its attention scores, an imported one none."""
    sid = row["id"]
    return Sample(pool.image_path(sid), pool.mask_path(sid), pool.scores_path(sid) if generated(row) else None)


def generated(row: dict) -> bool:
    return row.get("seed") is not None and row.get("prompt") is not None


def damaged_samples(pool: Pool, rows: list[dict], progress: bool = True) -> dict[str, str]:
    """Sample id -> what is wrong with its first broken file, for every sample that does not load
    whole (missing, truncated or undecodable image, mask or scores)."""
    damaged = {}
    for row in tqdm(rows, desc="check pool", unit="img", disable=not progress):
        sample = pool_sample(pool, row)
        try:
            load_sample(sample, confidence=sample.scores is not None)
        except SampleError as err:
            damaged[row["id"]] = str(err)
    return damaged


KINDS = ("image_path", "mask_path", "scores_path")
"""A generated pool sample's files, as ``Pool`` names them."""


def whole(pool: Pool, kind: str, sid: str) -> bool:
    """Whether one file of a sample is there and loads entirely."""
    path = getattr(pool, kind)(sid)
    try:
        if kind == "image_path":
            load_image(path)
        elif kind == "mask_path":
            load_mask(path)
        else:
            with np.load(path) as npz:
                np.asarray(npz["scores"])
    except (UserError, OSError, ValueError, KeyError, EOFError):
        return False
    return True


def regenerate(pool: Pool, cfg: Config, rows: dict[str, dict], ids: list[str], progress: bool = True) -> None:
    """Make ``ids`` again from their rows, each in a batch as long as the one it was made in, and
    put them in place of the pool's damaged files (each replaced atomically). Every file that
    survived, and each row's label statistics, must come out the same: otherwise this machine
    does not make the run's bits (another thread count, device or dtype) and nothing is replaced."""
    records = [PromptRecord.from_row(rows[sid]) for sid in ids]
    lengths = {sid: recorded_batch(sid, rows[sid]) or cfg.generate.batch_size for sid in ids}
    # Beside the pool, on its file system, so each file moves in with one rename.
    with tempfile.TemporaryDirectory(dir=pool.root.parent, prefix=REPAIR_PREFIX) as tmp:
        fresh = Pool(tmp)
        generator = SampleGenerator(cfg)
        for n, batch in regeneration_batches(records, lengths).items():
            generator.fill(fresh, batch, progress, batch_size=n)
        made = {row["id"]: row for row in fresh.rows()}
        damaged = {sid: [kind for kind in KINDS if not whole(pool, kind, sid)] for sid in ids}
        for sid in ids:
            differs = [key for key in ("present", "coverage", "foreground") if made[sid].get(key) != rows[sid].get(key)]
            differs += [kind.removesuffix("_path") for kind in KINDS if kind not in damaged[sid]
                        and getattr(pool, kind)(sid).read_bytes() != getattr(fresh, kind)(sid).read_bytes()]
            if differs:
                raise UserError(
                    f"sample {sid} comes out otherwise than the run made it ({', '.join(differs)} "
                    f"{'differs' if len(differs) == 1 else 'differ'}): this "
                    f"machine does not make the run's bits (another thread count, device or dtype than model.device "
                    f"{cfg.model.device!r} / model.dtype {cfg.model.dtype!r} where it was made); run --repair there, "
                    "or pass --overwrite to start again")
        for sid in ids:
            for kind in damaged[sid]:
                os.replace(getattr(fresh, kind)(sid), getattr(pool, kind)(sid))


def repair_pool(run: RunLayout, cfg: Config, progress: bool = True) -> list[str]:
    """Check every pool sample of ``run`` and regenerate the damaged ones; the ids repaired. A damaged
    sample that was imported from a folder has no seed: a UserError names it."""
    for stale in run.root.glob(f"{REPAIR_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed repair's: this command holds the folder
    rows = run.pool.rows()
    damaged = damaged_samples(run.pool, rows, progress)
    if not damaged:
        return []
    by_id = {row["id"]: row for row in rows}
    imported = [sid for sid in damaged if not generated(by_id[sid])]
    if imported:
        raise UserError(f"{len(imported)} damaged pool samples were imported from a folder and have no seed to "
                        f"regenerate them from, e.g. {damaged[imported[0]]}; pass --overwrite to import the folder again")
    ids = sorted(damaged)
    for sid in ids:
        print(f"damaged: {damaged[sid]}", flush=True)
    regenerate(run.pool, cfg, by_id, ids, progress)
    still = damaged_samples(run.pool, [by_id[sid] for sid in ids], progress=False)
    if still:
        raise UserError(f"regenerating did not repair {next(iter(still.values()))}")
    return ids


def damage_hint(err: SampleError, run: RunLayout) -> str:
    """The one-line message for a run's damaged file: how it can be made again."""
    path = Path(os.path.abspath(err.path))
    if path.is_relative_to(os.path.abspath(run.pool.root)):
        row = next((r for r in run.pool.rows() if r["id"] == path.stem), {})
        if not generated(row):
            return f"{err}; it was imported from a folder and has no seed: pass --overwrite to import it again"
        return f"{err}; the pool's samples are regenerated from their seeds by rerunning with --repair"
    if path.is_relative_to(os.path.abspath(run.root)):
        return f"{err}; a round's or the export's files cannot be made alone: pass --overwrite to start again"
    return str(err)
