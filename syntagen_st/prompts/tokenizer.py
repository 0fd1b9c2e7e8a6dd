"""The text encoder's tokenizer: Stable Diffusion's own CLIP tokenizer, or the tiny pipeline's,
built in memory (no download) so that every template word is one token."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from ..core.classes import FOREGROUND_CLASSES, display_name
from ..core.config import TINY_MODELS, ModelConfig, is_local_path
from ..core.errors import UserError, first_line
from .records import template_vocabulary

MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to unused code points.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(words: set[str] | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in memory: every byte is a token, and each word in ``words`` (the
    template vocabulary by default) gets a merge path to a single whole-word token."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    words = words if words is not None else template_vocabulary()
    # Class-name words take the first (strongest) merges, longest first so that no shorter
    # word's merge splits a longer one: each class name becomes whole-word tokens.
    class_words = sorted({w for c in FOREGROUND_CLASSES for w in display_name(c).split()}, key=lambda w: (-len(w), w))
    for word in class_words + sorted(words - set(class_words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = (left, right)
            left = left + right
            if left not in vocab:
                vocab[left] = len(vocab)
                merges.append(merge)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def clip_tokenizer(cfg: ModelConfig) -> CLIPTokenizer:
    """The text encoder's tokenizer of the configured Stable Diffusion (for the 77-token check)."""
    if cfg.pretrained in TINY_MODELS:
        return build_tokenizer()
    ref = str(Path(cfg.pretrained).expanduser()) if is_local_path(cfg.pretrained) else cfg.pretrained
    try:
        return CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", revision=cfg.revision)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of {cfg.pretrained!r}: {first_line(err)}") from None
