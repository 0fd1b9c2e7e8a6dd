"""Benchmark: generation and held-out prediction with 1 and N processes; images/s and efficiency.

Each arm runs the project's own code under the same launcher as ``fit --devices N`` (Lightning
Fabric; gloo on the CPU, NCCL on GPUs): ``SampleGenerator.fill`` sharded by batch, and
``predict_shard`` over the written pool. Efficiency = images/s with N / (N x images/s with 1).

    python scripts/bench_scale.py                                   # CPU: 1 vs 2 processes, 1 thread and core each
    python scripts/bench_scale.py --model sd15 --size 512 --steps 50 --batch 8 --images 64 \\
        --arch deeplabv3_resnet50                                   # GPUs: 1 vs all visible, fp16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from syntagen_st.core.config import Config, TrainConfig  # noqa: E402
from syntagen_st.core.layout import RunLayout  # noqa: E402
from syntagen_st.core.store import Pool  # noqa: E402
from syntagen_st.generation.sampler import SampleGenerator  # noqa: E402
from syntagen_st.prompts.rounds import round_records  # noqa: E402
from syntagen_st.scaleout.dist import launch  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """One arm: every rank generates and predicts its shard; rank 0 prints one JSON line."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(1)
    dist = launch(TrainConfig(accelerator="gpu" if on_gpu else "cpu", devices=str(args.devices)), split_batch=False)
    if not on_gpu:
        # One core per rank, its background writer included, as a GPU rank owns its device: else the
        # single process would write PNGs on the core the second rank needs.
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[dist.rank % len(cores)]})
    device = dist.device or torch.device("cuda" if on_gpu else "cpu")
    cfg = Config()
    cfg.model.pretrained, cfg.model.device = "tiny", device.type
    cfg.generate.height = cfg.generate.width = args.size
    cfg.generate.steps, cfg.generate.batch_size = args.steps, args.batch
    if args.model == "sd15":
        from bench_generate import sd15_pipeline

        pipe = sd15_pipeline(torch.float16 if on_gpu else torch.float32, device)
    else:
        from syntagen_st.generation.sampler import load_pipeline

        pipe = load_pipeline(cfg.model, device, torch.float32)
    generator = SampleGenerator(cfg, pipe=pipe, device=device)
    out = Path(args.out)
    # Warm-up (kernels, allocator) on round 1's prompts, then the timed round 0.
    generator.fill(Pool(out / f"warm{dist.rank}"), round_records(cfg, 1, args.batch), progress=False)
    records = round_records(cfg, 0, args.images)
    pool = RunLayout(out).pool

    def timed(fn) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - start

    generate_s = timed(lambda: generator.fill(pool, records, progress=False, dist=dist))

    from syntagen_st.segmentation import network
    from syntagen_st.selftrain.heldout import predict_shard

    model = network.build_segmenter(args.arch, "none").to(device).eval()
    images = [pool.image_path(r.id) for r in records]
    list(predict_shard([model], [images[: args.batch]], args.batch, dist))  # warm-up
    predict_s = timed(lambda: [None for _ in predict_shard([model], [images], args.batch, dist)])
    if dist.is_main:
        print(json.dumps({"processes": dist.world, "generate_img_s": args.images / generate_s,
                          "predict_img_s": args.images / predict_s}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--processes", type=int, default=None, help="N (default: visible GPUs, or 2 on the CPU)")
    parser.add_argument("--devices", type=int, default=None, help=argparse.SUPPRESS)  # a worker arm
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.devices is not None:
        worker(args)
        return
    many = args.processes or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    results = {}
    for n in (1, many):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--devices", str(n), "--out", tmp]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            results[n] = json.loads(done.stdout.strip().splitlines()[-1])
    one, n_proc = results[1], results[many]
    for key, what in (("generate_img_s", "generate"), ("predict_img_s", "predict")):
        efficiency = n_proc[key] / (many * one[key])
        print(f"{what}: {one[key]:.2f} img/s with 1 process, {n_proc[key]:.2f} img/s with {many}: "
              f"scaling efficiency {efficiency:.0%}")


if __name__ == "__main__":
    main()
