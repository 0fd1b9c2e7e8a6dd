"""Benchmark: Lightning training steps vs a plain PyTorch loop, and train-preset loading speed.

    python scripts/bench_train.py                                  # small CPU run (minutes)
    python scripts/bench_train.py --arch deeplabv3_resnet50 --size 512 --batch 8   # the protocol, GPU

1. The same model, data, optimiser, scheduler and loss, trained by Lightning (SegModule) and by
   a hand-written loop, alternating in one process; per-step wall time after warm-up. Prints
   the ratio Lightning / plain (target <= 1.05). On a GPU also images/s and model FLOPs
   utilisation (FLOPs of one forward + backward, counted by torch's FlopCounterMode).
2. The train augmentation preset at --load-size px on PNG files: images/s for one worker.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from syntagen_st.core.config import TrainConfig  # noqa: E402
from syntagen_st.core.store import save_image, save_mask  # noqa: E402
from syntagen_st.segmentation.data import Sample, SegDataset, collate, train_transform  # noqa: E402
from syntagen_st.segmentation.module import SegModule, seg_loss  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; pass --peak-tflops for other devices.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


class Batches(Dataset):
    """Pre-made, already augmented samples: both loops measure training, not decoding."""

    def __init__(self, n: int, size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=gen)
        self.masks = torch.randint(0, 21, (n, size, size), generator=gen, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "index": i, "bad": []}


class StepTimes(pl.Callback):
    def __init__(self, sync: bool) -> None:
        self.sync, self.ends = sync, []

    def on_train_batch_end(self, *args) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def lightning_steps(cfg: TrainConfig, loader: DataLoader, precision: str, accelerator: str) -> list[float]:
    timer = StepTimes(sync=accelerator == "gpu")
    trainer = pl.Trainer(
        max_steps=cfg.max_steps, accelerator=accelerator, devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )
    trainer.fit(SegModule(cfg), train_dataloaders=loader)
    return np.diff(timer.ends).tolist()


def plain_steps(cfg: TrainConfig, loader: DataLoader, device: torch.device) -> list[float]:
    module = SegModule(cfg)  # the same network, optimiser and scheduler, without the Trainer
    model = module.model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    ends, step = [], 0
    while step < cfg.max_steps:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            target = batch["mask"].to(device, non_blocking=True).long()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = seg_loss(model(images), target, cfg.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss.item()  # Lightning reads the loss each step (self.log): so do we
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            step += 1
            if step == cfg.max_steps:
                break
    return np.diff(ends).tolist()


def flops_per_step(cfg: TrainConfig, size: int, batch: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = SegModule(cfg).model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 21, (batch, size, size), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            seg_loss(model(x), y, cfg.aux_weight).backward()
    return float(counter.get_total_flops())


def loading_speed(size: int, count: int, crop: int) -> float:
    """images/s of SegDataset with the train preset, one process (= one loader worker)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        yy, xx = np.mgrid[0:size, 0:size]
        for i in range(count):
            # smooth picture with a shape, like generated images (noise would make PNG decoding the bottleneck)
            image = np.stack([(xx * (c + 1) + yy * (i + 1)) % 256 for c in range(3)], -1).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            y0, x0 = rng.integers(0, size // 2, 2)
            mask[y0 : y0 + size // 3, x0 : x0 + size // 3] = 1 + i % 20
            image[mask > 0] = (200, 60, 60)
            save_image(Path(tmp) / f"{i}.png", image)
            save_mask(Path(tmp) / f"{i}_m.png", mask)
            samples.append(Sample(Path(tmp) / f"{i}.png", Path(tmp) / f"{i}_m.png"))
        dataset = SegDataset(samples, train_transform(crop), skip_corrupt=True)
        dataset[0]  # warm-up (imports, caches)
        start = time.perf_counter()
        for k in range(count):
            dataset[k]
        return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    ap.add_argument("--size", type=int, default=128, help="training crop size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25, help="steps per timed run")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out at the start of each run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating Lightning / plain pairs")
    ap.add_argument("--load-size", type=int, default=512)
    ap.add_argument("--load-count", type=int, default=24)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 avoids OpenMP stalls on a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    warnings.filterwarnings("ignore")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    accelerator, precision = ("gpu", "bf16-mixed") if gpu else ("cpu", "32-true")
    torch.backends.cudnn.benchmark = gpu
    cfg = TrainConfig(arch=args.arch, backbone_weights="none", max_steps=args.steps, batch_size=args.batch,
                      crop_size=args.size, num_workers=0, logger="none")
    loader = DataLoader(Batches(args.batch * args.steps, args.size), batch_size=args.batch, shuffle=True,
                        drop_last=True, collate_fn=collate, pin_memory=gpu)
    device_name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; {args.arch} {args.size}px batch {args.batch}, {args.steps} steps x {args.rounds} rounds")

    light, plain = [], []
    for r in range(args.rounds):
        torch.manual_seed(r)
        lt = lightning_steps(cfg, loader, precision, accelerator)[args.warmup :]
        pt = plain_steps(cfg, loader, device)[args.warmup :]
        light += lt
        plain += pt
        print(f"round {r}: lightning {statistics.median(lt) * 1e3:.1f} ms/step, plain {statistics.median(pt) * 1e3:.1f} ms/step")
    ratio = statistics.median(light) / statistics.median(plain)
    print(f"lightning/plain step time ratio: {ratio:.3f} (median; mean {statistics.mean(light) / statistics.mean(plain):.3f}; target <= 1.05)")

    if gpu:
        step_s = statistics.median(light)
        flops = flops_per_step(cfg, args.size, args.batch, device)
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        mfu = f"{flops / step_s / (peak * 1e12):.1%}" if peak else "n/a (give --peak-tflops)"
        print(f"train images/s: {args.batch / step_s:.1f}; {flops / 1e12:.2f} TFLOP/step; MFU {mfu}")

    speed = loading_speed(args.load_size, args.load_count, args.load_size)
    print(f"train preset at {args.load_size}px (PNG decode + scale/pad/crop/flip/jitter): {speed:.1f} images/s per worker")


if __name__ == "__main__":
    main()
