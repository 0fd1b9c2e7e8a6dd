"""Attention capture: record the attention maps the label method needs while SD generates.

Only the layers that are read get a recording processor: cross-attention at latent / f for each
factor of ``label.cross_factor`` and ``label.extra_cross_factors``, self-attention at latent / f
for ``label.self_factor`` and ``label.extra_self_factor``. Each wraps the layer's own processor,
so the layer's output (and the image) is computed exactly as without capture, by fused SDPA;
the probabilities are computed beside it from the conditional half of the batch only, in query
chunks of at most ``CHUNK_BYTES`` per map, and added, head-averaged, into one running sum per
grid preallocated on the device. Memory does not grow with the number of steps, and every
processor is restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from ..core.errors import UserError

Grid = tuple[int, int]
Key = tuple[str, Grid]
"""A running sum's key: ('cross' or 'self', the grid)."""

CHUNK_BYTES = 256 * 2**20
"""Largest float32 (B, rows, Nk) block of probabilities computed at once. The default grids at
512 px (a 32x32 self map is 4 MiB per sample) fit in one chunk up to batch 64, so they are
computed exactly as before chunking existed; a 64x64 self map (64 MiB per sample) is cut."""


def grid_of(latent_hw: Grid, factor: int) -> Grid:
    """The grid at latent / factor."""
    return latent_hw[0] // factor, latent_hw[1] // factor


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
    """Running sums of head-averaged attention probabilities for a batch of samples, one per grid."""

    def __init__(
        self, capacity: int, cross_grids: Sequence[Grid], self_grids: Sequence[Grid], text_len: int,
        device: torch.device, chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.cross_grids, self.self_grids = tuple(cross_grids), tuple(self_grids)
        self.sums: dict[Key, torch.Tensor] = {}
        for hw in self.cross_grids:
            self.sums["cross", hw] = torch.zeros(capacity, hw[0] * hw[1], text_len, device=device)
        for hw in self.self_grids:
            self.sums["self", hw] = torch.zeros(capacity, hw[0] * hw[1], hw[0] * hw[1], device=device)
        self.calls = dict.fromkeys(self.sums, 0)
        self.capacity = self.batch_size = capacity
        self.chunk_bytes = chunk_bytes

    def begin(self, batch_size: int) -> None:
        """Start a new batch of ``batch_size`` samples (at most the capacity)."""
        if batch_size > self.capacity:
            raise ValueError(f"batch of {batch_size} exceeds the capture capacity {self.capacity}")
        self.batch_size = batch_size
        for key, total in self.sums.items():
            total[:batch_size].zero_()
            self.calls[key] = 0

    def conditional(self, batch: torch.Tensor) -> torch.Tensor:
        """The conditional half of a classifier-free-guidance batch [uncond, cond]."""
        if batch.shape[0] == 2 * self.batch_size:
            return batch[self.batch_size:]
        if batch.shape[0] == self.batch_size:
            return batch
        raise RuntimeError(f"attention batch of {batch.shape[0]} does not match {self.batch_size} samples")

    def record(self, key: Key, attn: Attention, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
        """Add one layer's head-averaged probabilities (conditional half) into ``key``'s running sum."""
        context = None if context is None else self.conditional(context)
        add_head_mean_probs(self.sums[key][: self.batch_size], attn, self.conditional(hidden), context, self.chunk_bytes)
        self.calls[key] += 1

    def sample_means(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sample ``i``'s mean attention over every recorded layer and step: per cross grid (Nc, T),
        in ``cross_grids``' order, and per self grid (Ns, Ns), in ``self_grids``' order. One sample
        at a time: a 64x64 self map is 64 MiB, and a copy of the whole batch's would double the sums."""
        if not all(self.calls.values()):
            raise RuntimeError("no attention was recorded; did the pipeline run inside the capture?")
        if not 0 <= i < self.batch_size:
            raise IndexError(f"sample {i} of a batch of {self.batch_size}")
        cross = [self.sums["cross", hw][i] / self.calls["cross", hw] for hw in self.cross_grids]
        return cross, [self.sums["self", hw][i] / self.calls["self", hw] for hw in self.self_grids]


def add_head_mean_probs(
    target: torch.Tensor, attn: Attention, hidden: torch.Tensor, context: torch.Tensor | None,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Add one layer's attention probabilities, averaged over heads, into ``target`` (B, Nq, Nk).

    Computed from the layer's own q and k projections, in float32 whatever the model's dtype,
    one head at a time and ``chunk_bytes // (B * Nk * 4)`` query rows at a time: the transient is
    three (B, rows, Nk) float32 blocks (scores, probabilities, their head sum), at most
    3 x ``chunk_bytes``, whatever the grid.
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
    nq, nk = query.shape[2], key.shape[2]
    if target.shape != (b, nq, nk):
        raise RuntimeError(f"attention map of shape {(b, nq, nk)}, expected {tuple(target.shape)}")
    rows = max(1, chunk_bytes // (b * nk * 4))
    for start in range(0, nq, rows):
        chunk = query[:, :, start : start + rows]
        total = torch.zeros(b, chunk.shape[2], nk, device=query.device)
        for h in range(heads):
            scores = torch.bmm(chunk[:, h].float(), key[:, h].float().transpose(1, 2))
            total += scores.mul_(attn.scale).softmax(dim=-1)  # in place: one allocation fewer, same bits
        target[:, start : start + rows] += total / heads


class RecordingProcessor:
    """Runs the layer's original processor and records its probabilities beside it."""

    def __init__(self, inner: object, store: AttentionStore, key: Key) -> None:
        self.inner, self.store, self.key = inner, store, key

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs,
    ) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        with torch.no_grad():
            self.store.record(self.key, attn, hidden_states, encoder_hidden_states)
        return out


def plan_layers(
    unet: UNet2DConditionModel, latent_hw: Grid, cross_factors: Sequence[int], self_factors: Sequence[int]
) -> dict[str, Key]:
    """Processor key -> ('cross' or 'self', grid) for the layers to record; every grid asked for
    must have at least one layer of its kind, or a UserError names it."""
    levels = len(unet.config.block_out_channels)
    wanted = {"cross": {grid_of(latent_hw, f) for f in cross_factors}, "self": {grid_of(latent_hw, f) for f in self_factors}}
    plan: dict[str, Key] = {}
    for name in unet.attn_processors:
        grid = layer_grid(name, levels, latent_hw)
        kind = "cross" if name.endswith("attn2.processor") else "self" if name.endswith("attn1.processor") else None
        if kind is not None and grid in wanted[kind]:
            plan[name] = kind, grid
    for kind, factors, option in (
        ("cross", cross_factors, "label.cross_factor / label.extra_cross_factors"),
        ("self", self_factors, "label.self_factor / label.extra_self_factor"),
    ):
        for factor in factors:
            if (kind, grid_of(latent_hw, factor)) not in plan.values():
                have = sorted({layer_grid(n, levels, latent_hw) for n in unet.attn_processors
                               if n.endswith("attn2.processor" if kind == "cross" else "attn1.processor")}, reverse=True)
                h, w = grid_of(latent_hw, factor)
                raise UserError(
                    f"the UNet has no {kind}-attention layer at {h}x{w} (latent / {factor}); its {kind}-attention "
                    f"grids are {', '.join(f'{a}x{b}' for a, b in have)}: check {option}"
                )
    return plan


@contextmanager
def capture_attention(
    unet: UNet2DConditionModel, capacity: int, latent_hw: Grid, cross_factors: Sequence[int],
    self_factors: Sequence[int], text_len: int, chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[AttentionStore]:
    """Install recording processors on the planned layers; restore the originals on exit.

    The store's grids follow the factors' order (``label.cross_weights`` pairs with the cross
    grids in that order). Install it after ``enable_attention_slicing`` or xformers, which
    replace every processor.
    """
    original = dict(unet.attn_processors)
    plan = plan_layers(unet, latent_hw, cross_factors, self_factors)
    device = next(unet.parameters()).device
    store = AttentionStore(
        capacity, [grid_of(latent_hw, f) for f in cross_factors], [grid_of(latent_hw, f) for f in self_factors],
        text_len, device, chunk_bytes,
    )
    # set_attn_processor pops keys from the dict it is given: always pass a fresh one.
    unet.set_attn_processor(
        {name: RecordingProcessor(proc, store, plan[name]) if name in plan else proc for name, proc in original.items()}
    )
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))
