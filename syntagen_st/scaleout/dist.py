"""One process group for a whole command, and the few collectives the loop needs.

Design: **rank 0 owns the run folder.** Lightning Fabric starts the processes once, at the start
of a command: it re-runs the command line for the other local ranks, or finds the ranks that
``torchrun`` or SLURM started. Every rank then walks the same loop. Only rank 0 decides which
steps are done, deletes and creates step folders, writes ``state.json``, prompt files and merged
results; the other ranks compute their shard of a step and write only their own samples (or
fold models). Barriers separate the steps. A single process is the special case world = 1, so
one code path serves both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DistributedSampler

from ..core.config import TrainConfig
from ..core.device import check_batch_split, lightning_devices
from ..core.errors import UserError, first_line

if TYPE_CHECKING:
    from lightning_fabric import Fabric

T = TypeVar("T")

# A rank waits at a barrier while rank 0 alone exports or writes prompts with a language model.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


class RankFailure(UserError):
    """Another rank stopped (crash, kill, or its own error): one line, and rerunning the command resumes."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the default is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    """The accelerator device of this rank when the job is distributed over GPUs."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective(self, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except (RuntimeError, torch_dist.DistBackendError) as err:
            first = first_line(err)
            raise RankFailure(f"rank {self.rank}: another rank stopped ({first}); rerun the same command to resume") from None

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(torch_dist.barrier)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a decision only rank 0 may take)."""
        if self.world == 1:
            return obj
        box = [obj]
        self._collective(torch_dist.broadcast_object_list, box, 0)
        return box[0]

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``array`` over ranks (counts: exact in int64 / float64)."""
        if self.world == 1:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        on_device = self.device is not None and torch_dist.get_backend() == "nccl"
        work = tensor.to(self.device) if on_device else tensor.clone()
        self._collective(torch_dist.all_reduce, work)
        return work.cpu().numpy()

    def all_gather_objects(self, obj: T) -> list[T]:
        """Every rank's small ``obj`` (ids, scores), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self._collective(torch_dist.all_gather_object, out, obj)
        return out

    def main_first(self, fn: Callable[[], T], others: bool = True) -> T | None:
        """Run ``fn`` on rank 0, then (``others``) on the other ranks once it is done, e.g. rank 0
        writes a file the others then read; with ``others=False`` they only wait. An error on
        rank 0 stops every rank with rank 0's message."""
        out = None
        if self.is_main:
            try:
                out = fn()
            except BaseException as err:
                self.share_outcome(err)
                raise
        self.share_outcome(None)
        if others and not self.is_main:
            out = fn()
        return out

    @contextmanager
    def main_holds(self, context: AbstractContextManager) -> Iterator[None]:
        """``context`` held by rank 0 alone for the block, e.g. the run folder's lock: rank 0 owns
        the folder. An error on entering it stops every rank with rank 0's message."""
        with ExitStack() as held:
            self.main_first(lambda: held.enter_context(context), others=False)
            yield

    def from_main(self, fn: Callable[[], T]) -> T:
        """Rank 0's ``fn()`` on every rank: one reading of the run folder for all of them (on a
        shared file system another node's cached listing may lag behind)."""
        return self.broadcast(self.main_first(fn, others=False))  # type: ignore[arg-type]

    def share_outcome(self, error: BaseException | None) -> None:
        """Every rank says how its part ended, at a point where all of them wait for it: a rank that
        failed then re-raises its own error, the others stop with the first failure's message.
        Without this, ranks left waiting for one that stopped alone would hold their GPUs until
        the collective timeout."""
        if self.world == 1:
            return
        said = describe(error) if error is not None else None
        try:
            failures = [(rank, text) for rank, text in enumerate(self.all_gather_objects(said)) if text is not None]
        except RankFailure:
            if error is not None:
                return  # the caller re-raises its own error
            raise
        if failures and error is None:
            rank, text = failures[0]
            raise RankFailure(f"rank {rank} stopped: {text}")

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every world-th one from its rank on, no padding."""
        return [items[i] for i in ShardSampler(items, self)]


SINGLE = Dist()


def describe(error: BaseException) -> str:
    if isinstance(error, UserError):
        return str(error)
    first = first_line(error, "")
    return f"{type(error).__name__}: {first}; rerun the same command to resume" if first else type(error).__name__


class ShardSampler(DistributedSampler):
    """A DistributedSampler over a sequence in order, without the padding duplicates: each index
    is on exactly one rank, so nothing is computed (or written) twice."""

    def __init__(self, dataset: Sequence, dist: Dist) -> None:
        super().__init__(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=False, drop_last=False)  # type: ignore[arg-type]
        self.total = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.num_replicas))


def launch(cfg: TrainConfig, split_batch: bool = True) -> Dist:
    """Start (or join) the job's processes for ``train.devices`` x ``train.num_nodes`` and return
    this process's place; one process and no launcher around it: no process group at all.
    ``split_batch``: the command trains, so the device count must divide the total batch."""
    from lightning_fabric.strategies import DDPStrategy

    if torch_dist.is_available() and torch_dist.is_initialized():
        return current()
    external = int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = training_world(cfg) if split_batch else planned_world(cfg)
    if world == 1 and not external:
        return SINGLE
    fabric = _fabric(cfg, strategy=DDPStrategy(timeout=COLLECTIVE_TIMEOUT))
    fabric.launch()
    return current(fabric.device)


def planned_world(cfg: TrainConfig) -> int:
    """How many processes ``train.devices`` x ``train.num_nodes`` make on this machine, as
    Lightning counts them (for 'auto' too); nothing is started."""
    return _fabric(cfg).world_size


def training_world(cfg: TrainConfig) -> int:
    """``planned_world`` for a command that trains: a count that cannot share the total batch is
    refused in one line, a count named on the command line before Lightning looks for devices."""
    check_batch_split(cfg)
    world = planned_world(cfg)
    check_batch_split(cfg, world)
    return world


def _fabric(cfg: TrainConfig, **options: Any) -> Fabric:
    from lightning_fabric import Fabric

    with devices_checked(cfg):
        return Fabric(accelerator=cfg.accelerator, devices=lightning_devices(cfg.devices), num_nodes=cfg.num_nodes, **options)


@contextmanager
def devices_checked(cfg: TrainConfig) -> Iterator[None]:
    """Lightning's word on devices it cannot use (none of that kind, more GPUs than the machine
    has, ids it lacks) as one line naming the settings, around building a Fabric or a Trainer."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (MisconfigurationException, RuntimeError, TypeError, ValueError, ImportError) as err:
        raise UserError(f"train.accelerator {cfg.accelerator} with train.devices {cfg.devices}: {first_line(err)}") from None


def current(device: torch.device | None = None) -> Dist:
    """The place of this process in an initialised process group (or a single process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return SINGLE
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                device if device is not None and device.type == "cuda" else None)


@contextmanager
def acting_as_rank_zero() -> Iterator[None]:
    """Lightning's rank-zero-only hooks (loggers, messages) run in a single-device training that
    a rank does on its own, e.g. one fold model per rank."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    saved = rank_zero_only.rank
    rank_zero_only.rank = 0
    try:
        yield
    finally:
        rank_zero_only.rank = saved
