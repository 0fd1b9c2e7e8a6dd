"""The prompt records of a round, from the configured source, saved before any image is made.

``RUN/prompts/round<r>.jsonl`` holds one record per sample of round r (id, prompt, classes,
class prompt, seed, source). It is written atomically before generation starts; a resume or a
reproduction reads it and never asks the language model again. A round that needs more
samples than the file holds (a larger budget on resume) gets new records for the missing
indices only, so the saved ones never change.

With ``prompt_source: llm``, each sample's classes are drawn exactly as for the templates (by
the round's class weights, with the usual companions of the first class, from the sample's own
seed), so steering asks the model for new captions of the weak classes in proportion to
their weights. A combination the model gives too few valid captions for is topped up with the
template caption that sample would have had, with a warning and a count.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.classes import canonical
from ..core.config import Config
from ..core.errors import UserError
from ..core.layout import RunLayout
from ..core.store import atomic_write_json, read_jsonl, write_jsonl
from .captions import NearDuplicates, Verdict
from .records import (
    PromptRecord,
    append_classes,
    draw_classes,
    load_prompt_file,
    make_records,
    phrase_caption,
    sample_id,
    sample_seed,
)

log = logging.getLogger(__name__)

_FIELDS = ("id", "round", "index", "prompt", "classes", "class_prompt", "seed")


def load_round_prompts(path: str | Path, round_index: int) -> list[PromptRecord]:
    """The saved records of a round, checked to be samples 0..n-1 of that round."""
    records = []
    for n, row in enumerate(read_jsonl(path, "prompt file", required=_FIELDS)):
        try:
            record = PromptRecord.from_row(row)
        except (TypeError, ValueError, KeyError) as err:
            raise UserError(f"{path}:{n + 1}: unreadable prompt record ({err})") from None
        if (record.round, record.index, record.id) != (round_index, n, sample_id(round_index, n)):
            raise UserError(f"{path}:{n + 1}: expected sample {sample_id(round_index, n)}, found {record.id}")
        records.append(record)
    return records


def llm_records(
    cfg: Config, round_index: int, indices: range, weights: dict[str, float] | None,
    seen: Sequence[PromptRecord] = (), writer=None, rejections: list[Verdict] | None = None,
) -> tuple[list[PromptRecord], dict]:
    """Records for ``indices`` with captions from the language model (``writer``, or the
    configured model loaded for this call and freed after), and the writer's statistics."""
    gen = cfg.generate
    allowed = [canonical(c) for c in gen.classes]
    weights = weights or {}
    drawn = []
    for index in indices:
        sid = sample_id(round_index, index)
        seed = sample_seed(cfg.seed, sid)
        rng = np.random.default_rng(seed)
        drawn.append((index, sid, seed, rng, draw_classes(rng, allowed, weights, gen.max_classes_per_prompt)))
    need = Counter(classes for *_, classes in drawn)
    dedupe = NearDuplicates()
    for record in seen:  # captions already in this round's file
        dedupe.add(record.prompt, record.classes)
    tag = f"{cfg.seed}:prompts:r{round_index}:from{indices.start}"
    if writer is None:
        from .llm import open_writer

        with open_writer(cfg) as loaded:
            got, stats = loaded.write(dict(need), set(allowed), tag, dedupe, rejections)
    else:
        got, stats = writer.write(dict(need), set(allowed), tag, dedupe, rejections)
    records, used = [], Counter()
    for index, sid, seed, rng, classes in drawn:
        if used[classes] < len(got[classes]):
            verdict = got[classes][used[classes]]
            prompt, final, source = verdict.caption, verdict.classes, "llm"
        else:  # the template caption this sample would have had
            prompt, final, source = phrase_caption(rng, classes), classes, "template"
            stats.topped_up += 1
        used[classes] += 1
        records.append(PromptRecord(sid, round_index, index, prompt, final, append_classes(prompt, final), seed, source))
    if stats.topped_up:
        log.warning(
            "round %d: the language model gave too few valid captions; %d of %d prompts come from the templates",
            round_index, stats.topped_up, len(records),
        )
    return records, stats.to_dict()


def new_records(
    cfg: Config, round_index: int, indices: range, weights: dict[str, float] | None, seen: Sequence[PromptRecord] = ()
) -> tuple[list[PromptRecord], dict | None]:
    """Fresh records for ``indices`` from the configured source (and the LLM's statistics)."""
    gen = cfg.generate
    if gen.prompt_source == "llm":
        return llm_records(cfg, round_index, indices, weights, seen)
    prompt_file = load_prompt_file(gen.prompts_file) if gen.prompt_source == "file" else None
    records = make_records(cfg.seed, round_index, indices, gen.classes, weights, gen.max_classes_per_prompt, prompt_file)
    return records, None


def round_records(
    cfg: Config, round_index: int, count: int, weights: dict[str, float] | None = None,
    run: RunLayout | None = None,
) -> list[PromptRecord]:
    """The first ``count`` records of a round: read from the run's saved prompt file, with any
    missing ones made from the configured source and saved before they are returned."""
    if run is None:
        return new_records(cfg, round_index, range(count), weights)[0]
    path = run.prompts(round_index)
    saved = load_round_prompts(path, round_index) if path.exists() else []
    if len(saved) < count:
        records, stats = new_records(cfg, round_index, range(len(saved), count), weights, saved)
        saved = saved + records
        write_jsonl(path, [record.to_row() for record in saved])
        if stats is not None:  # the language model's acceptance, one entry per batch of new records
            stats_path = run.prompt_stats(round_index)
            earlier = json.loads(stats_path.read_text()) if stats_path.exists() else []
            atomic_write_json(stats_path, [*earlier, {"indices": [len(saved) - len(records), len(saved)], **stats}])
    return saved[:count]
