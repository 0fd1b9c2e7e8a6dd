"""Which torch device a command runs on, how many cores it may use, and how train.devices splits the batch."""

from __future__ import annotations

import os

import torch

from .config import TrainConfig, device_count
from .errors import ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """'auto' is CUDA when available, else the CPU; a named device must exist (``key`` names
    the setting in the error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {name!r} but CUDA is not available")
    return device


def usable_cpus() -> int:
    """The cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def lightning_devices(devices: str) -> str | int:
    """``train.devices`` as Lightning takes it: a count as an int, ids and 'auto' as given."""
    return int(devices) if devices.lstrip("-").isdigit() else devices


def per_device_batch(cfg: TrainConfig, world: int) -> int:
    """``train.batch_size`` is the total batch (the protocol's 8): each of ``world`` devices takes
    an equal share, so the learning rate and schedule hold; a count that does not divide it is refused."""
    _require(
        cfg.batch_size % world == 0,
        f"train.batch_size {cfg.batch_size} is the total batch and cannot be split over {world} devices "
        f"(train.devices x train.num_nodes); use a device count that divides it",
    )
    return cfg.batch_size // world


def check_batch_split(cfg: TrainConfig, world: int | None = None) -> None:
    """Refuse, before anything starts, a device count that cannot share the total batch: ``world``
    processes, or the count ``train.devices`` x ``train.num_nodes`` names. Only the commands that
    train ask: generation has no batch to split."""
    named = device_count(cfg.devices)
    if world is None:
        if named is None:
            return
        world = named * cfg.num_nodes
    if cfg.batch_size % world and named is None:
        # 'auto' found the devices: name the most of them that can share the batch.
        fits = [d for d in range(1, world // cfg.num_nodes + 1) if cfg.batch_size % (d * cfg.num_nodes) == 0]
        hint = f" (here --devices {fits[-1]})" if fits else ""
        raise ConfigError(
            f"train.devices {cfg.devices} found {world} devices in all (train.devices x train.num_nodes), which cannot "
            f"share the total batch train.batch_size {cfg.batch_size}; pass --devices with a count that divides it{hint}"
        )
    per_device_batch(cfg, world)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)
