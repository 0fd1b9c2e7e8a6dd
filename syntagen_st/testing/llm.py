"""A tiny chat language model, built and trained offline in seconds, for the LLM-prompt tests.

It learns to answer the caption writer's question with numbered template captions, so its
answers are parseable like a real instruct model's.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..prompts.llm import build_messages
from ..prompts.records import phrase_caption

LLM_SPECIALS = ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_chat_corpus(classes: list[str], seed: int = 0, per_combination: int = 8, max_classes: int = 2) -> list[list[dict]]:
    """Chats asking the writer's question for every combination of up to ``max_classes`` of
    ``classes``, answered with numbered template captions: what a tiny model learns to imitate."""
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
