"""Typed configuration: one dataclass per stage, loaded from YAML and overridable from the CLI.
Each field's docstring is its help line; ``core/checks.py`` refuses bad values before any work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import yaml

from .classes import FOREGROUND_CLASSES
from .rules import MAX_PAIRS

TINY_MODELS = ("tiny", "tiny-sd2")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""What a Hugging Face hub id looks like (owner/name)."""

NEUTRAL_KEYS = frozenset({
    "name", "model.device", "generate.batch_size", "generate.num_images", "train.num_workers", "train.devices",
    "train.num_nodes", "train.accelerator", "train.logger", "train.wandb_project",
})
"""Settings that never change a run's samples or models (names, placement, speed, logging, and
generate.num_images: fit draws from loop.generate_total); a rerun may change them freely."""


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
    """Where captions come from: the templates, ``prompts_file`` or ``llm``; saved to RUN/prompts/ first."""
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
    extra_cross_factors: list[int] = field(default_factory=list)
    """More cross-attention grids (latent / factor) fused with cross_factor's; [] for one grid (docs/masks.md)."""
    cross_weights: list[float] = field(default_factory=lambda: [1.0])
    """One weight per cross grid: cross_factor's, then extra_cross_factors' in order (normalised to sum 1)."""
    extra_self_factor: int | None = None
    """A second self-attention grid (latent / factor): scores propagated at both are averaged; None: one grid."""
    refine_image: bool = True
    """Refine labels by the image (``core/guided.py``): the guided filter on scores, ``prior_method`` on an import."""
    refine_kernel: float = 0.0625
    """The filter's window as a fraction of the image's shorter side (33 px at 512)."""
    refine_eps: float = 0.001
    """The filter's regularisation on [0, 1] colours: smaller follows weaker edges."""
    refine_work_side: int = 128
    """The filter's coefficients are computed at about this side (subsample 4 at 512 px)."""
    prior_confidence: float = 0.8
    """A hard label's probability on its own class when refined as a prior (imported datasets)."""
    prior_kernel: float | None = 0.125
    """With ``prior_method`` guided, its window (of the shorter side; a 1/8-resolution cell); None: refine_kernel."""
    prior_passes: int = 3
    """With ``prior_method`` guided, passes, each from the last one's label: cuts back a blob bleeding past a window."""
    prior_method: Literal["crf", "guided"] = "crf"
    """How such a label (in the relabel, a model's softmax times it) is refined: a fully connected CRF, or the guided filter."""
    prior_doubt: bool = True
    """A pixel the label gave a class (or 255) that the refinement takes to background becomes 255."""
    absent_doubt: bool = True
    """A label holding no pixel of a class it names keeps no background when refined: 255 (the class may be there)."""
    crf_iterations: int = 10
    """Mean-field iterations of the CRF."""
    crf_spatial: float = 0.25
    """The CRF's appearance kernel: its spatial reach as a fraction of the shorter side."""
    crf_colour: float = 13.0
    """... and its colour reach, in 0-255 RGB units: pixels this alike pull to one label."""
    crf_weight: float = 10.0
    """The appearance kernel's weight against the prior."""
    crf_smooth: float = 1.5
    """The smoothness kernel's reach in pixels of the grid it is solved on (small: thin parts survive)."""
    crf_smooth_weight: float = 3.0
    """The smoothness kernel's weight."""
    crf_work_side: int | None = None
    """Solve the CRF at about this shorter side and upsample (0.34 s at 512 px on a core); None: full size."""
    colour_weight: float = 1.5
    """Exponent of the per-image colour model (``core/colour.py``) on a prior before it is refined; 0: off."""
    colour_bins: int = 6
    """That model's RGB histogram levels a channel."""
    colour_class_power: float = 0.2
    """How much a class's pixel count weighs in it: 0 none (clean labels suffer), 1 fully (thin parts lost)."""
    colour_reach: float | None = 0.125
    """A class claims its colour within about this share of the side of its own pixels; None: anywhere."""


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
    min_core_persistence: float = 0.8
    """...and only while its disagreement with the labels persists inward: on the deep core (twice
    ``core_margin``) at least this share of that on the core. Class errors are as frequent at any
    depth; the model's boundary errors fade (rich shapes: noisy classes 0.93-1.08, clean ones
    0.40-0.67, among them a small class whose core IoU fell in the band). 0 turns the test off."""
    core_margin: float = 1 / 32
    """Reliability is measured only on label pixels at least this share of the side from a boundary
    or the 255 band, where attention labels are mostly right (over every pixel, agreement is capped
    by the label noise: 0.33-0.59 per class for a model well above its labels). 0: every pixel."""
    keep_confidence: float = 0.3
    """Where model and label disagree, the label stays only if the model gives its class at
    least this probability (or attention is sure); otherwise the pixel becomes 255."""
    label_sure: float = 0.8
    """Attention confidence at or above which a label pixel is sure and survives disagreement."""
    background_when_blind: bool = False
    """Let the model write background on a sample naming a class it has not learnt (core IoU below
    ``min_reliability``). Off: such a model calls that class background (docs/loop-and-gate.md)."""
    relabel_image: bool = True
    """Relabel from the held-out softmax times the label prior, refined by the image (``relabel_method``)."""
    relabel_prior: float = 0.7
    """The label prior's confidence on its own class in that product; 0 refines the model alone."""
    relabel_method: Literal["crf", "guided"] = "crf"
    """How that product is refined: the CRF of ``label.crf_*``, or the guided filter (``relabel_kernel``, ``relabel_eps``)."""
    relabel_kernel: float = 0.25
    """With ``relabel_method`` guided, that refinement's window as a fraction of the image's shorter side (``label.refine_kernel``'s meaning)."""
    relabel_eps: float = 0.001
    """That refinement's regularisation on [0, 1] colours (``label.refine_eps``'s meaning)."""
    flip_tta: bool = True
    """Held-out predictions average the softmax of the image and of its horizontal flip."""
    min_class_pixels: int = 1000
    """A class needs this many held-out core label pixels (``core_margin``) before its reliability counts."""
    score_blind_classes: bool = False
    """Count a class the model has not learnt in the sample scores. Off: it and its labelled pixels
    are left out, since the model disagrees with its labels, right or wrong."""
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


ADDED_SINCE: dict[tuple[str, str], object] = {
    ("label", "refine_image"): False,
    ("label", "prior_kernel"): None,
    ("label", "prior_passes"): 1,
    ("label", "prior_method"): "guided",
    ("label", "prior_doubt"): False,
    ("label", "absent_doubt"): False,
    ("label", "colour_weight"): 0.0,
    ("refine", "relabel_image"): False,
    ("refine", "flip_tta"): False,
    ("refine", "relabel_method"): "guided",
    ("refine", "min_core_persistence"): 0.0,
    ("refine", "background_when_blind"): True,
    ("refine", "score_blind_classes"): True,
}
"""Settings added after runs were first made whose default changes the result, with the value a run
recorded before them was made with. A new such key belongs here; a changed default goes in ``CHANGED_DEFAULTS``."""


CHANGED_DEFAULTS: dict[tuple[str, str], object] = {
    ("label", "prior_confidence"): 0.7,
}
"""Settings whose default changed, with the earlier default: a run saved with it is told the flag
that continues it. (Saved configs hold every key, so the run's identity never changed.)"""


def as_recorded(values: dict) -> dict:
    """A saved config's dict (a run's config.yaml, an entry's submission.json) with the settings it
    predates filled in as it was run (``ADDED_SINCE``); other missing keys take their defaults later."""
    values = dict(values)
    for (section, key), value in ADDED_SINCE.items():
        given = values.get(section)
        if given is None or isinstance(given, dict):  # anything else is refused when the config is checked
            values[section] = {key: value, **(given or {})}
    return values


def recorded_section(name: str, values: Mapping | None) -> object:
    """Section ``name`` of a saved config (config.yaml, submission.json) as it was run: the
    settings it predates as ``as_recorded`` says, defaults for other keys it lacks, unknown keys
    ignored."""
    cls = type(getattr(Config(), name))
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in as_recorded({name: values})[name].items() if k in known})


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


def cross_factors(label: LabelConfig) -> list[int]:
    """The cross-attention grids as latent factors, in ``cross_weights``' order: cross_factor's first."""
    return [label.cross_factor, *label.extra_cross_factors]


def self_factors(label: LabelConfig) -> list[int]:
    """The self-attention grids as latent factors: self_factor's, then extra_self_factor's if set."""
    return [label.self_factor] + ([] if label.extra_self_factor is None else [label.extra_self_factor])


def device_count(devices: str) -> int | None:
    """How many devices ``train.devices`` names per node: 'N', or a list of ids ('0,1', '[0, 1]');
    None when Lightning decides ('auto', '-1')."""
    text = devices.strip().strip("[]").strip()
    if text.isdigit():
        return int(text) if not devices.strip().startswith("[") else 1
    ids = [part.strip() for part in text.split(",") if part.strip()]
    return len(ids) if len(ids) > 1 and all(part.isdigit() for part in ids) else None
