"""The sampler: prompt records -> Stable Diffusion images under attention capture -> labelled
samples in a pool.

Each sample's latent noise comes from its own CPU generator seeded from (run seed, sample id),
so a sample is the same whatever the batch size or device count, and after a resume.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.classes import VOC_CLASSES, class_index, display_name
from ..core.config import Config, LabelConfig, cross_factors, self_factors
from ..core.device import resolve_device
from ..core.errors import UserError
from ..core.guided import refine_scores, scores_to_labels
from ..core.store import Pool
from ..prompts.records import PromptRecord
from ..scaleout.dist import SINGLE, Dist, ShardSampler
from .attention import AttentionStore, capture_attention
from .labels import attention_to_scores, upsample_scores
from .pipeline import load_pipeline, resolve_dtype
from .writer import BackgroundWriter


def class_token_groups(tokenizer, record: PromptRecord) -> list[list[int]]:
    """Token positions of each appended class name in the tokenised class prompt.

    The names are the last tokens before end-of-text, separated by one punctuation token each,
    so they are found from the end; a prompt long enough to push them past the text encoder's
    limit is refused rather than silently losing a class.
    """
    ids = tokenizer(record.class_prompt, truncation=False).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise UserError(
            f"sample {record.id}: the prompt is {len(ids)} tokens; the class names would fall past the "
            f"text encoder's limit of {tokenizer.model_max_length}: shorten it: {record.prompt[:60]!r}"
        )
    end = len(ids) - 1
    groups: list[list[int]] = []
    for name in reversed(record.classes):
        name_ids = tokenizer(display_name(name), add_special_tokens=False).input_ids
        start = end - len(name_ids)
        if ids[start:end] != name_ids:
            raise RuntimeError(f"sample {record.id}: cannot find the tokens of {name!r} in its class prompt")
        groups.append(list(range(start, end)))
        end = start - 1
    return groups[::-1]


@dataclass
class LabelledImage:
    """A generated image with its attention label, before it is written to the pool."""

    record: PromptRecord
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0..20 and 255
    scores: np.ndarray  # (K, hs, ws) float16, the K classes of ``class_ids``
    class_ids: np.ndarray  # (K,) uint8

    def manifest_row(self) -> dict:
        present = sorted({int(v) for v in np.unique(self.mask)} - {0, 255})
        return self.record.to_row() | {
            "label_source": "attention",
            "present": [VOC_CLASSES[v] for v in present],
            "coverage": float((self.mask != 255).mean()),
            "foreground": float(((self.mask != 0) & (self.mask != 255)).mean()),
        }


def label_sample(
    record: PromptRecord, image: np.ndarray, cross: list[torch.Tensor], self_attn: list[torch.Tensor],
    groups: list[list[int]], store: AttentionStore, cfg: LabelConfig,
) -> LabelledImage:
    """One sample's averaged attention (one map per grid of ``store``) -> scores and mask; the
    full-resolution scores are snapped to the image's edges (``label.refine_image``) on the device
    they live on, the GPU's in a GPU run."""
    scores = attention_to_scores(
        cross, self_attn, groups, store.cross_grids, cfg.cross_weights, cfg.tau, cfg.presence_threshold
    )
    class_ids = [class_index(c) for c in record.classes]
    full = refine_scores(image, upsample_scores(scores, image.shape[:2]), cfg)
    mask = scores_to_labels(full, class_ids, cfg.fg_threshold, cfg.band_threshold)
    return LabelledImage(
        record, image, mask.cpu().numpy(), scores.cpu().numpy().astype(np.float16), np.array(class_ids, dtype=np.uint8)
    )


class SampleGenerator:
    """A loaded pipeline that turns prompt records into labelled samples."""

    def __init__(self, cfg: Config, pipe: StableDiffusionPipeline | None = None, device: torch.device | None = None) -> None:
        """Load the configured pipeline (on ``device``, e.g. a rank's GPU, or model.device), or
        use ``pipe`` (already on its device) as given."""
        self.gen, self.label = cfg.generate, cfg.label
        self.device = device if device is not None else resolve_device(cfg.model.device, "model.device")
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.pipe = pipe if pipe is not None else load_pipeline(cfg.model, self.device, self.dtype)
        self.latent_hw = (self.gen.height // self.pipe.vae_scale_factor, self.gen.width // self.pipe.vae_scale_factor)

    def generate(self, records: Sequence[PromptRecord], store: AttentionStore) -> list[LabelledImage]:
        """One batch (at most the store's capacity) of samples."""
        groups = [class_token_groups(self.pipe.tokenizer, r) for r in records]
        store.begin(len(records))
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in records]
        negative = [self.gen.negative_prompt] * len(records) if self.gen.negative_prompt else None
        with torch.inference_mode():
            out = self.pipe(
                prompt=[r.class_prompt for r in records], negative_prompt=negative,
                height=self.gen.height, width=self.gen.width, num_inference_steps=self.gen.steps,
                guidance_scale=self.gen.guidance_scale, generator=generators, output_type="np",
            )
            images = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
            return [
                label_sample(r, images[i], *store.sample_means(i), groups[i], store, self.label)
                for i, r in enumerate(records)
            ]

    def fill(
        self, pool: Pool, records: Sequence[PromptRecord], progress: bool = True, dist: Dist = SINGLE,
        batch_size: int | None = None,
    ) -> int:
        """Generate every record the pool lacks; returns how many this rank made.

        The records are cut into batches of ``batch_size`` (default ``generate.batch_size``) in order, whatever the number
        of processes, and a ShardSampler deals the batches to the ranks. A batch's manifest shard
        is named after its first sample, so the pool, manifests included, is the same with 1 or
        N processes. A background writer encodes and writes a batch (files, then its manifest
        shard) while the next one denoises; a crash loses at most the queued batches, and a rerun
        regenerates exactly those.
        """
        # Rank 0's view of the pool: a rank reading it after another has started writing would
        # cut other batches and deal them differently.
        done = dist.broadcast(pool.done_ids() if dist.is_main else None)
        size = batch_size or self.gen.batch_size
        batches = ([r for r in records[i : i + size] if r.id not in done] for i in range(0, len(records), size))
        todo = [batch for batch in batches if batch]
        if not todo:
            return 0
        for batch in todo:  # an over-long prompt is refused now, not hours into the run
            for record in batch:
                class_token_groups(self.pipe.tokenizer, record)
        loader = DataLoader(todo, batch_size=None, sampler=ShardSampler(todo, dist), collate_fn=_as_is)  # type: ignore[arg-type]
        mine = sum(len(todo[i]) for i in loader.sampler)
        bar = tqdm(total=mine, desc="generate", unit="img", disable=not (progress and dist.is_main))
        start = time.perf_counter()
        with capture_attention(
            self.pipe.unet, max(len(b) for b in todo), self.latent_hw, cross_factors(self.label),
            self_factors(self.label), self.pipe.tokenizer.model_max_length,
        ) as store, BackgroundWriter(max_pending=2) as writer:
            for batch in loader:
                writer.submit(partial(write_batch, pool, self.generate(batch, store)))
                bar.update(len(batch))
                bar.set_postfix(img_per_s=f"{bar.n / (time.perf_counter() - start):.2f}")
        bar.close()
        return mine


def _as_is(batch: list[PromptRecord]) -> list[PromptRecord]:
    return batch


def write_batch(pool: Pool, samples: Sequence[LabelledImage]) -> None:
    """A batch's files, then its manifest shard: a sample exists only once its files do. Each row
    records its batch's length: CPU and GPU kernels pick their blocking by shape, so a sample is
    bit-identical again only in a batch of that length (reproduce uses it)."""
    for s in samples:
        pool.write_sample(s.record.id, s.image, s.mask, scores=s.scores, class_ids=s.class_ids)
    pool.write_manifest_shard(samples[0].record.id, [s.manifest_row() | {"batch": len(samples)} for s in samples])
