"""Loading Stable Diffusion: from the hub, a local diffusers folder, or the tiny offline builder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from ..core.config import TINY_MODELS, ModelConfig, is_local_path
from ..core.errors import ConfigError, UserError, first_line

_SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float16 on CUDA and float32 on CPU unless the config names a dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type == "cpu":
        raise ConfigError("model.dtype float16 needs a CUDA device; use float32 or bfloat16 on CPU")
    return getattr(torch, name)


def load_pipeline(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from a hub id, a local diffusers folder, or the tiny builder."""
    if cfg.pretrained in TINY_MODELS:
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(cfg.pretrained)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        ref = str(Path(cfg.pretrained).expanduser()) if is_local_path(cfg.pretrained) else cfg.pretrained
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                ref, revision=cfg.revision, dtype=dtype, use_safetensors=True,
                safety_checker=None, requires_safety_checker=False,
            )
        except (OSError, ValueError) as err:
            first = first_line(err)
            raise UserError(f"cannot load Stable Diffusion from {cfg.pretrained!r}: {first}") from None
    if cfg.scheduler != "default":
        pipe.scheduler = _SCHEDULERS[cfg.scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
