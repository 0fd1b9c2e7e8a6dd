"""Training a segmenter into a training output folder (``core.layout.TrainOutput``): one fresh
Lightning Trainer per call, resumed from its last checkpoint, the final weights exported as
safetensors with their sha256.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from ..core.config import TrainConfig, device_count
from ..core.device import lightning_devices, per_device_batch
from ..core.errors import UserError
from ..core.layout import TrainOutput
from ..core.store import atomic_write_json, atomic_write_text
from ..scaleout.dist import SINGLE, Dist, acting_as_rank_zero, devices_checked
from .checkpoints import AtomicCheckpointIO, read_checkpoint
from .data import Sample, find_samples
from .loggers import make_logger
from .metrics import summarize
from .module import SegDataModule, SegModule
from .network import model_from_checkpoint, save_weights, write_checksum
from .progress import StepProgressBar, quiet_lightning

log = logging.getLogger(__name__)

Data = str | os.PathLike | Sequence[Sample]


def _samples(data: Data, split: str) -> list[Sample]:
    return find_samples(data, split) if isinstance(data, (str, os.PathLike)) else list(data)


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint, or None when there is none."""
    if not path.is_file():
        return None
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("global_step"), int):
        raise UserError(f"{path}: not a Lightning training checkpoint (no global_step)")
    return ckpt["global_step"]


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    on_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def _placement(cfg: TrainConfig, single_device: bool, device: torch.device | None) -> dict:
    """Trainer keywords: ``train.devices`` x ``train.num_nodes`` with DDP, or one device (a fold
    model trained beside the other ranks' fold models): this rank's ``device`` when it has one,
    which the launcher found (SLURM sets no LOCAL_RANK), else the first GPU ``train.devices`` lists."""
    on_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    if single_device:
        if device is not None and device.type == "cuda":
            return {"accelerator": "gpu", "devices": [device.index or 0], "num_nodes": 1, "strategy": "auto"}
        listed = [int(part) for part in cfg.devices.strip().strip("[]").split(",") if part.strip().isdigit()]
        first = listed[0] if "," in cfg.devices or cfg.devices.strip().startswith("[") else 0
        return {"accelerator": cfg.accelerator, "devices": [first] if on_gpu else 1, "num_nodes": 1, "strategy": "auto"}
    devices = lightning_devices(cfg.devices)
    many = cfg.num_nodes > 1 or (isinstance(devices, int) and devices > 1)
    launched = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    # BatchNorm over the whole batch, as the protocol's one-GPU batch of 8 has: with 8 GPUs a
    # device holds one image, which plain BatchNorm refuses in DeepLabv3's pooling branch.
    # torch syncs BatchNorm on GPUs only.
    sync = on_gpu and (many or launched or (device_count(cfg.devices) or 1) > 1)
    return {"accelerator": cfg.accelerator, "devices": devices, "num_nodes": cfg.num_nodes,
            "strategy": "ddp" if many else "auto", "sync_batchnorm": sync}


def export_weights(module_or_ckpt: SegModule | Path, out: TrainOutput) -> Path:
    """DIR/model.safetensors and DIR/checksum.txt from a trained module or a checkpoint."""
    if isinstance(module_or_ckpt, Path):
        model, arch = model_from_checkpoint(module_or_ckpt)
    else:
        model, arch = module_or_ckpt.model, module_or_ckpt.cfg.arch
    save_weights(model, out.weights, arch)
    write_checksum(out.weights)
    return out.weights


def train(
    cfg: TrainConfig, data: Data, out: str | os.PathLike, val_data: Data | None = None,
    *, seed: int = 0, run_name: str | None = None, progress: bool = True, single_device: bool = False,
    device: torch.device | None = None, dist: Dist = SINGLE, skip_corrupt: bool = True,
) -> Path:
    """Train (or resume) into ``out`` for cfg.max_steps steps; return the final safetensors path.

    ``data`` / ``val_data`` are dataset folders (any kind find_samples knows) or sample lists.
    Each call builds a fresh Trainer, so a loop may call it once per round with its own ``out``.
    ``train.batch_size`` is the total batch: over N devices each one takes batch_size / N, so
    the protocol's learning rate and schedule hold for any device count. ``single_device``
    trains on this process's ``device`` alone, whatever ``train.devices`` says. ``dist``: the
    ranks of an already launched job that train together; rank 0 reads the checkpoint for all,
    so they agree on whether to resume. ``skip_corrupt`` off: a broken training sample stops the
    training with a SampleError naming its file instead of being skipped (a run's own files must
    all be there for it to be reproducible).
    """
    if single_device:
        with acting_as_rank_zero():
            return _train(cfg, data, out, val_data, seed=seed, run_name=run_name, progress=progress,
                          placement=_placement(cfg, True, device), dist=SINGLE, skip_corrupt=skip_corrupt)
    return _train(cfg, data, out, val_data, seed=seed, run_name=run_name, progress=progress,
                  placement=_placement(cfg, False, None), dist=dist, skip_corrupt=skip_corrupt)


def _train(
    cfg: TrainConfig, data: Data, out: str | os.PathLike, val_data: Data | None,
    *, seed: int, run_name: str | None, progress: bool, placement: dict, dist: Dist, skip_corrupt: bool,
) -> Path:
    out = Path(out)
    layout = TrainOutput(out)
    train_samples = _samples(data, "train")
    val_samples = _samples(val_data, "val") if val_data is not None else []
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.settings, yaml.safe_dump({"seed": seed, "train": dataclasses.asdict(cfg)}, sort_keys=False))
    last = layout.last_checkpoint
    done = dist.from_main(lambda: checkpoint_step(last))
    if done is not None and done >= cfg.max_steps:
        # Lightning would resume and train nothing: the weights are final, (re)export them.
        if not dist.is_main:
            return layout.weights
        log.info("%s: finished at step %d >= max_steps %d; exporting", last, done, cfg.max_steps)
        return export_weights(last, layout)

    quiet_lightning()
    pl.seed_everything(seed, workers=True, verbose=False)
    module = SegModule(cfg)
    logger = make_logger(cfg.logger, out, cfg.wandb_project, run_name or out.name)
    checkpoints = ModelCheckpoint(
        dirpath=layout.checkpoints, save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every,
    )
    with devices_checked(cfg):
        trainer = pl.Trainer(
            default_root_dir=out, max_steps=cfg.max_steps, **placement, precision=_precision(cfg), logger=logger,
            callbacks=[checkpoints, *([StepProgressBar(run_name or out.name)] if progress else [])],
            log_every_n_steps=cfg.log_every, limit_val_batches=1.0 if val_samples else 0,
            val_check_interval=min(cfg.val_every, cfg.max_steps) if val_samples else None,
            check_val_every_n_epoch=None, num_sanity_val_steps=0, benchmark=torch.cuda.is_available(),
            enable_progress_bar=progress,
            enable_model_summary=False, plugins=[AtomicCheckpointIO()],
        )
    per_device = dataclasses.replace(cfg, batch_size=per_device_batch(cfg, trainer.world_size))
    datamodule = SegDataModule(train_samples, per_device, val_samples, skip_corrupt=skip_corrupt)
    try:
        # Ctrl-C: Lightning shuts down and exits with status 1; rerunning resumes from last.ckpt.
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if done is not None else None)
        # ModelCheckpoint saves every N steps: make sure last.ckpt holds the final step too. Rank 0
        # wrote it and reads it; every rank takes the same branch (saving is collective).
        if trainer.strategy.broadcast(checkpoint_step(last) if trainer.is_global_zero else None) != trainer.global_step:
            trainer.save_checkpoint(last)
        if val_samples and (module.val_metrics is None or module.val_metrics["step"] != trainer.global_step):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        if cfg.logger == "wandb" and trainer.is_global_zero:
            logger.experiment.finish()
    if module.corrupt:
        warnings.warn(f"skipped {len(module.corrupt)} corrupt training samples (named in the warnings above)", stacklevel=2)
    if not trainer.is_global_zero:
        return layout.weights
    if module.val_metrics is not None:
        metrics = summarize(module.val_metrics["confusion"]) | {"step": trainer.global_step, "val_images": len(val_samples)}
        atomic_write_json(layout.metrics, metrics)
    return export_weights(module, layout)

