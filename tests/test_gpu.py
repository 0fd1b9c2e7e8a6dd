"""The opt-in suite for a machine with a GPU: ``pytest -m gpu`` (and ``-m weights`` for real SD).

Skipped here, each test with its reason: no CUDA device, or no local Stable Diffusion folder
(``SYNTAGEN_SD_PATH`` for SD 1.5, ``SYNTAGEN_SD21_PATH`` for SD 2.1 base). Weights do not change
speed, so the timing and capture checks run on a random-initialised SD 1.5 where no weights are
at hand. Run this first on a new GPU machine: it prints images/s and peak memory.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from conftest import smoke_config

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
pytestmark = [pytest.mark.gpu, gpu]


def _sd_folder(variable: str) -> str:
    path = os.environ.get(variable)
    if not path or not os.path.isfile(os.path.join(path, "model_index.json")):
        pytest.skip(f"no SD folder: set {variable} to a local diffusers folder")
    return path


def _config(pretrained: str, images: int = 16):
    cfg = smoke_config(height=512, width=512, steps=20, batch_size=8, num_images=images)
    cfg.model.pretrained, cfg.model.device, cfg.model.dtype = pretrained, "cuda", "float16"
    return cfg


def random_sd15():
    """SD 1.5's architecture with random weights (and the tiny tokenizer): real speed, no download."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from syntagen_st.generation.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda", torch.float16)


@pytest.fixture(scope="module")
def sd15():
    """Real SD 1.5 when SYNTAGEN_SD_PATH names it, else SD 1.5's architecture at random."""
    from syntagen_st.generation.sampler import SampleGenerator

    path = os.environ.get("SYNTAGEN_SD_PATH")
    if path:
        return SampleGenerator(_config(path)).pipe
    return random_sd15()


@pytest.mark.weights
@pytest.mark.parametrize("variable", ["SYNTAGEN_SD_PATH", "SYNTAGEN_SD21_PATH"])
def test_stable_diffusion_loads_in_fp16(variable):
    from syntagen_st.generation.sampler import SampleGenerator

    pipe = SampleGenerator(_config(_sd_folder(variable))).pipe
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}
    assert pipe.unet.device.type == "cuda"


def test_capture_leaves_512px_images_unchanged_and_reports_speed(sd15):
    from syntagen_st.generation.attention import capture_attention
    from syntagen_st.prompts.rounds import round_records

    records = round_records(_config("tiny"), 0, 16)

    def run(store=None) -> np.ndarray:
        images = []
        for i in range(0, 16, 8):
            batch = records[i : i + 8]
            if store is not None:
                store.begin(len(batch))
            images.append(sd15(
                prompt=[r.class_prompt for r in batch], height=512, width=512, num_inference_steps=20,
                generator=[torch.Generator("cpu").manual_seed(r.seed) for r in batch], output_type="np",
            ).images)
        return np.concatenate(images)

    plain = run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with capture_attention(sd15.unet, 8, (64, 64), 4, 2, 77) as store:
        captured = run(store)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"\ngenerate with capture: {16 / seconds:.2f} images/s at 512 px, 20 steps, batch 8; "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert np.abs(plain - captured).max() < 2e-2  # fp16 kernels may round differently


@pytest.mark.weights
def test_most_real_samples_hold_a_prompted_class(tmp_path):
    from syntagen_st.core.classes import class_index
    from syntagen_st.core.store import Pool, load_mask
    from syntagen_st.generation.sampler import SampleGenerator
    from syntagen_st.prompts.rounds import round_records

    cfg = _config(_sd_folder("SYNTAGEN_SD_PATH"), images=32)
    cfg.generate.steps = 50
    pool = Pool(tmp_path / "pool")
    start = time.perf_counter()
    SampleGenerator(cfg).fill(pool, round_records(cfg, 0, 32), progress=False)
    print(f"\nreal SD 1.5: {32 / (time.perf_counter() - start):.2f} images/s including labelling")
    holding = 0
    for row in pool.rows():
        present = set(np.unique(load_mask(pool.mask_path(row["id"]))).tolist()) - {0, 255}
        holding += bool(present & {class_index(c) for c in row["classes"]})
    assert holding >= 0.9 * len(pool.rows()), f"{holding} of {len(pool.rows())}"


@pytest.mark.weights
@pytest.mark.parametrize("variable", ["SYNTAGEN_SD_PATH", "SYNTAGEN_SD21_PATH"])
def test_multires_attention_labels_real_sd(variable, tmp_path):
    """configs/multires.yaml's grids on real SD 1.5 and 2.1 base: every grid is captured, the
    scores come out at 64x64, finite and normalised, and most masks hold a prompted class."""
    from pathlib import Path

    from syntagen_st.core.classes import class_index
    from syntagen_st.core.cli import load_config_file
    from syntagen_st.core.store import Pool, load_mask
    from syntagen_st.generation.sampler import SampleGenerator
    from syntagen_st.prompts.rounds import round_records

    cfg = _config(_sd_folder(variable))
    cfg.label = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "multires.yaml").label
    cfg.generate.steps = 30
    pool = Pool(tmp_path / "pool")
    start = time.perf_counter()
    SampleGenerator(cfg).fill(pool, round_records(cfg, 0, 16), progress=False)
    print(f"\n{variable} multires: {16 / (time.perf_counter() - start):.2f} images/s including labelling")
    holding = 0
    for row in pool.rows():
        with np.load(pool.scores_path(row["id"])) as npz:
            scores = npz["scores"].astype(np.float32)
        assert scores.shape == (len(row["classes"]), 64, 64)
        assert np.isfinite(scores).all() and scores.min() >= 0 and np.isclose(scores.max(), 1, atol=1e-3)
        mask = load_mask(pool.mask_path(row["id"]))
        prompted = {class_index(c) for c in row["classes"]}
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert mask.shape == (512, 512) and present <= prompted
        holding += bool(present)
    assert holding >= 0.75 * len(pool.rows()), f"{holding} of {len(pool.rows())}"


def test_bf16_deeplabv3_r50_trains_200_steps(tmp_path, make_seg_dataset):
    from syntagen_st.core.config import TrainConfig
    from syntagen_st.core.layout import TrainOutput
    from syntagen_st.core.store import sha256_file
    from syntagen_st.segmentation.network import load_model
    from syntagen_st.segmentation.trainer import train

    data = make_seg_dataset(tmp_path / "data", "plain", n=32, size=512)
    cfg = TrainConfig(arch="deeplabv3_resnet50", backbone_weights="none", max_steps=200, batch_size=8, crop_size=512,
                      precision="bf16-mixed", num_workers=4, logger="none", checkpoint_every=200)
    start = time.perf_counter()
    weights = train(cfg, data, tmp_path / "out")
    seconds = time.perf_counter() - start
    print(f"\nDeepLabv3-R50 bf16: {200 * 8 / seconds:.1f} images/s over 200 steps of batch 8 at 512 px")
    assert TrainOutput(tmp_path / "out").read_checksum() == sha256_file(weights)
    model = load_model(weights, "cuda")
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 512, 512, device="cuda"))["out"]
    assert out.shape == (2, 21, 512, 512) and torch.isfinite(out).all()
