"""Which torch device a command runs on, and how many cores it may use."""

from __future__ import annotations

import os

import torch

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
