"""Benchmark: generation with attention capture + labelling (with and without the image-guided
refinement) vs plain diffusers generation.

The arms use the real SD 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder) with random
weights (weights do not change speed), or the tiny test pipeline (``--model tiny``), and run
alternately in one process. Printed side by side: plain generation, capture + labels without
the refinement, the same with it, their ratio, and the refinement's own time per image (timed
alone on the batch's full-resolution scores, since on a CPU the difference of two long runs is
within their noise). On CUDA also images/s and peak memory.

    python scripts/bench_generate.py --model tiny --size 128 --steps 4 --reps 5 --threads 1      # CPU, seconds
    python scripts/bench_generate.py --size 256 --steps 2 --batch 1 --reps 2 --threads 1         # CPU, minutes
    python scripts/bench_generate.py --size 512 --steps 50 --batch 8 --reps 3                    # GPU, fp16
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from syntagen_st.core.config import Config
from syntagen_st.core.guided import refine_scores
from syntagen_st.generation.attention import capture_attention
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15",
                        help="SD 1.5's architecture with random weights, or the tiny test pipeline")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
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
        pipe = build_tiny_pipeline().to(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = sd15_pipeline(dtype, device)
    generator = SampleGenerator(cfg, pipe=pipe)
    unrefined = SampleGenerator(dataclasses.replace(cfg, label=dataclasses.replace(cfg.label, refine_image=False)), pipe=pipe)
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

    with capture_attention(pipe.unet, args.batch, generator.latent_hw, cfg.label.cross_factor,
                           cfg.label.self_factor, 77) as store:
        samples = unrefined.generate(records, store)
        # The refinement's inputs exactly as label_sample gives them: full-resolution scores on the device.
        inputs = [(s.image, upsample_scores(torch.from_numpy(s.scores).float().to(device), s.image.shape[:2]))
                  for s in samples]

        def refine_alone() -> None:
            for image, full in inputs:
                refine_scores(image, full, cfg.label)

        timings: dict[str, list[float]] = {"plain": [], "capture": [], "refined": [], "alone": []}
        arms = {
            "plain": plain,
            "capture": lambda: unrefined.generate(records, store),
            "refined": lambda: generator.generate(records, store),
            "alone": refine_alone,
        }
        for name, fn in arms.items():  # warm-up
            fn()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        order = list(arms.items())
        for rep in range(args.reps):
            # Each rep starts with another arm, so no arm always follows the same one.
            for name, fn in order[rep % len(order):] + order[:rep % len(order)]:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                timings[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    classes = sum(len(r.classes) for r in records) / len(records)
    print(f"model={args.model} device={device.type} threads={torch.get_num_threads()} size={args.size} "
          f"steps={args.steps} batch={args.batch} reps={args.reps} (best of each)")
    print(f"{'arm':<36}{'s per batch':>12}{'ms per image':>14}{'vs plain':>10}")
    for name, title in (("plain", "plain diffusers"), ("capture", "capture + labels, refinement off"),
                        ("refined", "capture + labels, refinement on")):
        print(f"{title:<36}{best[name]:>12.3f}{1000 * best[name] / args.batch:>14.1f}{best[name] / best['plain']:>10.3f}")
    alone = 1000 * best["alone"] / args.batch
    print(f"{'the refinement alone':<36}{best['alone']:>12.3f}{alone:>14.1f}   ({classes:.1f} classes per image)")
    print(f"refinement on / off: {best['refined'] / best['capture']:.3f} measured end to end; "
          f"{(best['capture'] + best['alone']) / best['capture']:.3f} from the refinement's own time")
    print(f"where it runs: inline in the generating thread, on {device.type} where the scores are "
          "(label_sample); each batch waits for it before the next denoising starts, so its time adds to "
          "generation's, the share above")
    if device.type == "cuda":
        print(f"images/s with capture: {args.batch / best['capture']:.2f}, with refinement too: "
              f"{args.batch / best['refined']:.2f}; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"ratio capture/plain: {best['capture'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
