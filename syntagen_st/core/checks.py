"""The config's checks: ``validate`` refuses a bad value before any work starts, in one line naming
the key. One function per section."""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import get_args, get_type_hints

import numpy as np

from .classes import canonical
from .config import (
    HUB_ID,
    TINY_MODELS,
    Config,
    GenerateConfig,
    LabelConfig,
    LoopConfig,
    ModelConfig,
    RefineConfig,
    TrainConfig,
    cross_factors,
    device_count,
    is_local_path,
    self_factors,
)
from .errors import ConfigError
from .rules import MAX_PAIRS


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _real(value: object) -> bool:
    """A number (numpy's too), not a bool (YAML's true is an int to Python) nor null."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _typed(section: str, cfg: object) -> None:
    """Every setting typed a float (or float | None) holds a number (or null), and every one typed
    bool holds true or false: a null or a string is one clear line here, not a TypeError in the
    range checks that follow, nor a flag read as truthy."""
    for name, hint in get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if hint in (float, float | None):
            _check(_real(value) or (value is None and hint != float),
                   f"{section}.{name} must be a number{'' if hint == float else ' or null'}, got {value!r}")
        elif hint is bool:
            _check(type(value) is bool, f"{section}.{name} must be true or false, got {value!r}")


def _fraction(name: str, value: float) -> None:
    _check(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")


def validate_model(cfg: ModelConfig) -> None:
    _typed("model", cfg)
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
        _check(bool(HUB_ID.match(ref)), f"model.pretrained: {ref!r} is neither a folder nor a hub id")
    _check(
        cfg.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", cfg.device) is not None,
        f"model.device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
    )


def validate_generate(cfg: GenerateConfig, label: LabelConfig) -> None:
    _typed("generate", cfg)
    _check(cfg.num_images >= 0, f"generate.num_images must be >= 0, got {cfg.num_images}")
    _check(cfg.batch_size >= 1, f"generate.batch_size must be >= 1, got {cfg.batch_size}")
    _check(cfg.steps >= 1, f"generate.steps must be >= 1, got {cfg.steps}")
    _check(cfg.guidance_scale >= 0, f"generate.guidance_scale must be >= 0, got {cfg.guidance_scale}")
    # The captured layers sit at latent / factor for each label factor: sizes must divide down.
    unit = 8 * max(cross_factors(label) + self_factors(label))
    for name in ("height", "width"):
        value = getattr(cfg, name)
        _check(value > 0 and value % 8 == 0, f"generate.{name} must be a positive multiple of 8, got {value}")
        _check(
            value % unit == 0,
            f"generate.{name} must be a multiple of {unit} (8 x the largest label factor), got {value}",
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
        _check(bool(HUB_ID.match(ref)), f"generate.llm: {ref!r} is neither a folder nor a hub id")
    for name in ("llm_captions_per_request", "llm_batch_size"):
        _check(getattr(cfg, name) >= 1, f"generate.{name} must be >= 1, got {getattr(cfg, name)}")
    _check(cfg.llm_temperature > 0, f"generate.llm_temperature must be > 0, got {cfg.llm_temperature}")
    _check(0 < cfg.llm_top_p <= 1, f"generate.llm_top_p must be in (0, 1], got {cfg.llm_top_p}")


def validate_label(cfg: LabelConfig) -> None:
    _typed("label", cfg)
    _check(cfg.tau >= 0, f"label.tau must be >= 0, got {cfg.tau}")
    for name in ("fg_threshold", "band_threshold", "presence_threshold"):
        _fraction(f"label.{name}", getattr(cfg, name))
    _check(
        cfg.band_threshold <= cfg.fg_threshold,
        f"label.band_threshold ({cfg.band_threshold}) must not exceed label.fg_threshold ({cfg.fg_threshold})",
    )
    validate_grids(cfg)
    _check(0 < cfg.refine_kernel <= 1, f"label.refine_kernel must be in (0, 1], got {cfg.refine_kernel}")
    _check(cfg.refine_eps > 0, f"label.refine_eps must be > 0, got {cfg.refine_eps}")
    _check(cfg.refine_work_side >= 8, f"label.refine_work_side must be >= 8, got {cfg.refine_work_side}")
    _check(0.5 < cfg.prior_confidence <= 1, f"label.prior_confidence must be in (0.5, 1], got {cfg.prior_confidence}")
    _check(cfg.prior_kernel is None or 0 < cfg.prior_kernel <= 1,
           f"label.prior_kernel must be in (0, 1] or null, got {cfg.prior_kernel}")
    _check(type(cfg.prior_passes) is int and cfg.prior_passes >= 1,
           f"label.prior_passes must be an integer >= 1, got {cfg.prior_passes}")
    _check(cfg.prior_method in get_args(get_type_hints(LabelConfig)["prior_method"]),
           f"label.prior_method must be crf or guided, got {cfg.prior_method!r}")
    _check(type(cfg.crf_iterations) is int and cfg.crf_iterations >= 1,
           f"label.crf_iterations must be an integer >= 1, got {cfg.crf_iterations}")
    _check(0 < cfg.crf_spatial <= 4, f"label.crf_spatial must be in (0, 4], got {cfg.crf_spatial}")
    for name in ("crf_colour", "crf_smooth"):
        _check(getattr(cfg, name) > 0, f"label.{name} must be > 0, got {getattr(cfg, name)}")
    _check(cfg.crf_work_side is None or (type(cfg.crf_work_side) is int and cfg.crf_work_side >= 8),
           f"label.crf_work_side must be an integer >= 8 or null, got {cfg.crf_work_side}")
    for name in ("crf_weight", "crf_smooth_weight"):
        _check(getattr(cfg, name) >= 0, f"label.{name} must be >= 0, got {getattr(cfg, name)}")
    _check(0 <= cfg.colour_weight <= 4, f"label.colour_weight must be in [0, 4], got {cfg.colour_weight}")
    _check(type(cfg.colour_bins) is int and 2 <= cfg.colour_bins <= 64,
           f"label.colour_bins must be an integer in [2, 64], got {cfg.colour_bins!r}")
    _check(0 <= cfg.colour_class_power <= 1, f"label.colour_class_power must be in [0, 1], got {cfg.colour_class_power}")
    _check(cfg.colour_reach is None or 0 < cfg.colour_reach <= 4,
           f"label.colour_reach must be in (0, 4] or null, got {cfg.colour_reach}")


def validate_grids(cfg: LabelConfig) -> None:
    """The attention grids: powers of 2, no grid twice, one positive weight per cross grid, and
    every self grid at least as fine as every cross grid (the cross maps are propagated onto it)."""
    cross, selfs = cross_factors(cfg), self_factors(cfg)
    for value in cross + selfs:
        _check(
            isinstance(value, int) and value >= 1 and value & (value - 1) == 0,
            f"label: grid factors (cross_factor, extra_cross_factors, self_factor, extra_self_factor) must be "
            f"powers of 2, got {value}",
        )
    _check(len(set(cross)) == len(cross), f"label.extra_cross_factors repeats a cross grid: {cross}")
    _check(len(set(selfs)) == len(selfs), f"label.extra_self_factor {cfg.extra_self_factor} repeats label.self_factor")
    _check(
        len(cfg.cross_weights) == len(cross),
        f"label.cross_weights has {len(cfg.cross_weights)} weights for {len(cross)} cross grids "
        f"(cross_factor, then extra_cross_factors: {cross}); give one per grid",
    )
    _check(
        all(0 < w < math.inf for w in cfg.cross_weights),
        f"label.cross_weights must be positive and finite, got {cfg.cross_weights}",
    )
    _check(
        max(selfs) <= min(cross),
        f"label: self-attention at latent / {max(selfs)} is coarser than the cross grid at latent / {min(cross)}; "
        "every self factor must be <= every cross factor",
    )


def validate_train(cfg: TrainConfig) -> None:
    _typed("train", cfg)
    for name in ("max_steps", "batch_size", "crop_size", "num_nodes", "log_every", "val_every", "checkpoint_every"):
        _check(getattr(cfg, name) >= 1, f"train.{name} must be >= 1, got {getattr(cfg, name)}")
    _check(cfg.num_workers >= 0, f"train.num_workers must be >= 0, got {cfg.num_workers}")
    _check(cfg.lr > 0, f"train.lr must be > 0, got {cfg.lr}")
    _check(0 < cfg.scale_min <= cfg.scale_max, "train.scale_min must be > 0 and <= train.scale_max")
    _fraction("train.momentum", cfg.momentum)
    _check(cfg.val_panels >= 0, f"train.val_panels must be >= 0, got {cfg.val_panels}")
    _check(device_count(cfg.devices) != 0, "train.devices must not be 0; use 'auto' or a device count")
    # Flags such as --arch are mapped onto the config after parsing, past jsonargparse's type check.
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
    _typed("refine", cfg)
    _check(cfg.folds >= 2, f"refine.folds must be >= 2, got {cfg.folds}")
    _check(cfg.relabel_method in get_args(get_type_hints(RefineConfig)["relabel_method"]),
           f"refine.relabel_method must be crf or guided, got {cfg.relabel_method!r}")
    for name in (
        "relabel_confidence", "min_reliability", "max_core_agreement", "min_core_persistence", "keep_confidence",
        "drop_fraction", "min_weight", "label_sure", "confidence_weight",
    ):
        _fraction(f"refine.{name}", getattr(cfg, name))
    _check(0 <= cfg.core_margin < 0.5, f"refine.core_margin must be in [0, 0.5), got {cfg.core_margin}")
    _check(cfg.min_class_pixels >= 0, f"refine.min_class_pixels must be >= 0, got {cfg.min_class_pixels}")
    _check(cfg.drop_fraction < 1, "refine.drop_fraction must be < 1")
    _check(cfg.weakness_power >= 0, f"refine.weakness_power must be >= 0, got {cfg.weakness_power}")
    _check(0 <= cfg.relabel_prior < 1, f"refine.relabel_prior must be in [0, 1), got {cfg.relabel_prior}")
    _check(0 < cfg.relabel_kernel <= 1, f"refine.relabel_kernel must be in (0, 1], got {cfg.relabel_kernel}")
    _check(cfg.relabel_eps > 0, f"refine.relabel_eps must be > 0, got {cfg.relabel_eps}")


def validate_loop(cfg: LoopConfig) -> None:
    _typed("loop", cfg)
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
