"""Attention capture: record the attention maps the label method needs while SD generates.

Only the layers that are read get a recording processor: cross-attention at latent /
cross_factor and self-attention at latent / self_factor. Each wraps the layer's own processor,
so the layer's output (and the image) is computed exactly as without capture, by fused SDPA;
the probabilities are computed beside it from the conditional half of the batch only and
added, head-averaged, into running sums preallocated on the device. Memory does not grow with
the number of steps, and every processor is restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from ..core.errors import UserError


def layer_grid(name: str, num_levels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The spatial grid an attention layer works on, from its place in the UNet.

    Level i of the down path works at latent / 2**i; the up path mirrors it; the mid block is
    at the coarsest level. This holds for SD 1.x and 2.x layouts.
    """
    block, index = name.split(".")[:2]
    if block == "down_blocks":
        level = int(index)
    elif block == "up_blocks":
        level = num_levels - 1 - int(index)
    elif block == "mid_block":
        level = num_levels - 1
    else:
        raise ValueError(f"unexpected attention layer {name!r}")
    return latent_hw[0] >> level, latent_hw[1] >> level


class AttentionStore:
    """Running sums of head-averaged attention probabilities for a batch of samples."""

    def __init__(
        self, capacity: int, cross_hw: tuple[int, int], self_hw: tuple[int, int], text_len: int,
        device: torch.device,
    ) -> None:
        self.cross_hw, self.self_hw = cross_hw, self_hw
        n_cross, n_self = cross_hw[0] * cross_hw[1], self_hw[0] * self_hw[1]
        self.cross_sum = torch.zeros(capacity, n_cross, text_len, device=device)
        self.self_sum = torch.zeros(capacity, n_self, n_self, device=device)
        self.batch_size = capacity
        self.cross_calls = 0
        self.self_calls = 0

    def begin(self, batch_size: int) -> None:
        """Start a new batch of ``batch_size`` samples (at most the capacity)."""
        if batch_size > self.cross_sum.shape[0]:
            raise ValueError(f"batch of {batch_size} exceeds the capture capacity {self.cross_sum.shape[0]}")
        self.batch_size = batch_size
        self.cross_sum[:batch_size].zero_()
        self.self_sum[:batch_size].zero_()
        self.cross_calls = self.self_calls = 0

    def conditional(self, batch: torch.Tensor) -> torch.Tensor:
        """The conditional half of a classifier-free-guidance batch [uncond, cond]."""
        if batch.shape[0] == 2 * self.batch_size:
            return batch[self.batch_size:]
        if batch.shape[0] == self.batch_size:
            return batch
        raise RuntimeError(f"attention batch of {batch.shape[0]} does not match {self.batch_size} samples")

    def add(self, kind: str, probs: torch.Tensor) -> None:
        target = self.cross_sum if kind == "cross" else self.self_sum
        if probs.shape[1:] != target.shape[1:]:
            raise RuntimeError(f"{kind}-attention map of shape {tuple(probs.shape[1:])}, expected {tuple(target.shape[1:])}")
        target[: self.batch_size] += probs
        if kind == "cross":
            self.cross_calls += 1
        else:
            self.self_calls += 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross (B, Nc, T) and self (B, Ns, Ns) attention over every recorded layer and step."""
        if not self.cross_calls or not self.self_calls:
            raise RuntimeError("no attention was recorded; did the pipeline run inside the capture?")
        b = self.batch_size
        return self.cross_sum[:b] / self.cross_calls, self.self_sum[:b] / self.self_calls


def head_mean_probs(attn: Attention, hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities of one layer, averaged over heads: (B, Nq, Nk), float32.

    Computed from the layer's own q and k projections, in float32 whatever the model's dtype,
    one head at a time so the peak memory is one (B, Nq, Nk) map.
    """
    if context is None:
        context = hidden
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query, key = attn.to_q(hidden), attn.to_k(context)
    b, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(b, -1, heads, head_dim).transpose(1, 2)
    key = key.view(b, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    total = torch.zeros(b, query.shape[2], key.shape[2], device=query.device)
    for h in range(heads):
        scores = torch.bmm(query[:, h].float(), key[:, h].float().transpose(1, 2)) * attn.scale
        total += scores.softmax(dim=-1)
    return total / heads


class RecordingProcessor:
    """Runs the layer's original processor and records its probabilities beside it."""

    def __init__(self, inner: object, store: AttentionStore, kind: str) -> None:
        self.inner, self.store, self.kind = inner, store, kind

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs,
    ) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        with torch.no_grad():
            hidden = self.store.conditional(hidden_states)
            context = None if encoder_hidden_states is None else self.store.conditional(encoder_hidden_states)
            self.store.add(self.kind, head_mean_probs(attn, hidden, context))
        return out


def plan_layers(
    unet: UNet2DConditionModel, latent_hw: tuple[int, int], cross_factor: int, self_factor: int
) -> dict[str, str]:
    """Processor key -> 'cross' or 'self' for the layers to record."""
    levels = len(unet.config.block_out_channels)
    cross_hw = (latent_hw[0] // cross_factor, latent_hw[1] // cross_factor)
    self_hw = (latent_hw[0] // self_factor, latent_hw[1] // self_factor)
    plan: dict[str, str] = {}
    for name in unet.attn_processors:
        grid = layer_grid(name, levels, latent_hw)
        if name.endswith("attn2.processor") and grid == cross_hw:
            plan[name] = "cross"
        elif name.endswith("attn1.processor") and grid == self_hw:
            plan[name] = "self"
    kinds = set(plan.values())
    if kinds != {"cross", "self"}:
        raise UserError(
            f"the UNet has no {'cross' if 'cross' not in kinds else 'self'}-attention layer at "
            f"{cross_hw if 'cross' not in kinds else self_hw}; check label.cross_factor / label.self_factor"
        )
    return plan


@contextmanager
def capture_attention(
    unet: UNet2DConditionModel, capacity: int, latent_hw: tuple[int, int], cross_factor: int, self_factor: int,
    text_len: int,
) -> Iterator[AttentionStore]:
    """Install recording processors on the planned layers; restore the originals on exit.

    Install it after ``enable_attention_slicing`` or xformers, which replace every processor.
    """
    original = dict(unet.attn_processors)
    plan = plan_layers(unet, latent_hw, cross_factor, self_factor)
    device = next(unet.parameters()).device
    store = AttentionStore(
        capacity,
        (latent_hw[0] // cross_factor, latent_hw[1] // cross_factor),
        (latent_hw[0] // self_factor, latent_hw[1] // self_factor),
        text_len,
        device,
    )
    # set_attn_processor pops keys from the dict it is given: always pass a fresh one.
    unet.set_attn_processor(
        {name: RecordingProcessor(proc, store, plan[name]) if name in plan else proc for name, proc in original.items()}
    )
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))
