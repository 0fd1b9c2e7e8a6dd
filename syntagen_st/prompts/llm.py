"""Prompts written by a local causal language model (any transformers model with a chat template).

For each class combination a round needs, the writer asks the model for short photographic
captions that name every class, in batches of requests, and keeps those that pass
``captions.check_caption`` and are no near-duplicate of the round's earlier captions. The model
lives only inside ``open_writer``: it is loaded when prompts are needed and freed on exit,
before Stable Diffusion takes the GPU.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

from ..core.classes import display_name
from ..core.config import Config, GenerateConfig, is_local_path
from ..core.device import resolve_device
from ..core.errors import UserError, first_line
from ..core.hub import hub_model_ready
from ..core.seeds import hash_seed
from .captions import NearDuplicates, Verdict, check_caption, parse_captions
from .tokenizer import clip_tokenizer

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Rounds of requests for combinations still short of captions, before the templates top up."""
_OVERSHOOT = 1.25  # ask for more captions than needed: some are always rejected
_TOKENS_PER_CAPTION = 40

SYSTEM = "You write short captions for real photographs."


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def build_messages(classes: tuple[str, ...], n: int) -> list[dict[str, str]]:
    """The chat asking for ``n`` captions of a photo showing ``classes``.

    It asks for varied scenes (setting, distance, viewpoint, light, partial occlusion), so a
    class steered toward in a later round gets new contexts, not the same picture again.
    """
    names = [display_name(c) for c in classes]
    each = "both" if len(names) == 2 else "all" if len(names) > 2 else "the"
    user = (
        f"Write {n} different captions, each of one realistic photograph that shows {_join(names)}. "
        f"Every caption must name {each} {_join(names) if len(names) > 1 else names[0]}. "
        "Vary the place, the distance, the viewpoint, the light and what partly hides them. "
        "Do not mention any other people, animals, vehicles or furniture. "
        "At most 20 words per caption. Answer with a numbered list only."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]



def llm_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_llm(ref: str, revision: str | None, device: torch.device):
    """A causal LM and its tokenizer (left padding, with a chat template) from a hub id or folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(Path(ref).expanduser()) if is_local_path(ref) else ref
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=llm_dtype(device))
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise UserError(f"cannot load the language model {ref!r}: {first}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the language model {ref!r} has no chat template; use an instruct / chat model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


@dataclass
class WriteStats:
    """What the writer asked for and what became of it."""

    asked: int = 0
    parsed: int = 0
    accepted: int = 0
    """Captions that passed every check (some may be left unused once a combination has enough)."""
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    topped_up: int = 0

    def to_dict(self) -> dict:
        rate = self.accepted / self.parsed if self.parsed else None
        return {"asked": self.asked, "parsed": self.parsed, "accepted": self.accepted, "acceptance": rate, "kept": self.kept,
                "rejected": dict(self.rejected.most_common()), "topped_up": self.topped_up}


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


class CaptionWriter:
    """Asks a loaded chat model for captions of class combinations and keeps the valid ones."""

    def __init__(self, model, tokenizer, gen: GenerateConfig, count_tokens: Callable[[str], int], max_tokens: int) -> None:
        self.model, self.tokenizer, self.gen = model, tokenizer, gen
        self.count_tokens, self.max_tokens = count_tokens, max_tokens

    def _chat_text(self, classes: tuple[str, ...], n: int) -> str:
        messages = build_messages(classes, n)
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError:  # a template without a system role raises from inside (e.g. Gemma's)
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)

    def complete(self, requests: list[tuple[tuple[str, ...], int]], seed: int) -> list[str]:
        """The model's answers to a batch of requests (classes, how many captions), sampled
        from a generator seeded with ``seed``."""
        texts = [self._chat_text(classes, n) for classes, n in requests]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        # Sampling draws from torch's global generator (generate takes no generator of its own):
        # seed it inside a fork, so the caller's random state is left as it was.
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(
                **inputs, do_sample=True, temperature=self.gen.llm_temperature, top_p=self.gen.llm_top_p,
                max_new_tokens=_TOKENS_PER_CAPTION * max(n for _, n in requests) + 32,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def write(
        self, need: dict[tuple[str, ...], int], allowed: set[str], seed_tag: str,
        dedupe: NearDuplicates, rejections: list[Verdict] | None = None,
    ) -> tuple[dict[tuple[str, ...], list[Verdict]], WriteStats]:
        """Up to ``need[c]`` accepted captions for each class combination ``c``.

        Requests go in batches of ``generate.llm_batch_size``; batch b of attempt a samples with
        a seed from (``seed_tag``, a, b), so the same round asks the same questions with the
        same seeds. Rejected captions are appended to ``rejections`` when given.
        """
        got: dict[tuple[str, ...], list[Verdict]] = {c: [] for c in need}
        stats = WriteStats()
        per = self.gen.llm_captions_per_request
        for attempt in range(MAX_ATTEMPTS):
            short = {c: n - len(got[c]) for c, n in need.items() if len(got[c]) < n}
            if not short:
                break
            requests = []
            for classes in sorted(short):
                ask = math.ceil(short[classes] * _OVERSHOOT)
                requests += [(classes, min(per, ask - i)) for i in range(0, ask, per)]
            batch = self.gen.llm_batch_size
            for b in range(0, len(requests), batch):
                chunk = requests[b : b + batch]
                seed = hash_seed(f"{seed_tag}:attempt{attempt}:batch{b // batch}")
                for (classes, n), answer in zip(chunk, self.complete(chunk, seed)):
                    stats.asked += n
                    for caption in parse_captions(answer):
                        stats.parsed += 1
                        verdict = check_caption(caption, classes, allowed, self.gen.max_classes_per_prompt,
                                                self.count_tokens, self.max_tokens)
                        if verdict.accepted and not dedupe.add(caption, verdict.classes):
                            verdict = Verdict(caption, reason="near-duplicate of an earlier caption")
                        if not verdict.accepted:
                            stats.rejected[_reason_kind(verdict.reason)] += 1
                            if rejections is not None:
                                rejections.append(verdict)
                            continue
                        stats.accepted += 1
                        if len(got[classes]) < need[classes]:
                            got[classes].append(verdict)
                            stats.kept += 1
        return got, stats


def check_llm(cfg: Config) -> None:
    """The prompt-writing language model, checked like SD's weights: a folder or a cached model
    passes at once; offline and not cached, or an unreachable hub, stops here in seconds rather
    than after minutes of the hub client's download retries, and before the run folder is made."""
    if is_local_path(cfg.generate.llm):
        return
    hub_model_ready(cfg.generate.llm, cfg.generate.llm_revision, "config.json",
                    "pass --generate.llm PATH to use a local model folder", what="the language model ")


@contextmanager
def open_writer(cfg: Config) -> Iterator[CaptionWriter]:
    """Load the configured language model for the duration of the block, then free it (and the
    GPU memory it held) so Stable Diffusion can load after."""
    device = resolve_device(cfg.model.device, "model.device")
    clip = clip_tokenizer(cfg.model)
    log.info("loading the language model %s", cfg.generate.llm)
    model, tokenizer = load_llm(cfg.generate.llm, cfg.generate.llm_revision, device)
    writer = CaptionWriter(model, tokenizer, cfg.generate, lambda text: len(clip(text, verbose=False).input_ids), clip.model_max_length)
    try:
        yield writer
    finally:
        writer.model = writer.tokenizer = None
        del model, tokenizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
