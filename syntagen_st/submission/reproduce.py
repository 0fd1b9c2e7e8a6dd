"""Reproducing a dataset from its seed: regenerate samples with the generator's own
SampleGenerator from the recorded seed, prompt and model, and compare them with the dataset
(images identical, else max / mean pixel difference and PSNR; attention labels: pixel agreement,
with a run's attention labels or an export's refined masks). An export's images are JPEGs: the
regenerated image is encoded the same way before comparing. The full reproduction reruns the
whole job and compares the exports, the final model checksum included."""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.cli import config_from_dict, read_run_config
from ..core.config import Config, as_recorded
from ..core.errors import UserError
from ..core.layout import EntryLayout, RunLayout
from ..core.store import Pool, load_mask, sha256_file
from ..generation.sampler import SampleGenerator
from ..prompts.records import PromptRecord
from .bundle import Bundle, find_root
from .export import encode_jpeg

# ---------------------------------------------------------------- comparisons (pure)


def image_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """identical, max and mean absolute pixel difference, PSNR in dB (inf when identical) of two uint8 images."""
    if a.shape != b.shape:
        return {"identical": False, "max": 255, "mean": float("nan"), "psnr": 0.0, "shape": [a.shape, b.shape]}
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    return {"identical": mse == 0, "max": int(diff.max()), "mean": float(diff.mean()), "psnr": psnr}


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels with the same label (0 when the sizes differ)."""
    return float((a == b).mean()) if a.shape == b.shape else 0.0


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("P", "L") else im)


# ---------------------------------------------------------------- what is reproduced


@dataclass
class Source:
    """A run or an export: its config, each sample's record, and the reference files."""

    label: str
    config: dict
    rows: dict[str, dict]
    submission: dict | None
    run: RunLayout | None = None
    bundle: Bundle | None = None
    root: str = ""

    def image(self, sid: str) -> np.ndarray:
        if self.run is not None:
            return _decode(self.run.pool.image_path(sid).read_bytes())
        return _decode(self.jpeg(sid))

    def jpeg(self, sid: str) -> bytes:
        return self.bundle.read(self.root + EntryLayout.image_name(sid))

    def mask(self, sid: str) -> np.ndarray:
        if self.run is not None:
            return load_mask(self.run.pool.mask_path(sid))
        return _decode(self.bundle.read(self.root + EntryLayout.mask_name(sid)))

    @property
    def labels_are(self) -> str:
        return "the run's attention labels" if self.run is not None else "the export's refined masks"


def open_source(path: str) -> Source:
    root = Path(path).expanduser()
    run = RunLayout(root)
    if run.config.is_file() and RunLayout.is_run(root):
        config = read_run_config(run.config)
        submission_file = run.export.submission
        submission = json.loads(submission_file.read_text()) if submission_file.is_file() else None
        rows = {row["id"]: row for row in run.pool.rows()}
        return Source(str(root), config, rows, submission, run=run)
    bundle = Bundle(root)
    prefix = find_root(bundle.names)
    if prefix + EntryLayout.SUBMISSION not in bundle.names:
        bundle.close()
        raise UserError(f"{root}: neither a run folder (config.yaml, pool/) nor an export with {EntryLayout.SUBMISSION}: "
                        "nothing records how it was made")
    try:
        submission = json.loads(bundle.read(prefix + EntryLayout.SUBMISSION))
        config, rows = submission["config"], submission["samples"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{root}: unreadable {EntryLayout.SUBMISSION} ({type(err).__name__}: {err})") from None
    return Source(str(root), config, rows, submission, bundle=bundle, root=prefix)


def resolve_config(source: Source, model: str | None, device: str | None, batch_size: int | None, full: bool) -> Config:
    """The recorded config with this machine's overrides, validated; the recorded hub commit pinned."""
    config = json.loads(json.dumps(source.config))
    if model:
        config["model"]["pretrained"] = model
    if device:
        config["model"]["device"] = device
    if batch_size:
        config["generate"]["batch_size"] = batch_size
    recorded = (source.submission or {}).get("stable_diffusion", {})
    if recorded.get("commit") and not config["model"].get("revision") and not model:
        config["model"]["revision"] = recorded["commit"]
    config = as_recorded(config)
    if not full:
        # The records carry each prompt: regenerating samples needs no prompts file.
        config["generate"]["prompts_file"] = None
    return config_from_dict(config)


def pick_ids(rows: dict[str, dict], ids: Sequence[str] | None, k: int, seed: int) -> list[str]:
    """The ids to regenerate: those named, or k drawn at random (seeded) from the generated ones."""
    generated = sorted(i for i, row in rows.items() if row.get("prompt") is not None and row.get("seed") is not None)
    if ids:
        unknown = [i for i in ids if i not in rows]
        if unknown:
            raise UserError(f"unknown sample ids: {', '.join(unknown[:5])}")
        missing = [i for i in ids if i not in generated]
        if missing:
            raise UserError(f"samples not generated from a seed (imported from a folder): {', '.join(missing[:5])}")
        return list(ids)
    if not generated:
        raise UserError("no sample here was generated from a seed (a folder source): nothing to regenerate")
    return sorted(random.Random(seed).sample(generated, min(k, len(generated))))


def regeneration_batches(records: Sequence[PromptRecord], lengths: dict[str, int]) -> dict[int, list[PromptRecord]]:
    """The records to generate in batches of each length: every record in a batch as long as the
    one it was made in (``lengths``), since kernels pick their blocking by shape; what else is in
    the batch does not change a sample. Records of one length share batches; copies pad the last."""
    groups: dict[int, list[PromptRecord]] = {}
    for record in records:
        groups.setdefault(lengths[record.id], []).append(record)
    for n, group in groups.items():
        short = -len(group) % n
        group.extend(replace(group[j % len(group)], id=f"{group[j % len(group)].id}-pad{j}") for j in range(short))
    return dict(sorted(groups.items()))


MAX_BATCH = 256
"""More images in one batch than any GPU holds at 512 px: a recorded length beyond it is not real."""


def recorded_batch(sid: str, row: dict) -> int | None:
    """The length of the batch a sample was made in, from its row (None where a row predates it)."""
    value = row.get("batch")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BATCH:
        raise UserError(f"sample {sid}: recorded batch {value!r} is not a batch length (1..{MAX_BATCH})")
    return value


def regenerate(source: Source, cfg: Config, ids: list[str], progress: bool, batch_size: int | None = None) -> list[dict]:
    """Regenerate ``ids`` into a temporary pool and compare each with the source: each in a batch of
    ``batch_size``, or of the length its row records (else ``generate.batch_size``)."""
    records = [PromptRecord.from_row(source.rows[sid] | {"id": sid}) for sid in ids]
    lengths = {sid: batch_size or recorded_batch(sid, source.rows[sid]) or cfg.generate.batch_size for sid in ids}
    results = []
    with tempfile.TemporaryDirectory(prefix="syntagen-reproduce-") as tmp:
        pool = Pool(tmp)
        generator = SampleGenerator(cfg)
        for n, batch in regeneration_batches(records, lengths).items():
            generator.fill(pool, batch, progress, batch_size=n)
        for sid in ids:
            new_image = _decode(pool.image_path(sid).read_bytes())
            if source.run is None:
                # The export holds JPEGs: encode the new image the same way.
                new_jpeg = encode_jpeg(new_image)
                diff = image_diff(_decode(source.jpeg(sid)), _decode(new_jpeg))
                diff["identical"] = diff["identical"] or new_jpeg == source.jpeg(sid)
            else:
                diff = image_diff(source.image(sid), new_image)
            diff["labels"] = label_agreement(source.mask(sid), load_mask(pool.mask_path(sid)))
            results.append({"id": sid} | diff)
    return results


def print_samples(results: list[dict], labels_are: str) -> bool:
    for r in results:
        image = "identical" if r["identical"] else f"max {r['max']}  mean {r['mean']:.4f}  PSNR {r['psnr']:.2f} dB"
        print(f"{r['id']}  {image:<44}  labels {100 * r['labels']:.2f}%")
    same = sum(r["identical"] for r in results)
    psnr = min(r["psnr"] for r in results)
    print(f"images identical: {same}/{len(results)}   max pixel diff {max(r['max'] for r in results)}   "
          f"mean {np.mean([r['mean'] for r in results]):.4f}   min PSNR {psnr:.2f} dB")
    agreement = [r["labels"] for r in results]
    print(f"attention labels: pixel agreement {100 * np.mean(agreement):.3f}% (mean), {100 * min(agreement):.3f}% (min), "
          f"with {labels_are}")
    return same == len(results)


# ---------------------------------------------------------------- --full


def compare_exports(old: Source, new: Path) -> bool:
    """Ids, file identity, label agreement and model checksum of an original export and a rerun's."""
    if old.submission is None:
        raise UserError(f"{old.label}: no export with {EntryLayout.SUBMISSION} to compare with (run fit to the end)")
    new_sub = json.loads(EntryLayout(new).submission.read_text())
    old_files, new_files = old.submission["files"], new_sub["files"]
    old_ids, new_ids = set(old.submission["samples"]), set(new_sub["samples"])
    print(f"ids: {len(old_ids)} and {len(new_ids)}: " + ("same" if old_ids == new_ids else
          f"{len(old_ids - new_ids)} only in the original, {len(new_ids - old_ids)} only in the rerun"))
    common = sorted(old_ids & new_ids)
    image, mask = EntryLayout.image_name, EntryLayout.mask_name
    images = sum(old_files.get(image(i)) == new_files.get(image(i)) for i in common)
    masks = [i for i in common if old_files.get(mask(i)) == new_files.get(mask(i))]
    print(f"images identical: {images}/{len(common)}")
    agreement = [1.0 if i in masks else label_agreement(_old_export_mask(old, i), load_mask(EntryLayout(new).mask(i)))
                 for i in common]
    print(f"masks identical: {len(masks)}/{len(common)}   label agreement {100 * float(np.mean(agreement or [0])):.3f}%")
    lists = old_files.get("train.txt") == new_files.get("train.txt")
    print(f"train.txt: {'identical' if lists else 'differs'}")
    a, b = old.submission.get("model_sha256"), new_sub.get("model_sha256")
    print(f"final model sha256: {'same' if a == b else 'differs'} ({a} / {b})")
    return old_ids == new_ids and images == len(common) and len(masks) == len(common) and lists and a == b and a is not None


def _old_export_mask(old: Source, sid: str) -> np.ndarray:
    if old.run is not None:
        return load_mask(old.run.export.mask(sid))
    return _decode(old.bundle.read(old.root + EntryLayout.mask_name(sid)))


def full(source: Source, cfg: Config, into: Path, fit: Callable[[Config, Path], None]) -> bool:
    """Rerun the whole job with ``fit(cfg, into)`` (the fit command, which this stage lies below)
    and compare the two exports."""
    recorded = (source.submission or {}).get("prompts_file_sha256")
    if cfg.generate.prompts_file and recorded and sha256_file(cfg.generate.prompts_file) != recorded:
        raise UserError(f"{cfg.generate.prompts_file}: not the prompts file the run used (its sha256 differs)")
    fit(cfg, into)
    print(f"full reproduction in {into}, compared with {source.label}:")
    return compare_exports(source, into / "export")
