"""Held-out predictions of a round, sharded over ranks.

Fold model k predicts the samples of fold k. The samples are cut into chunks of ``batch_size``
in the single-process order, and whole chunks are dealt to the ranks, so each image is
predicted in the same batch as in a single process and its probabilities are the same bits
(CPU and GPU kernels may round differently with another batch). What a rank counts from its
shard (confusion matrices, pixel totals) is merged with ``Dist.all_reduce_sum``; pictures
never leave the rank that predicted them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn as nn

from ..core.layout import RunLayout
from ..scaleout.dist import SINGLE, Dist
from ..segmentation import network
from .pool import Active
from .refine import Restricted, restricted

T = TypeVar("T")


def chunks(groups: Sequence[Sequence[T]], batch_size: int) -> list[tuple[int, list[T]]]:
    """(fold, chunk) in the single-process order: fold by fold, ``batch_size`` samples each."""
    return [(k, list(group[i : i + batch_size])) for k, group in enumerate(groups) for i in range(0, len(group), batch_size)]


def predict_shard(
    models: Sequence[nn.Module], groups: Sequence[Sequence[T]], batch_size: int, dist: Dist = SINGLE,
    image: Callable[[T], str | Path | np.ndarray] = lambda item: item,  # type: ignore[assignment,return-value]
    flip: bool = False,
) -> Iterator[tuple[T, np.ndarray]]:
    """This rank's share of a pass: (item, softmax probabilities (21, H, W)) with
    ``models[k]`` predicting ``groups[k]``; over all ranks, every item exactly once. ``flip``
    averages each with its mirror's (``network.predict_proba``), in the same batches."""
    for k, chunk in dist.mine(chunks(groups, batch_size)):
        yield from zip(chunk, network.predict_proba(models[k], [image(item) for item in chunk], batch_size=batch_size,
                                                    flip=flip))


def load_fold_models(run: RunLayout, r: int, folds: int, device: torch.device) -> list[nn.Module]:
    """Round ``r``'s fold models, in eval mode on ``device``."""
    return [network.load_model(run.fold(r, k).weights, device) for k in range(folds)]


def held_out_pass(
    models: Sequence[nn.Module], groups: Sequence[Sequence[Active]], batch_size: int, dist: Dist = SINGLE,
    flip: bool = False,
) -> Callable[[], Iterator[tuple[Active, Restricted]]]:
    """A pass over every sample with the prediction of the fold model that did not train on it,
    restricted to the sample's classes; fold by fold, in batches, with flip test-time
    augmentation if ``flip``. Each call is a new pass over this rank's share; over all ranks,
    every sample once, in the single-process batches."""

    def one_pass() -> Iterator[tuple[Active, Restricted]]:
        for a, p in predict_shard(models, groups, batch_size, dist, lambda a: a.sample.image, flip):
            yield a, restricted(p, a.allowed)

    return one_pass
