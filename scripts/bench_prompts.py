"""Diversity of prompts: the built-in templates against the language-model writer.

    python scripts/bench_prompts.py                       # offline: a tiny chat model trained here
    python scripts/bench_prompts.py --llm /models/Qwen2.5-1.5B-Instruct --clip /models/sd15

For N prompts of round 0 from each source it prints: distinct captions, distinct word 3-grams
per caption, and the mean pairwise cosine similarity of their CLIP text embeddings (lower is
more varied); for the writer also how many of its parsed captions were accepted and how many
prompts the templates had to top up. The last line is the ratio of distinct 3-grams
(goal with a real 1-3B instruct model: >= 2x, with >= 95% of captions accepted).

Offline, the tiny model has only imitated template captions of a few classes for a few
seconds: its numbers check the plumbing, not the method.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from syntagen_st.core.classes import FOREGROUND_CLASSES
from syntagen_st.core.config import Config
from syntagen_st.prompts.records import make_records
from syntagen_st.prompts.rounds import llm_records

TINY_CLASSES = ("dog", "sofa", "cat", "person")


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def text_encoder(clip: str):
    """CLIP's text encoder and tokenizer: from a diffusers folder / hub id, or the tiny one."""
    if clip == "tiny":
        from syntagen_st.generation.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
        return pipe.text_encoder, pipe.tokenizer
    from transformers import CLIPTextModel, CLIPTokenizer

    return CLIPTextModel.from_pretrained(clip, subfolder="text_encoder"), CLIPTokenizer.from_pretrained(clip, subfolder="tokenizer")


@torch.inference_mode()
def mean_similarity(prompts: list[str], encoder, tokenizer, device: torch.device) -> float:
    encoder = encoder.to(device).eval()
    embeddings = []
    for i in range(0, len(prompts), 64):
        ids = tokenizer(prompts[i : i + 64], padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids.to(device)
        embeddings.append(torch.nn.functional.normalize(encoder(ids).pooler_output.float(), dim=-1))
    e = torch.cat(embeddings)
    n = len(e)
    return float(((e @ e.T).sum() - n) / (n * (n - 1)))


def diversity(prompts: list[str], encoder, tokenizer, device) -> dict:
    grams = set().union(*(trigrams(p) for p in prompts))
    return {"distinct": len(set(prompts)), "trigrams_per_caption": len(grams) / len(prompts),
            "clip_similarity": mean_similarity(prompts, encoder, tokenizer, device)}


def tiny_llm_folder(classes: tuple[str, ...], folder: str) -> str:
    from syntagen_st.testing.llm import build_tiny_llm, tiny_chat_corpus, train_tiny_llm

    chats = tiny_chat_corpus(list(classes))
    model, tokenizer = build_tiny_llm(chats)
    train_tiny_llm(model, tokenizer, chats, steps=200)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--llm", help="a chat model (hub id or folder); default: a tiny one trained here")
    parser.add_argument("--clip", default="tiny", help="diffusers folder or hub id whose CLIP text encoder embeds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="generate.llm_batch_size")
    parser.add_argument("--per-request", type=int, default=10, help="generate.llm_captions_per_request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = Config()
    cfg.seed = args.seed
    cfg.model.pretrained = "tiny" if args.clip == "tiny" else args.clip
    cfg.model.device = args.device
    cfg.generate.prompt_source = "llm"
    cfg.generate.llm_batch_size, cfg.generate.llm_captions_per_request = args.batch_size, args.per_request
    cfg.generate.classes = list(FOREGROUND_CLASSES if args.llm else TINY_CLASSES)
    if not args.llm:
        cfg.generate.max_classes_per_prompt = 2  # what the tiny model was trained on
    device = torch.device(args.device)
    encoder, tokenizer = text_encoder(args.clip)

    templates = make_records(cfg.seed, 0, range(args.n), cfg.generate.classes, None, cfg.generate.max_classes_per_prompt)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.generate.llm = args.llm or tiny_llm_folder(TINY_CLASSES, tmp)
        start = time.perf_counter()
        written, stats = llm_records(cfg, 0, range(args.n), None)
        seconds = time.perf_counter() - start

    rows = {"templates": diversity([r.prompt for r in templates], encoder, tokenizer, device),
            "llm": diversity([r.prompt for r in written], encoder, tokenizer, device)}
    print(f"{args.n} prompts each; llm = {args.llm or 'tiny chat GPT-2 (trained here)'}; CLIP = {args.clip}")
    print(f"{'source':<10} {'distinct':>9} {'3-grams/caption':>16} {'CLIP similarity':>16}")
    for name, row in rows.items():
        print(f"{name:<10} {row['distinct']:>9} {row['trigrams_per_caption']:>16.2f} {row['clip_similarity']:>16.3f}")
    print(f"writer: {seconds:.1f} s, {stats['parsed']} captions parsed, {stats['accepted']} accepted "
          f"({(stats['acceptance'] or 0):.1%}), {stats['topped_up']} of {args.n} prompts topped up from templates; "
          f"rejected: {stats['rejected']}")
    ratio = rows["llm"]["trigrams_per_caption"] / rows["templates"]["trigrams_per_caption"]
    print(f"distinct 3-grams per caption, llm / templates: {ratio:.2f} (goal >= 2 with a real model)")


if __name__ == "__main__":
    main()
