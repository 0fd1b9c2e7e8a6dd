"""Tiny random-initialised Stable Diffusion pipelines, built offline from config.

They have SD's layout (four UNet levels, cross-attention on the first three, a VAE that
downsamples 8x) at a few thousand parameters, so the whole generator runs in tests and smoke
runs on a CPU with no weights. ``tiny-sd2`` copies SD 2.x's differences: per-level head counts,
linear projections, upcast attention and wider text states.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..prompts.tokenizer import MAX_LENGTH, build_tokenizer


def build_tiny_pipeline(variant: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A random-initialised pipeline of SD 1.x ('tiny') or SD 2.x ('tiny-sd2') layout."""
    sd2 = variant == "tiny-sd2"
    tokenizer = build_tokenizer()
    text_dim = 64 if sd2 else 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_dim,
        attention_head_dim=(2, 2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    # Random init gives near-uniform attention, whose maps are flat and whose masks are noise;
    # sharper q/k make the tiny model's attention structured, like a trained one's.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.to_q.weight.mul_(4.0)
                module.to_k.weight.mul_(4.0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
