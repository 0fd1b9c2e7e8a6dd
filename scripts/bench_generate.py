"""Benchmark: generation with attention capture + labelling (with and without the image-guided
refinement), and with the multi-resolution grids of configs/multires.yaml, vs plain diffusers
generation.

Every arm uses one pipeline: the real SD 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text
encoder) with random weights (weights do not change speed), or ``--model tiny``; the arms run
alternately in one process; prints each one's ratio to plain generation and the capture's
memory (running sums + the chunk transient bound). The refinement is also timed alone on the
batch's full-resolution scores (on a CPU the difference of two long runs is within their noise),
and printed as refinement on / off. On a CPU use a reduced resolution and few steps; on CUDA,
also images/s and each arm's peak memory.

    python scripts/bench_generate.py --model tiny --size 512 --steps 4 --batch 2 --reps 4 --threads 1  # CPU, ~1 min
    python scripts/bench_generate.py --size 256 --steps 4 --batch 1 --reps 3 --threads 1   # CPU
    python scripts/bench_generate.py --size 512 --steps 50 --batch 8 --reps 3              # GPU, fp16
    python scripts/bench_generate.py --size 512 --unet-only --reps 2 --threads 1          # one UNet step, CPU

On a CPU the times are this process's CPU seconds (a shared machine's other processes do not
count); on CUDA, wall seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from syntagen_st.core.cli import load_config_file
from syntagen_st.core.config import Config, LabelConfig, cross_factors, self_factors
from syntagen_st.core.guided import refine_scores
from syntagen_st.generation.attention import CHUNK_BYTES, capture_attention, grid_of
from syntagen_st.generation.labels import upsample_scores
from syntagen_st.generation.sampler import SampleGenerator
from syntagen_st.generation.tiny import build_tiny_pipeline, build_tokenizer
from syntagen_st.prompts.rounds import round_records


def sd15_pipeline(dtype: torch.dtype, device: torch.device) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    tokenizer = build_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


MULTIRES = Path(__file__).resolve().parents[1] / "configs" / "multires.yaml"


def capture_mib(label: LabelConfig, latent_hw: tuple[int, int], batch: int, text_len: int) -> tuple[float, float]:
    """The capture's running sums and its transient bound, in MiB, for a batch (float32)."""
    cross = sum(grid_of(latent_hw, f)[0] * grid_of(latent_hw, f)[1] * text_len for f in cross_factors(label))
    selfs = sum((grid_of(latent_hw, f)[0] * grid_of(latent_hw, f)[1]) ** 2 for f in self_factors(label))
    largest = max((grid_of(latent_hw, f)[0] * grid_of(latent_hw, f)[1]) ** 2 for f in self_factors(label))
    return batch * (cross + selfs) * 4 / 2**20, 3 * min(batch * largest * 4, CHUNK_BYTES) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--unet-only", action="store_true",
                        help="time one UNet step (the guidance batch) per arm instead of a whole generation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cfg = Config()
    cfg.model.device = device.type
    cfg.generate.height = cfg.generate.width = args.size
    cfg.generate.steps, cfg.generate.batch_size = args.steps, args.batch
    if args.model == "tiny":
        pipe = build_tiny_pipeline("tiny").to(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = sd15_pipeline(dtype, device)
    multires = load_config_file(MULTIRES).label
    labels = {
        "capture": dataclasses.replace(cfg.label, refine_image=False),
        "refined": cfg.label,
        "multires": dataclasses.replace(multires, refine_image=False),
        "multires-cross": dataclasses.replace(multires, refine_image=False, extra_self_factor=None),
    }
    generators = {name: SampleGenerator(dataclasses.replace(cfg, label=label), pipe=pipe) for name, label in labels.items()}
    latent_hw = generators["capture"].latent_hw
    records = round_records(cfg, 0, args.batch)
    prompts = [r.class_prompt for r in records]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        gens = [torch.Generator().manual_seed(r.seed) for r in records]
        with torch.inference_mode():
            pipe(prompts, height=args.size, width=args.size, num_inference_steps=args.steps, generator=gens,
                 output_type="np")

    # On a shared CPU, wall time counts other processes' slices: time this process's CPU instead.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    torch.manual_seed(0)
    latents = torch.randn(2 * args.batch, 4, *latent_hw, device=device, dtype=dtype)
    context = torch.randn(2 * args.batch, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)

    def unet_step() -> None:
        with torch.inference_mode():
            pipe.unet(latents, 500, encoder_hidden_states=context)

    def timed(fn: Callable[[], object]) -> float:
        sync()
        start = clock()
        fn()
        sync()
        return clock() - start

    peaks: dict[str, float] = {}

    def arm(name: str) -> float:
        """One run of an arm; its capture is installed outside the timed part, inside the peak memory."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if name == "plain":
            seconds = timed(unet_step if args.unet_only else plain)
        else:
            label = labels[name]
            with capture_attention(pipe.unet, args.batch, latent_hw, cross_factors(label), self_factors(label),
                                   77) as store:
                store.begin(args.batch)
                seconds = timed(unet_step if args.unet_only else lambda: generators[name].generate(records, store))
        if device.type == "cuda":
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        return seconds

    names = [name for name in ["plain", *labels] if not (args.unet_only and name == "refined")]
    for name in names:  # warm-up
        arm(name)
    if not args.unet_only:
        label = labels["capture"]
        with capture_attention(pipe.unet, args.batch, latent_hw, cross_factors(label), self_factors(label), 77) as store:
            samples = generators["capture"].generate(records, store)
        # The refinement's inputs exactly as label_sample gives them: full-resolution scores on the device.
        inputs = [(s.image, upsample_scores(torch.from_numpy(s.scores).float().to(device), s.image.shape[:2]))
                  for s in samples]

        def refine_alone() -> None:
            for image, full in inputs:
                refine_scores(image, full, cfg.label)

        names.append("alone")
    timings: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        # Each rep starts with another arm, so no arm always follows the same one (a fixed order made
        # the third arm look up to 1.76x slower on a loaded machine).
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            timings[name].append(timed(refine_alone) if name == "alone" else arm(name))
    best = {k: min(v) for k, v in timings.items()}
    what = "one UNet step" if args.unet_only else "generation"
    print(f"model={args.model} device={device.type} size={args.size} steps={args.steps} batch={args.batch} "
          f"reps={args.reps} threads={torch.get_num_threads()}; {what}, best of {args.reps}, "
          + ("wall seconds" if device.type == "cuda" else "CPU seconds of this process"))
    print("  ".join(f"{name} {seconds:.3f}s" for name, seconds in best.items() if name != "alone"))
    if device.type == "cuda" and not args.unet_only:
        print(f"images/s with capture: {args.batch / best['capture']:.2f}, with refinement too: "
              f"{args.batch / best['refined']:.2f}, multires: {args.batch / best['multires']:.2f}")
    if device.type == "cuda":
        print("peak GPU memory: " + ", ".join(f"{name} {gib:.2f} GiB" for name, gib in peaks.items()))
    print(f"ratio capture/plain: default {best['capture'] / best['plain']:.3f}, multires "
          f"{best['multires'] / best['plain']:.3f}, multires cross grids only (one self grid) "
          f"{best['multires-cross'] / best['plain']:.3f}")
    if not args.unet_only:
        print(f"refinement on / off: {best['refined'] / best['capture']:.3f} measured end to end; "
              f"{(best['capture'] + best['alone']) / best['capture']:.3f} from the refinement's own time "
              f"({1000 * best['alone'] / args.batch:.1f} ms per image, timed alone)")
        print(f"where it runs: inline in the generating thread, on {device.type} where the scores are "
              "(label_sample); each batch waits for it before the next denoising starts")
    for name in ("capture", "multires", "multires-cross"):
        sums, transient = capture_mib(labels[name], latent_hw, args.batch, 77)
        print(f"{name} capture memory: running sums {sums:.1f} MiB, chunk transient <= {transient:.1f} MiB")


if __name__ == "__main__":
    main()
