"""Before a run touches the disk or the network: what it will cost here, and whether it can start.

A real run is 10,000 Stable Diffusion images: hours on a GPU, months on a laptop's CPU, and a
~4 GB download first. A run that cannot reasonably start here stops with one line saying what to
do instead, before any file is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.config import TINY_MODELS, Config, is_local_path
from ..core.device import resolve_device, usable_cpus
from ..core.errors import UserError
from ..core.hub import hub_model_ready
from ..prompts.llm import check_llm
from ..prompts.records import load_prompt_file

# Rough speeds of one denoising step of one 512x512 image with classifier-free guidance (two
# UNet passes), SD 1.5, masks included. The CPU figure is scripts/bench_generate.py's on this
# project's 2-core machine (48.7 s a step, fp32); the GPU figure is a recent data-centre card
# in fp16 at batch 8. They are for an order of magnitude, not a schedule.
CPU_CORE_SECONDS_PER_STEP = 97.0
GPU_STEPS_PER_SECOND = 100.0


@dataclass(frozen=True)
class Plan:
    images: int
    height: int
    width: int
    steps: int
    guidance: bool
    device: torch.device

    def seconds(self, cores: int) -> float:
        """Generation time, rough: linear in pixels, steps and UNet passes."""
        work = self.images * self.steps * (self.height * self.width) / 512**2 * (1.0 if self.guidance else 0.5)
        if self.device.type == "cuda":
            return work / GPU_STEPS_PER_SECOND
        return work * CPU_CORE_SECONDS_PER_STEP / max(cores, 1)


def human_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size * (2 if unit == "days" else 1):
            return f"about {seconds / size:.0f} {unit}"
    return "under a minute"


def generation_plan(cfg: Config, images: int) -> Plan:
    gen = cfg.generate
    return Plan(images, gen.height, gen.width, gen.steps, gen.guidance_scale > 1, resolve_device(cfg.model.device, "model.device"))


def describe(cfg: Config, plan: Plan) -> str:
    """One line: what will be generated, where, and roughly how long it takes."""
    where = plan.device.type
    if plan.device.type == "cuda":
        where = f"{plan.device} ({torch.cuda.get_device_name(plan.device)})"
    text = (f"plan: {plan.images:,} images of {plan.width}x{plan.height} at {plan.steps} steps with "
            f"{cfg.model.pretrained} on {where}")
    if cfg.model.pretrained not in TINY_MODELS:
        text += f", {human_duration(plan.seconds(usable_cpus()))} of generation (rough)"
    return text


def check_hub(cfg: Config) -> None:
    """A hub model must be in the local cache or reachable, else the run stops here rather than
    after diffusers' long cache message."""
    hub_model_ready(cfg.model.pretrained, cfg.model.revision, "model_index.json",
                    "pass --model.pretrained PATH to use a local diffusers folder")


def preflight(cfg: Config, images: int) -> str:
    """Check that generating ``images`` can start here; return the plan line to print.

    With model.device 'auto' and no CUDA device, a real model is refused: the CPU would take
    days. Naming the CPU (``--model.device cpu``) goes ahead anyway.
    """
    plan = generation_plan(cfg, images)
    real = cfg.model.pretrained not in TINY_MODELS
    if real and images and plan.device.type == "cpu" and cfg.model.device == "auto":
        raise UserError(
            f"no CUDA device: {images:,} images of {plan.width}x{plan.height} at {plan.steps} steps with "
            f"{cfg.model.pretrained} would take {human_duration(plan.seconds(usable_cpus()))} on this CPU; for a quick "
            "offline run use --config configs/smoke.yaml, or pass --model.device cpu to go ahead anyway"
        )
    if real and images and not is_local_path(cfg.model.pretrained):
        check_hub(cfg)
    if images and cfg.generate.prompt_source == "llm":
        check_llm(cfg)
    if cfg.generate.prompts_file is not None:
        load_prompt_file(cfg.generate.prompts_file)  # a bad line is refused now, not mid-run
    return describe(cfg, plan)
