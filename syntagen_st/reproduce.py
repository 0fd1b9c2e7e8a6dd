"""Reproduce a dataset from its seed: ``python -m syntagen_st.reproduce RUN_OR_EXPORT``.

    [--ids ID ...] [--sample K] [--full] [--into DIR] [--model PATH] [--device D]

Default: regenerate the chosen samples (or K random ones) from the recorded seed, prompt and
model with generate.py's own SampleGenerator, and compare them with the dataset: images
identical, else max / mean pixel difference and PSNR; attention labels: pixel agreement (with a
run's attention labels, or with an export's refined masks). An export's images are JPEGs: the
regenerated image is encoded the same way before comparing.

``--full`` reruns the whole ``fit`` from the recorded config into a new folder and compares the
exports: ids, image and mask identity, label agreement, and the final model checksum.

Exit code 0 when everything compared is identical (or every PSNR reaches --min-psnr), else 1.
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser
from PIL import Image

from .bundle import Bundle, find_root
from .cli import config_from, config_parser, run_main
from .config import Config
from .errors import UserError
from .export import SUBMISSION, encode_jpeg
from .prompts import PromptRecord
from .store import Pool, load_mask

DEFAULT_SAMPLE = 8


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
    run: Path | None = None
    bundle: Bundle | None = None
    root: str = ""

    def image(self, sid: str) -> np.ndarray:
        if self.run is not None:
            return _decode(Pool(self.run / "pool").image_path(sid).read_bytes())
        return _decode(self.bundle.read(f"{self.root}image/{sid}.jpg"))

    def jpeg(self, sid: str) -> bytes:
        return self.bundle.read(f"{self.root}image/{sid}.jpg")

    def mask(self, sid: str) -> np.ndarray:
        if self.run is not None:
            return load_mask(Pool(self.run / "pool").mask_path(sid))
        return _decode(self.bundle.read(f"{self.root}mask/{sid}.png"))

    @property
    def labels_are(self) -> str:
        return "the run's attention labels" if self.run is not None else "the export's refined masks"


def open_source(path: str) -> Source:
    root = Path(path).expanduser()
    if (root / "config.yaml").is_file() and (root / "pool" / "manifest").is_dir():
        config = yaml.safe_load((root / "config.yaml").read_text())
        submission_file = root / "export" / SUBMISSION
        submission = json.loads(submission_file.read_text()) if submission_file.is_file() else None
        rows = {row["id"]: row for row in Pool(root / "pool").rows()}
        return Source(str(root), config, rows, submission, run=root)
    bundle = Bundle(root)
    prefix = find_root(bundle.names)
    if prefix + SUBMISSION not in bundle.names:
        bundle.close()
        raise UserError(f"{root}: neither a run folder (config.yaml, pool/) nor an export with {SUBMISSION}: "
                        "nothing records how it was made")
    try:
        submission = json.loads(bundle.read(prefix + SUBMISSION))
        config, rows = submission["config"], submission["samples"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{root}: unreadable {SUBMISSION} ({type(err).__name__}: {err})") from None
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
    if not full:
        # The records carry each prompt: regenerating samples needs no prompts file.
        config["generate"]["prompts_file"] = None
    parser = config_parser("reproduce", "")
    return config_from(parser, parser.parse_object(config))


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


def _record(sid: str, row: dict) -> PromptRecord:
    return PromptRecord(sid, int(row["round"]), int(row["index"]), row["prompt"], tuple(row["classes"]),
                        row["class_prompt"], int(row["seed"]))


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
    from .generate import SampleGenerator

    records = [_record(sid, source.rows[sid]) for sid in ids]
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
        raise UserError(f"{old.label}: no export with {SUBMISSION} to compare with (run fit to the end)")
    new_sub = json.loads((new / SUBMISSION).read_text())
    old_files, new_files = old.submission["files"], new_sub["files"]
    old_ids, new_ids = set(old.submission["samples"]), set(new_sub["samples"])
    print(f"ids: {len(old_ids)} and {len(new_ids)}: " + ("same" if old_ids == new_ids else
          f"{len(old_ids - new_ids)} only in the original, {len(new_ids - old_ids)} only in the rerun"))
    common = sorted(old_ids & new_ids)
    images = sum(old_files.get(f"image/{i}.jpg") == new_files.get(f"image/{i}.jpg") for i in common)
    masks = [i for i in common if old_files.get(f"mask/{i}.png") == new_files.get(f"mask/{i}.png")]
    print(f"images identical: {images}/{len(common)}")
    agreement = [1.0 if i in masks else label_agreement(_old_export_mask(old, i), load_mask(new / "mask" / f"{i}.png"))
                 for i in common]
    print(f"masks identical: {len(masks)}/{len(common)}   label agreement {100 * float(np.mean(agreement or [0])):.3f}%")
    lists = old_files.get("train.txt") == new_files.get("train.txt")
    print(f"train.txt: {'identical' if lists else 'differs'}")
    a, b = old.submission.get("model_sha256"), new_sub.get("model_sha256")
    print(f"final model sha256: {'same' if a == b else 'differs'} ({a} / {b})")
    return old_ids == new_ids and images == len(common) and len(masks) == len(common) and lists and a == b and a is not None


def _old_export_mask(old: Source, sid: str) -> np.ndarray:
    if old.run is not None:
        return load_mask(old.run / "export" / "mask" / f"{sid}.png")
    return _decode(old.bundle.read(f"{old.root}mask/{sid}.png"))


def full(source: Source, cfg: Config, into: Path) -> bool:
    from .fit import main as fit_main
    from .store import sha256_file

    recorded = (source.submission or {}).get("prompts_file_sha256")
    if cfg.generate.prompts_file and recorded and sha256_file(cfg.generate.prompts_file) != recorded:
        raise UserError(f"{cfg.generate.prompts_file}: not the prompts file the run used (its sha256 differs)")
    with tempfile.TemporaryDirectory(prefix="syntagen-reproduce-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        fit_main(["--config", str(config_file), "--out", str(into), "--no-progress"])
    print(f"full reproduction in {into}, compared with {source.label}:")
    return compare_exports(source, into / "export")


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m syntagen_st.reproduce", exit_on_error=False,
                            description="Regenerate a dataset's samples from its seed and compare.")
    parser.add_argument("source", help="a run folder, or an export (folder or zip) with submission.json")
    parser.add_argument("--ids", nargs="+", default=None, help="the sample ids to regenerate")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="regenerate K random samples")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the random pick")
    parser.add_argument("--full", action="store_true", help="rerun the whole fit from the recorded config and compare exports")
    parser.add_argument("--into", default=None, help="--full's run folder (default: SOURCE-reproduced beside it)")
    parser.add_argument("--model", default=None, help="the SD weights here (hub id or folder), if not where recorded")
    parser.add_argument("--device", default=None, help="model.device for generation (auto, cpu, cuda:N)")
    parser.add_argument("--batch-size", type=int, default=None, help="regenerate in batches of N instead of each sample's recorded batch length (then not bit-exact)")
    parser.add_argument("--min-psnr", type=float, default=None, help="also accept images at or above this PSNR (dB)")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    if ns.sample < 1:
        raise UserError(f"--sample must be >= 1, got {ns.sample}")
    source = open_source(ns.source)
    try:
        cfg = resolve_config(source, ns.model, ns.device, ns.batch_size, ns.full)
        if ns.full:
            base = Path(ns.source.rstrip("/"))
            into = Path(ns.into) if ns.into else base.with_name(f"{base.stem}-reproduced")
            return 0 if full(source, cfg, into) else 1
        ids = pick_ids(source.rows, ns.ids, ns.sample, ns.sample_seed)
        print(f"regenerating {len(ids)} of {len(source.rows)} samples of {source.label} "
              f"({cfg.model.pretrained} on {cfg.model.device}, batches {ns.batch_size or 'as recorded'}, "
              f"{torch.get_num_threads()} CPU threads, seed {cfg.seed})")
        results = regenerate(source, cfg, ids, not ns.no_progress, ns.batch_size)
        identical = print_samples(results, source.labels_are)
        close = ns.min_psnr is not None and min(r["psnr"] for r in results) >= ns.min_psnr
        return 0 if identical or close else 1
    finally:
        if source.bundle is not None:
            source.bundle.close()


if __name__ == "__main__":
    run_main(main, "syntagen_st.reproduce")
