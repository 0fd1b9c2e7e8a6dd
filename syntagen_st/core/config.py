"""Typed configuration: one dataclass per stage, loaded from YAML and overridable from the CLI.

``validate`` refuses bad values before any work starts; every message is one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import yaml

from .classes import FOREGROUND_CLASSES, canonical
from .errors import ConfigError
from .rules import MAX_PAIRS

TINY_MODELS = ("tiny", "tiny-sd2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

NEUTRAL_KEYS = frozenset({
    "name", "model.device", "generate.batch_size", "generate.num_images", "train.num_workers", "train.devices",
    "train.num_nodes", "train.accelerator", "train.logger", "train.wandb_project",
})
"""Settings that never change a run's samples or models: names, placement, speed, logging, and
generate.num_images (fit draws from loop.generate_total; generate makes more of the same samples).
A rerun may change them freely."""


@dataclass
class ModelConfig:
    """Which Stable Diffusion to load, and where to run it."""

    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id, local diffusers folder, or 'tiny' / 'tiny-sd2' (random-initialised, offline)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the weights; None: main."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """'auto': float16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'."""
    scheduler: Literal["default", "ddim", "dpm", "euler"] = "default"
    """The diffusion scheduler: the pipeline's own ('default') or DDIM, DPM-Solver++, Euler."""


@dataclass
class GenerateConfig:
    """Prompt sampling and the diffusion sampler."""

    num_images: int = 1000
    """Images `generate` makes (fit draws from loop.generate_total instead)."""
    batch_size: int = 8
    """Images denoised together; each sample's noise is its own, so this changes speed, not samples."""
    steps: int = 50
    """Denoising steps per image."""
    guidance_scale: float = 7.5
    """Classifier-free guidance; 1 or less turns it off."""
    height: int = 512
    """Image height in pixels (the competition: 512)."""
    width: int = 512
    """Image width in pixels (the competition: 512)."""
    negative_prompt: str = ""
    """What SD is steered away from, for every image ('' for none)."""
    classes: list[str] = field(default_factory=lambda: list(FOREGROUND_CLASSES))
    """Classes prompts may name (VOC names or display names)."""
    max_classes_per_prompt: int = 3
    """At most this many classes named in one prompt."""
    prompt_source: Literal["templates", "file", "llm"] = "templates"
    """Where captions come from: the built-in templates, ``prompts_file``, or the language model
    ``llm``. Each round's prompts are saved to RUN/prompts/round<r>.jsonl before any image."""
    prompts_file: str | None = None
    """JSONL ({"prompt": ..., "classes": [...]}) or plain lines; read when prompt_source is 'file'."""
    llm: str = "Qwen/Qwen2.5-1.5B-Instruct"
    """Causal LM with a chat template that writes captions (hub id or local folder)."""
    llm_revision: str | None = None
    """Hub revision of the language model; None: main."""
    llm_captions_per_request: int = 10
    """Captions asked for in one chat request."""
    llm_batch_size: int = 16
    """Chat requests answered together in one batch."""
    llm_temperature: float = 1.0
    """Sampling temperature of the language model."""
    llm_top_p: float = 0.95
    """Nucleus sampling threshold of the language model."""


@dataclass
class LabelConfig:
    """Attention -> mask (Dataset Diffusion defaults, plus the presence gate)."""

    tau: int = 4
    """Power of the self-attention matrix."""
    fg_threshold: float = 0.6
    """Top class score at or above this: that class."""
    band_threshold: float = 0.5
    """Top score in [band_threshold, fg_threshold): 255 (unsure); below: background."""
    presence_threshold: float = 0.2
    """A class whose raw peak is below this fraction of the strongest class's peak is absent.
    0 reproduces Dataset Diffusion, which forces every prompted class into the mask."""
    cross_factor: int = 4
    """Cross-attention is captured at latent / cross_factor (16x16 for 512 px)."""
    self_factor: int = 2
    """Self-attention is captured at latent / self_factor (32x32 for 512 px)."""
    refine_image: bool = True
    """Snap the class maps to the image's edges with a guided filter (``core/guided.py``)."""
    refine_kernel: float = 0.0625
    """The filter's window as a fraction of the image's shorter side (33 px at 512)."""
    refine_eps: float = 0.001
    """The filter's regularisation on [0, 1] colours: smaller follows weaker edges."""
    refine_work_side: int = 128
    """The filter's coefficients are computed at about this side (subsample 4 at 512 px)."""
    prior_confidence: float = 0.7
    """A hard label's probability on its own class when refined as a prior (imported datasets)."""


@dataclass
class TrainConfig:
    """DeepLabv3 training; configs/protocol.yaml holds the competition's fixed protocol."""

    arch: Literal[
        "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
    ] = "deeplabv3_resnet50"
    """The segmentation network (torchvision); the competition's is deeplabv3_resnet50."""
    max_steps: int = 10_000
    """Optimizer steps (the protocol: 10,000)."""
    batch_size: int = 8
    """Images per step over all devices (the protocol: 8)."""
    crop_size: int = 512
    """Side of the square training crop, in pixels."""
    lr: float = 0.01
    """Base learning rate of SGD (the auxiliary head's is 10x)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    poly_power: float = 0.9
    """Power of the per-step polynomial learning-rate decay."""
    aux_weight: float = 0.5
    """Weight of the auxiliary head's loss."""
    scale_min: float = 0.5
    """Smallest random rescale of a training image."""
    scale_max: float = 2.0
    """Largest random rescale of a training image."""
    backbone_weights: str = "imagenet"
    """'imagenet' (torchvision's download), a local state-dict file, or 'none'."""
    confidence_weighting: bool = False
    """Weight each pixel's loss by its label confidence (pool samples only)."""
    num_workers: int = 4
    """Data loader processes (at most the usable cores)."""
    accelerator: str = "auto"
    """Lightning's accelerator: 'auto', 'cpu', 'gpu'."""
    devices: str = "auto"
    """Devices per node ('auto', N, or ids '0,1'). ``fit`` and ``generate`` run every stage on
    train.devices x train.num_nodes processes (one per device); batch_size is the total batch."""
    num_nodes: int = 1
    """Machines the job runs on (with train.devices each)."""
    precision: str = "auto"
    """'auto': bf16-mixed on CUDA, 32 on CPU."""
    logger: Literal["wandb", "csv", "none"] = "wandb"
    """Where training curves go: W&B (offline without a key), CSV files, or nowhere."""
    wandb_project: str = "syntagen_st"
    """The W&B project of the runs."""
    log_every: int = 50
    """Log the training loss every N steps."""
    val_every: int = 1000
    """Evaluate on the validation data every N steps (when there is validation data)."""
    checkpoint_every: int = 1000
    """Save a resumable checkpoint every N steps."""
    val_panels: int = 4
    """Validation images shown as image / label / prediction overlays on W&B."""


@dataclass
class RefineConfig:
    """Self-training: relabel, filter, steer."""

    folds: int = 2
    """Cross-fitting folds: each sample is predicted by a model that never trained on it."""
    relabel_confidence: float = 0.8
    """The model replaces a label only where its probability is at least this."""
    min_reliability: float = 0.5
    """The gate's lower bound: a class may be relabelled only while the held-out model's IoU with
    the attention labels on their cores (``core_margin``) is at least this, and at most
    ``max_core_agreement`` (the band rule, ``core/gate.py`` states it)."""
    max_core_agreement: float = 0.85
    """...and at most this: agreement above it on the cores means labels as right as the model
    can tell, which it would only add its boundary errors to (clean shapes: cores at 0.88-0.99,
    and relabelling cost 9 points; noisy shapes: cores at 0.39-0.80, and it added 5-7)."""
    core_margin: float = 1 / 32
    """Reliability is measured only on label pixels at least this share of the image side away
    from a boundary or the 255 band, where attention labels are mostly right. Agreement over
    every pixel is capped by the label noise: a model well above labels at 0.54 mIoU agreed with
    them at 0.33-0.59 per class. 0 measures every pixel."""
    keep_confidence: float = 0.3
    """Where model and label disagree, the label stays only if the model gives its class at
    least this probability (or attention is sure); otherwise the pixel becomes 255."""
    label_sure: float = 0.8
    """Attention confidence at or above which a label pixel is sure and survives disagreement."""
    min_class_pixels: int = 1000
    """A class needs this many held-out core label pixels (``core_margin``) before its reliability counts."""
    confidence_weight: float = 0.25
    """Sample score = (1 - w) * model-label agreement + w * mean model confidence."""
    drop_fraction: float = 0.1
    """Fraction of each round's samples with the worst scores that are dropped."""
    min_weight: float = 0.2
    """Floor of a class's prompt weight relative to the mean, so no class starves."""
    weakness_power: float = 1.0
    """Sharpness of steering: prompt weight ~ weakness ** power."""


@dataclass
class LoopConfig:
    """Rounds and budget of ``python -m syntagen_st.fit``."""

    rounds: int = 3
    """Self-training rounds before the final export and training."""
    generate_total: int = 10_000
    """Images generated over all rounds (the competition allows at most 10,000 pairs)."""
    max_pairs: int = MAX_PAIRS
    """At most this many pairs are exported (the competition's limit: 10,000)."""
    budget_split: Literal["equal", "front"] = "front"
    """'equal' shares; 'front' gives round 0 half the budget and splits the rest equally."""
    round_steps: int = 2000
    """Training steps of each round's (short) models."""
    source: str = "sd"
    """'sd' (generate with Stable Diffusion) or 'folder:PATH' (refine an existing dataset)."""


@dataclass
class Config:
    seed: int = 0
    """The run seed: every sample's noise and prompt, and every training, derive from it."""
    name: str = "run"
    """The run's name: its folder under runs/ and its W&B runs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which Stable Diffusion, and where it runs."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Prompts and the diffusion sampler."""
    label: LabelConfig = field(default_factory=LabelConfig)
    """Attention -> mask."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """DeepLabv3 training."""
    refine: RefineConfig = field(default_factory=RefineConfig)
    """Self-training: relabel, filter, steer."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Rounds and budget."""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, in field order (what RUN/config.yaml holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def is_local_path(ref: str) -> bool:
    """A model reference names a folder when it looks like one or exists; otherwise a hub id."""
    return ref.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(ref))


def config_differences(old: dict, new: dict, free: set[str], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts, except those in ``free``
    (keys or whole sections that may change without changing the results)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        if dotted in free:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, free, dotted + ".")
        elif a != b:
            diffs.append(f"{dotted}: {a!r} -> {b!r}")
    return diffs


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _fraction(name: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")


def validate_model(cfg: ModelConfig) -> None:
    ref = cfg.pretrained
    if ref in TINY_MODELS:
        pass
    elif is_local_path(ref):
        path = os.path.expanduser(ref)
        _check(os.path.isdir(path), f"model.pretrained: folder {ref!r} does not exist")
        _check(
            os.path.isfile(os.path.join(path, "model_index.json")),
            f"model.pretrained: {ref!r} is not a diffusers pipeline folder (no model_index.json)",
        )
    else:
        _check(bool(_HUB_ID.match(ref)), f"model.pretrained: {ref!r} is neither a folder nor a hub id")
    _check(
        cfg.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", cfg.device) is not None,
        f"model.device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
    )


def validate_generate(cfg: GenerateConfig, label: LabelConfig) -> None:
    _check(cfg.num_images >= 0, f"generate.num_images must be >= 0, got {cfg.num_images}")
    _check(cfg.batch_size >= 1, f"generate.batch_size must be >= 1, got {cfg.batch_size}")
    _check(cfg.steps >= 1, f"generate.steps must be >= 1, got {cfg.steps}")
    _check(cfg.guidance_scale >= 0, f"generate.guidance_scale must be >= 0, got {cfg.guidance_scale}")
    # The captured layers sit at latent / (self_factor, cross_factor): sizes must divide down.
    unit = 8 * max(label.cross_factor, label.self_factor)
    for name in ("height", "width"):
        value = getattr(cfg, name)
        _check(value > 0 and value % 8 == 0, f"generate.{name} must be a positive multiple of 8, got {value}")
        _check(
            value % unit == 0,
            f"generate.{name} must be a multiple of {unit} (8 x label.cross_factor), got {value}",
        )
    _check(len(cfg.classes) > 0, "generate.classes is empty")
    for name in cfg.classes:
        try:
            canonical(name)
        except ValueError as err:
            raise ConfigError(f"generate.classes: {err}") from None
    _check(cfg.max_classes_per_prompt >= 1, "generate.max_classes_per_prompt must be >= 1")
    if cfg.prompts_file is not None:
        _check(os.path.isfile(cfg.prompts_file), f"generate.prompts_file: {cfg.prompts_file!r} does not exist")
    _check(
        cfg.prompt_source in ("templates", "file", "llm"),
        f"generate.prompt_source must be templates, file or llm, got {cfg.prompt_source!r}",
    )
    _check(
        (cfg.prompts_file is not None) == (cfg.prompt_source == "file"),
        "generate.prompts_file is read only with generate.prompt_source: file, and that source needs it "
        f"(prompt_source {cfg.prompt_source!r}, prompts_file {cfg.prompts_file!r})",
    )
    if cfg.prompt_source == "llm":
        validate_llm(cfg)


def validate_llm(cfg: GenerateConfig) -> None:
    ref = cfg.llm
    if is_local_path(ref):
        path = os.path.expanduser(ref)
        _check(os.path.isdir(path), f"generate.llm: folder {ref!r} does not exist")
        _check(os.path.isfile(os.path.join(path, "config.json")), f"generate.llm: {ref!r} holds no model (no config.json)")
    else:
        _check(bool(_HUB_ID.match(ref)), f"generate.llm: {ref!r} is neither a folder nor a hub id")
    for name in ("llm_captions_per_request", "llm_batch_size"):
        _check(getattr(cfg, name) >= 1, f"generate.{name} must be >= 1, got {getattr(cfg, name)}")
    _check(cfg.llm_temperature > 0, f"generate.llm_temperature must be > 0, got {cfg.llm_temperature}")
    _check(0 < cfg.llm_top_p <= 1, f"generate.llm_top_p must be in (0, 1], got {cfg.llm_top_p}")


def validate_label(cfg: LabelConfig) -> None:
    _check(cfg.tau >= 0, f"label.tau must be >= 0, got {cfg.tau}")
    for name in ("fg_threshold", "band_threshold", "presence_threshold"):
        _fraction(f"label.{name}", getattr(cfg, name))
    _check(
        cfg.band_threshold <= cfg.fg_threshold,
        f"label.band_threshold ({cfg.band_threshold}) must not exceed label.fg_threshold ({cfg.fg_threshold})",
    )
    for name in ("cross_factor", "self_factor"):
        value = getattr(cfg, name)
        _check(value >= 1 and value & (value - 1) == 0, f"label.{name} must be a power of 2, got {value}")
    _check(0 < cfg.refine_kernel <= 1, f"label.refine_kernel must be in (0, 1], got {cfg.refine_kernel}")
    _check(cfg.refine_eps > 0, f"label.refine_eps must be > 0, got {cfg.refine_eps}")
    _check(cfg.refine_work_side >= 8, f"label.refine_work_side must be >= 8, got {cfg.refine_work_side}")
    _check(0.5 < cfg.prior_confidence <= 1, f"label.prior_confidence must be in (0.5, 1], got {cfg.prior_confidence}")


def device_count(devices: str) -> int | None:
    """How many devices ``train.devices`` names per node: 'N', or a list of ids ('0,1', '[0, 1]');
    None when Lightning decides ('auto', '-1')."""
    text = devices.strip().strip("[]").strip()
    if text.isdigit():
        return int(text) if not devices.strip().startswith("[") else 1
    ids = [part.strip() for part in text.split(",") if part.strip()]
    return len(ids) if len(ids) > 1 and all(part.isdigit() for part in ids) else None


def validate_train(cfg: TrainConfig) -> None:
    for name in ("max_steps", "batch_size", "crop_size", "num_nodes", "log_every", "val_every", "checkpoint_every"):
        _check(getattr(cfg, name) >= 1, f"train.{name} must be >= 1, got {getattr(cfg, name)}")
    _check(cfg.num_workers >= 0, f"train.num_workers must be >= 0, got {cfg.num_workers}")
    _check(cfg.lr > 0, f"train.lr must be > 0, got {cfg.lr}")
    _check(0 < cfg.scale_min <= cfg.scale_max, "train.scale_min must be > 0 and <= train.scale_max")
    _fraction("train.momentum", cfg.momentum)
    _check(cfg.val_panels >= 0, f"train.val_panels must be >= 0, got {cfg.val_panels}")
    _check(device_count(cfg.devices) != 0, "train.devices must not be 0; use 'auto' or a device count")
    # Flags such as --arch are mapped onto the config after parsing, past jsonargparse's type check.
    from typing import get_args, get_type_hints

    hints = get_type_hints(TrainConfig)
    for name in ("arch", "logger"):
        allowed = get_args(hints[name])
        value = getattr(cfg, name)
        _check(value in allowed, f"train.{name} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.backbone_weights not in ("imagenet", "none"):
        _check(
            os.path.isfile(os.path.expanduser(cfg.backbone_weights)),
            f"train.backbone_weights: file {cfg.backbone_weights!r} does not exist",
        )


def validate_refine(cfg: RefineConfig) -> None:
    _check(cfg.folds >= 2, f"refine.folds must be >= 2, got {cfg.folds}")
    for name in (
        "relabel_confidence", "min_reliability", "max_core_agreement", "keep_confidence", "drop_fraction", "min_weight",
        "label_sure", "confidence_weight",
    ):
        _fraction(f"refine.{name}", getattr(cfg, name))
    _check(0 <= cfg.core_margin < 0.5, f"refine.core_margin must be in [0, 0.5), got {cfg.core_margin}")
    _check(cfg.min_class_pixels >= 0, f"refine.min_class_pixels must be >= 0, got {cfg.min_class_pixels}")
    _check(cfg.drop_fraction < 1, "refine.drop_fraction must be < 1")
    _check(cfg.weakness_power >= 0, f"refine.weakness_power must be >= 0, got {cfg.weakness_power}")


def validate_loop(cfg: LoopConfig) -> None:
    _check(cfg.rounds >= 1, f"loop.rounds must be >= 1, got {cfg.rounds}")
    _check(
        1 <= cfg.max_pairs <= MAX_PAIRS,
        f"loop.max_pairs must be in [1, {MAX_PAIRS}] (the competition's limit), got {cfg.max_pairs}",
    )
    _check(cfg.round_steps >= 1, f"loop.round_steps must be >= 1, got {cfg.round_steps}")
    if cfg.source == "sd":
        _check(
            cfg.generate_total >= cfg.rounds,
            f"loop.generate_total ({cfg.generate_total}) is smaller than the number of rounds ({cfg.rounds})",
        )
        # 'front' gives round 0 half: the other half must still give every later round an image.
        later = cfg.generate_total - (cfg.generate_total + 1) // 2
        _check(
            cfg.budget_split != "front" or cfg.rounds == 1 or later >= cfg.rounds - 1,
            f"loop.generate_total ({cfg.generate_total}) leaves a round without images under budget_split "
            f"'front' with {cfg.rounds} rounds; raise it or use budget_split 'equal'",
        )
    elif cfg.source.startswith("folder:"):
        path = cfg.source[len("folder:"):]
        _check(os.path.isdir(path), f"loop.source: folder {path!r} does not exist")
    else:
        _check(False, f"loop.source must be 'sd' or 'folder:PATH', got {cfg.source!r}")


def validate(cfg: Config) -> Config:
    """Check every section; raise ConfigError with one line on the first bad value."""
    _check(bool(re.fullmatch(r"[\w.-]+", cfg.name)), f"name must be letters, digits, '.', '_' or '-', got {cfg.name!r}")
    _check(0 <= cfg.seed < 2**63, f"seed must be in [0, 2**63), got {cfg.seed}")
    validate_model(cfg.model)
    validate_label(cfg.label)
    validate_generate(cfg.generate, cfg.label)
    validate_train(cfg.train)
    validate_refine(cfg.refine)
    validate_loop(cfg.loop)
    return cfg
