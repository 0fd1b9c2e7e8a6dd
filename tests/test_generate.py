"""Generation end to end on the tiny pipelines: pool format, reproducibility, resume, loading."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOKE, smoke_config
from PIL import Image

from syntagen_st import generate as gen_mod
from syntagen_st.core.classes import class_index
from syntagen_st.core.cli import load_config_file
from syntagen_st.core.errors import UserError
from syntagen_st.core.store import Pool, load_mask
from syntagen_st.generation import sampler
from syntagen_st.generation.sampler import SampleGenerator, class_token_groups
from syntagen_st.prompts.records import PromptRecord, append_classes
from syntagen_st.prompts.rounds import round_records

MULTIRES = str(Path(SMOKE).with_name("multires.yaml"))


def _pool_arrays(pool: Pool):
    rows = pool.rows()
    return {
        r["id"]: (np.array(Image.open(pool.image_path(r["id"]))), load_mask(pool.mask_path(r["id"])))
        for r in rows
    }


def assert_masks_hold_prompted_classes(pool: Pool) -> None:
    """Every mask names only its prompt's classes, and at least half hold one of them: a labeller
    that collapses to background (or to one class) fails this."""
    holding = 0
    for row in pool.rows():
        prompted = {class_index(c) for c in row["classes"]}
        present = set(np.unique(load_mask(pool.mask_path(row["id"]))).tolist()) - {0, 255}
        assert present <= prompted, (row["id"], present, prompted)
        holding += bool(present)
    assert holding >= len(pool.rows()) / 2, f"{holding} of {len(pool.rows())} masks hold a prompted class"


def test_pool_layout_and_manifest(tiny_generator, tmp_path):
    cfg = smoke_config()
    pool = Pool(tmp_path / "pool")
    assert tiny_generator.fill(pool, round_records(cfg, 0, 3), progress=False) == 3
    rows = pool.rows()
    assert [r["id"] for r in rows] == ["r00_000000", "r00_000001", "r00_000002"]
    for row in rows:
        assert set(row) >= {"id", "round", "prompt", "class_prompt", "classes", "seed", "label_source"}
        assert row["class_prompt"].startswith(row["prompt"] + "; ")
        mask_file = Image.open(pool.mask_path(row["id"]))
        assert mask_file.mode == "P" and mask_file.size == (64, 64)
        assert set(np.unique(np.array(mask_file))) <= set(range(21)) | {255}
        assert Image.open(pool.image_path(row["id"])).size == (64, 64)
        scores = np.load(pool.scores_path(row["id"]))
        assert scores["scores"].shape == (len(row["classes"]), 4, 4)
        assert scores["class_ids"].dtype == np.uint8
    assert not list(tmp_path.rglob("*.tmp"))


def test_samples_do_not_depend_on_batch_size(tmp_path):
    records = round_records(smoke_config(), 0, 5)
    results = []
    for batch_size in (2, 5):
        generator = SampleGenerator(smoke_config(batch_size=batch_size))
        pool = Pool(tmp_path / f"b{batch_size}")
        generator.fill(pool, records, progress=False)
        assert_masks_hold_prompted_classes(pool)
        results.append(_pool_arrays(pool))
    a, b = results
    assert a.keys() == b.keys()
    for sid in a:
        # Batched CPU kernels may round differently in the last bit; masks must agree.
        assert np.abs(a[sid][0].astype(int) - b[sid][0].astype(int)).max() <= 1
        assert (a[sid][1] == b[sid][1]).mean() > 0.99


def test_resume_after_a_crash_skips_done_samples_and_matches(tiny_generator, tmp_path, monkeypatch):
    records = round_records(smoke_config(), 0, 6)
    clean = Pool(tmp_path / "clean")
    tiny_generator.fill(clean, records, progress=False)

    crashed = Pool(tmp_path / "crashed")
    calls = {"n": 0}
    original = Pool.write_sample

    def dying_write(self, sid, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-way through the second batch
            raise KeyboardInterrupt
        return original(self, sid, *args, **kwargs)

    monkeypatch.setattr(Pool, "write_sample", dying_write)
    with pytest.raises(KeyboardInterrupt):
        tiny_generator.fill(crashed, records, progress=False)
    monkeypatch.setattr(Pool, "write_sample", original)
    assert crashed.done_ids() == {"r00_000000", "r00_000001"}
    assert tiny_generator.fill(crashed, records, progress=False) == 4
    assert tiny_generator.fill(crashed, records, progress=False) == 0
    assert_masks_hold_prompted_classes(crashed)
    a, b = _pool_arrays(clean), _pool_arrays(crashed)
    assert a.keys() == b.keys()
    for sid in a:
        assert np.array_equal(a[sid][0], b[sid][0]) and np.array_equal(a[sid][1], b[sid][1])
    assert [r["seed"] for r in clean.rows()] == [r["seed"] for r in crashed.rows()]


def test_class_token_groups_find_multi_token_names(tiny_generator):
    tok = tiny_generator.pipe.tokenizer
    prompt = "a photo of a dining table and a person"
    record = PromptRecord("r00_000000", 0, 0, prompt, ("diningtable", "person"),
                          append_classes(prompt, ("diningtable", "person")), 1)
    groups = class_token_groups(tok, record)
    ids = tok(record.class_prompt).input_ids
    assert [tok.convert_ids_to_tokens([ids[i] for i in g]) for g in groups] == [
        ["dining</w>", "table</w>"], ["person</w>"]]


def test_class_token_groups_find_names_split_into_several_bpe_pieces(tiny_generator, monkeypatch):
    """Class words are whole tokens in the tiny vocabulary; names written without their space are
    not, so they split into several BPE pieces the way a rare word does in CLIP's real vocabulary."""
    from syntagen_st.prompts import records as prompts

    joined = {"pottedplant": "pottedplant", "tvmonitor": "tvmonitor", "person": "person"}
    monkeypatch.setattr(prompts, "display_name", joined.__getitem__)
    monkeypatch.setattr(sampler, "display_name", joined.__getitem__)
    tok = tiny_generator.pipe.tokenizer
    classes = ("pottedplant", "person", "tvmonitor")
    record = PromptRecord("r00_000000", 0, 0, "a living room", classes, append_classes("a living room", classes), 1)
    ids = tok(record.class_prompt).input_ids
    pieces = [tok.convert_ids_to_tokens([ids[i] for i in g]) for g in class_token_groups(tok, record)]
    assert ["".join(p).replace("</w>", "") for p in pieces] == list(classes)
    assert len(pieces[0]) > 1 and len(pieces[2]) > 1 and pieces[1] == ["person</w>"]


def test_prompt_too_long_for_the_text_encoder_is_refused(tiny_generator):
    prompt = "a photo of a horse " + "very " * 80
    record = PromptRecord("r00_000000", 0, 0, prompt, ("horse",), append_classes(prompt, ("horse",)), 1)
    with pytest.raises(UserError, match="limit of 77"):
        class_token_groups(tiny_generator.pipe.tokenizer, record)


def test_real_loading_path_from_a_saved_folder(tiny_generator, tmp_path):
    """save_pretrained the tiny pipeline, then load it with from_pretrained from that local folder
    (load_pipeline's local-folder branch; a hub id takes the same call with the id)."""
    folder = tmp_path / "sd"
    tiny_generator.pipe.save_pretrained(folder, safe_serialization=True)
    assert list(folder.glob("unet/*.safetensors"))
    cfg = smoke_config()
    cfg.model.pretrained = str(folder)
    loaded = SampleGenerator(cfg)
    assert loaded.pipe.unet.dtype.is_floating_point and str(loaded.pipe.unet.dtype) == "torch.float32"
    records = round_records(cfg, 0, 2)
    pool_a, pool_b = Pool(tmp_path / "a"), Pool(tmp_path / "b")
    loaded.fill(pool_a, records, progress=False)
    tiny_generator.fill(pool_b, records, progress=False)
    assert_masks_hold_prompted_classes(pool_a)
    a, b = _pool_arrays(pool_a), _pool_arrays(pool_b)
    for sid in a:
        assert np.array_equal(a[sid][0], b[sid][0]) and np.array_equal(a[sid][1], b[sid][1])
    # The configured dtype reaches from_pretrained (bfloat16 runs on CPU too).
    cfg.model.dtype = "bfloat16"
    halved = SampleGenerator(cfg).pipe
    assert {halved.unet.dtype, halved.vae.dtype, halved.text_encoder.dtype} == {torch.bfloat16}


def test_sd2_layout_yields_masks(tmp_path):
    cfg = smoke_config()
    cfg.model.pretrained = "tiny-sd2"
    generator = SampleGenerator(cfg)
    assert generator.pipe.unet.config.use_linear_projection and generator.pipe.unet.config.upcast_attention
    heads = generator.pipe.unet.config.attention_head_dim
    assert isinstance(heads, (list, tuple)) and len(set(heads)) > 1
    pool = Pool(tmp_path / "pool")
    generator.fill(pool, round_records(cfg, 0, 2), progress=False)
    for row in pool.rows():
        mask = load_mask(pool.mask_path(row["id"]))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= set(range(21)) | {255}
    assert_masks_hold_prompted_classes(pool)


@pytest.mark.parametrize("variant", ["tiny", "tiny-sd2"])
def test_multires_labels_on_both_layouts(variant, tiny_generator, tmp_path):
    """configs/multires.yaml's grids on SD 1.x and 2.x layouts: scores at the finest self grid
    (latent / 1), masks holding the prompted classes."""
    cfg = smoke_config()
    cfg.model.pretrained = variant
    cfg.label = load_config_file(MULTIRES).label
    assert (cfg.label.extra_cross_factors, cfg.label.cross_weights, cfg.label.extra_self_factor) == (
        [8, 2], [0.7, 0.15, 0.15], 1)
    generator = SampleGenerator(cfg, pipe=tiny_generator.pipe if variant == "tiny" else None)
    pool = Pool(tmp_path / "pool")
    generator.fill(pool, round_records(cfg, 0, 2), progress=False)
    for row in pool.rows():
        assert np.load(pool.scores_path(row["id"]))["scores"].shape == (len(row["classes"]), 8, 8)
        assert load_mask(pool.mask_path(row["id"])).shape == (64, 64)
    assert_masks_hold_prompted_classes(pool)


def test_cli_writes_a_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--config", SMOKE, "--generate.height", "64", "--generate.width", "64",
            "--generate.steps", "2", "--num-images", "3", "--out", str(out), "--no-progress"]
    assert gen_mod.main(argv) == 0
    saved = load_config_file(out / "config.yaml")
    assert (saved.generate.num_images, saved.generate.height, saved.generate.steps, saved.name) == (3, 64, 2, "smoke")
    assert len(Pool(out / "pool").rows()) == 3
    argv[argv.index("3")] = "5"
    gen_mod.main(argv)
    assert "2 new samples" in capsys.readouterr().out
    rows = [json.loads(line) for f in sorted((out / "pool" / "manifest").glob("*.jsonl")) for line in f.open()]
    assert len(rows) == 5


def test_guidance_scale_of_one_runs_without_classifier_free_guidance(tiny_generator, tmp_path):
    """guidance_scale <= 1: the pipeline sends one half only, and capture must take it as is."""
    calls = []
    unet = tiny_generator.pipe.unet
    hook = unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        generator = SampleGenerator(smoke_config(guidance_scale=1.0), pipe=tiny_generator.pipe)
        pool = Pool(tmp_path / "pool")
        generator.fill(pool, round_records(smoke_config(), 0, 4), progress=False)
    finally:
        hook.remove()
    assert set(calls) == {2}  # batches of 2 samples, no unconditional copy
    assert_masks_hold_prompted_classes(pool)


def test_non_square_images_keep_their_shape(tiny_generator, tmp_path):
    cfg = smoke_config(width=96)
    pool = Pool(tmp_path / "pool")
    SampleGenerator(cfg, pipe=tiny_generator.pipe).fill(pool, round_records(cfg, 0, 4), progress=False)
    for row in pool.rows():
        assert Image.open(pool.image_path(row["id"])).size == (96, 64)
        assert load_mask(pool.mask_path(row["id"])).shape == (64, 96)
        assert np.load(pool.scores_path(row["id"]))["scores"].shape == (len(row["classes"]), 4, 6)
    assert_masks_hold_prompted_classes(pool)


def test_label_sample_snaps_the_attention_blob_to_the_image(monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from syntagen_st.core.config import LabelConfig

    # A cat on the right 9/16 of a 128 px image; attention sees it on a 4x4 grid, where the edge
    # falls inside a cell, so the upsampled blob misses it.
    image = np.full((128, 128, 3), 30, np.uint8)
    image[:, 56:] = 220
    cross = torch.zeros(4, 4, 3)
    cross[:, 1, 1], cross[:, 2:, 1] = 0.5, 1.0
    cross[..., 0] = 1.0 - cross[..., 1]
    self_attn = torch.eye(64)
    record = PromptRecord("s0", 0, 0, "p", ("cat",), "p; cat", 0)
    store = SimpleNamespace(cross_grids=[(4, 4)])

    truth = image[..., 0] == 220

    def wrong(cfg):  # labelled pixels on the wrong side of the edge
        mask = sampler.label_sample(record, image, [cross.reshape(16, 3)], [self_attn], [[1]], store, cfg).mask
        return (((mask == class_index("cat")) != truth) & (mask != 255)).mean()

    assert wrong(dataclasses.replace(LabelConfig(), refine_image=False)) > 0.01
    assert wrong(LabelConfig()) == 0


def test_the_attention_label_of_the_stored_scores_is_the_generation_s_label_before_the_snap():
    import dataclasses
    from types import SimpleNamespace

    from syntagen_st.core.config import LabelConfig
    from syntagen_st.core.guided import attention_label

    # The report's "attention label" column: from the pool's float16 scores, without the image.
    image = np.full((128, 128, 3), 30, np.uint8)
    image[:, 56:] = 220
    cross = torch.zeros(4, 4, 3)
    cross[:, 1, 1], cross[:, 2:, 1] = 0.5, 1.0
    cross[..., 0] = 1.0 - cross[..., 1]
    record = PromptRecord("s0", 0, 0, "p", ("cat",), "p; cat", 0)
    store = SimpleNamespace(cross_grids=[(4, 4)])

    def sample(cfg):
        return sampler.label_sample(record, image, [cross.reshape(16, 3)], [torch.eye(64)], [[1]], store, cfg)

    on, off = sample(LabelConfig()), sample(dataclasses.replace(LabelConfig(), refine_image=False))
    assert on.scores.dtype == np.float16 and np.array_equal(on.scores, off.scores)
    before = attention_label(on.scores, list(on.class_ids), image.shape[:2], LabelConfig()).numpy()
    assert np.array_equal(before, off.mask)
    assert (before != on.mask).mean() > 0.01
