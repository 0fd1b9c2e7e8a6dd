"""Tiny random-initialised Stable Diffusion pipelines, built offline from config.

They have SD's layout (four UNet levels, cross-attention on the first three, a VAE that
downsamples 8x) at a few thousand parameters, so the whole generator runs in tests and smoke
runs on a CPU with no weights. ``tiny-sd2`` copies SD 2.x's differences: per-level head counts,
linear projections, upcast attention and wider text states.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .classes import FOREGROUND_CLASSES, display_name
from .prompts import template_vocabulary

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


def build_tiny_pipeline(variant: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A random-initialised pipeline of SD 1.x ('tiny') or SD 2.x ('tiny-sd2') layout."""
    sd2 = variant == "tiny-sd2"
    tokenizer = build_tokenizer()
    text_dim = 64 if sd2 else 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_dim,
        attention_head_dim=(2, 2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    # Random init gives near-uniform attention, whose maps are flat and whose masks are noise;
    # sharper q/k make the tiny model's attention structured, like a trained one's.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.to_q.weight.mul_(4.0)
                module.to_k.weight.mul_(4.0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---------------------------------------------------------------- tiny chat language model

LLM_SPECIALS = ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_chat_corpus(classes: list[str], seed: int = 0, per_combination: int = 8, max_classes: int = 2) -> list[list[dict]]:
    """Chats asking the writer's question for every combination of up to ``max_classes`` of
    ``classes``, answered with numbered template captions: what a tiny model learns to imitate."""
    import itertools

    import numpy as np

    from .llm_writer import build_messages
    from .prompts import phrase_caption

    rng = np.random.default_rng(seed)
    chats = []
    for k in range(1, max_classes + 1):
        for combo in itertools.permutations(classes, k):
            for _ in range(per_combination):
                n = int(rng.integers(1, 5))
                answer = "\n".join(f"{i + 1}. {phrase_caption(rng, combo)}" for i in range(n))
                chats.append([*build_messages(combo, n), {"role": "assistant", "content": answer}])
    return chats


def build_tiny_llm(chats: list[list[dict]], seed: int = 0):
    """A random-initialised 2-layer GPT-2 and a byte-level BPE chat tokenizer trained on ``chats``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=list(LLM_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    plain = PreTrainedTokenizerFast(tokenizer_object=raw)
    plain.chat_template = CHAT_TEMPLATE
    raw.train_from_iterator([plain.apply_chat_template(c, tokenize=False) for c in chats], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|end|>", pad_token="<|pad|>", model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return model, tokenizer


def train_tiny_llm(model, tokenizer, chats: list[list[dict]], steps: int = 200, batch_size: int = 16, seed: int = 0) -> float:
    """A few seconds of next-token training on ``chats``; returns the last loss."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt", add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    loss = torch.tensor(float("nan"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small only lose time to thread hand-offs
    try:
        for _ in range(steps):
            idx = torch.randint(len(texts), (batch_size,), generator=generator)
            loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return float(loss.detach())
