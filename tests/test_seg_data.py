"""Dataset discovery, sample loading, augmentation presets and corrupt-sample handling."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import run_cli

from syntagen_st.core.classes import IGNORE_INDEX
from syntagen_st.core.errors import UserError
from syntagen_st.core.store import save_mask
from syntagen_st.segmentation.data import (
    SampleError,
    SegDataset,
    collate,
    eval_transform,
    find_samples,
    find_voc_samples,
    load_sample,
    train_transform,
)


def test_plain_folder(tmp_path, make_seg_dataset):
    root = make_seg_dataset(tmp_path / "d", "plain", n=4)
    samples = find_samples(root)
    assert [s.image.name for s in samples] == [f"s000{i}.png" for i in range(4)]
    assert all(s.mask == root / "masks" / s.image.name and s.scores is None for s in samples)


@pytest.mark.parametrize("suffix", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_tree_from_any_level(tmp_path, make_seg_dataset, suffix):
    root = make_seg_dataset(tmp_path / "d", "voc", n=6)
    train = find_samples(root / suffix, "train")
    val = find_voc_samples(root / suffix, "val")
    assert [s.image.name for s in train] == ["s0000.jpg", "s0001.jpg", "s0002.jpg"]
    assert [s.mask.name for s in val] == ["s0003.png", "s0004.png", "s0005.png"]


def test_pool_and_run_with_latest_refined_labels(tmp_path, make_seg_dataset):
    run = tmp_path / "run"
    make_seg_dataset(run / "pool", "pool", n=4)
    pool_samples = find_samples(run / "pool")
    assert all(s.scores is not None and s.scores.exists() for s in pool_samples)
    assert find_samples(run) == pool_samples  # no rounds yet: the pool's own labels

    refined = np.zeros((64, 64), np.uint8)
    for r, rows in {
        0: [{"id": "s0000", "kept": False, "reason": "old", "mask": "rounds/0/labels/s0000.png"}],
        1: [
            {"id": "s0001", "kept": True, "reason": None, "mask": "rounds/1/labels/s0001.png"},
            {"id": "s0002", "kept": False, "reason": "low agreement", "mask": "rounds/1/labels/s0002.png"},
        ],
    }.items():
        for row in rows:
            save_mask(run / row["mask"], refined)
        (run / "rounds" / str(r) / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples = {s.image.stem: s for s in find_samples(run)}
    assert sorted(samples) == ["s0000", "s0001", "s0003"]  # round 1 wins; s0002 dropped there
    assert samples["s0001"].mask == run / "rounds/1/labels/s0001.png" and samples["s0001"].scores is None
    assert samples["s0000"].mask == run / "pool/masks/s0000.png"
    assert samples["s0003"].scores == run / "pool/scores/s0003.npz"


@pytest.mark.parametrize(
    "layout, expect",
    [
        ("missing", "no such folder"),
        ("empty", "not a dataset"),
        ("devkit_only", "malformed VOC root"),
        ("no_split", "ImageSets/Segmentation/train.txt: missing split file"),
        ("no_masks", "has a mask of the same name"),
        ("empty_images", "holds no samples"),
        ("bad_manifest", "000.jsonl: unreadable manifest shard"),
    ],
)
def test_bad_folders_are_one_clear_error(tmp_path, make_seg_dataset, layout, expect):
    root = tmp_path / "d"
    if layout == "empty":
        root.mkdir()
    elif layout == "devkit_only":
        (root / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    elif layout == "no_split":
        make_seg_dataset(root, "voc", n=2)
        (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").unlink()
    elif layout == "no_masks":
        make_seg_dataset(root, "plain", n=2)
        for mask in (root / "masks").iterdir():
            mask.rename(mask.with_suffix(".jpg"))
    elif layout == "empty_images":
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
    elif layout == "bad_manifest":
        make_seg_dataset(root, "pool", n=2)
        (root / "manifest" / "000.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=expect.replace(".", r"\.")) as err:
        find_samples(root)
    assert "\n" not in str(err.value)


def test_train_preset_crops_pads_with_255_and_is_strict(tmp_path, make_seg_dataset):
    root = make_seg_dataset(tmp_path / "d", "plain", n=1, size=40)
    raw = load_sample(find_samples(root)[0], confidence=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict=True: a misspelt argument would raise, not warn
        transform = train_transform(96, 1.0, 1.0)
    out = transform(**raw)
    assert out["image"].shape == (3, 96, 96) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (96, 96)
    # 40 px scaled by 1.0 and padded to 96: everything outside the 40x40 picture is 255
    assert int((out["mask"] != IGNORE_INDEX).sum()) <= 40 * 40
    assert (out["mask"] == IGNORE_INDEX).float().mean() > 0.8
    full = eval_transform()(**raw)
    assert full["image"].shape == (3, 40, 40) and torch.equal(full["mask"], torch.from_numpy(raw["mask"]))


def test_confidence_is_upsampled_max_of_scores(tmp_path, make_seg_dataset):
    root = make_seg_dataset(tmp_path / "p", "pool", n=1)
    sample = find_samples(root)[0]
    item = load_sample(sample, confidence=True)
    assert item["weight"].shape == (64, 64) and item["weight"].dtype == np.float32
    inside = item["mask"] == int(np.load(sample.scores)["class_ids"][0])
    assert item["weight"][inside].mean() > 0.7 and item["weight"][item["mask"] == 0].mean() < 0.3
    np.savez(sample.scores, class_ids=np.zeros(0, np.uint8), scores=np.zeros((0, 16, 16), np.float16))
    assert load_sample(sample, confidence=True)["weight"].max() == 0


def _break(root, kind: str) -> str:
    """Damage sample s0001 of a plain folder; returns the file name the error must name."""
    if kind == "image":
        (root / "images" / "s0001.png").write_bytes(b"\x89PNG not really")
        return "s0001.png"
    if kind == "values":
        mask = np.zeros((64, 64), np.uint8)
        mask[0, 0] = 30
        save_mask(root / "masks" / "s0001.png", mask)
        return "masks/s0001.png"
    save_mask(root / "masks" / "s0001.png", np.zeros((32, 64), np.uint8))
    return "masks/s0001.png"


@pytest.mark.parametrize("kind", ["image", "values", "size"])
def test_corrupt_sample_skipped_in_training_and_named_in_evaluation(tmp_path, make_seg_dataset, kind, caplog):
    root = make_seg_dataset(tmp_path / "d", "plain", n=3)
    name = _break(root, kind)
    samples = find_samples(root)
    with pytest.raises(SampleError, match=name):
        load_sample(samples[1])

    train = SegDataset(samples, train_transform(32), skip_corrupt=True)
    batch = collate([train[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 32, 32)  # the broken sample was replaced, batch kept its size
    assert batch["bad"].tolist() == [1] and batch["index"].tolist() == [0, 2, 2]
    assert name.split("/")[-1] in caplog.text and "1 skipped so far" in caplog.text

    evaluation = SegDataset(samples, eval_transform(), skip_corrupt=False)
    error = collate([evaluation[1]])["error"]
    assert name in error and "\n" not in error


def test_an_image_too_large_to_decode_is_one_line_before_it_is_decoded(tmp_path, make_seg_dataset):
    from PIL import Image

    root = make_seg_dataset(tmp_path / "plain", "plain", n=2)
    # 5000 x 4000 = 20 Mpx, a few KB on disk: refused from its header.
    Image.new("RGB", (5000, 4000)).save(root / "images" / "s0000.png")
    Image.new("L", (5000, 4000)).save(root / "masks" / "s0001.png")
    image, mask = find_samples(root)
    with pytest.raises(SampleError, match=r"s0000\.png: 5000x4000 pixels, above the limit of 16,777,216"):
        load_sample(image)
    with pytest.raises(SampleError, match=r"s0001\.png: 5000x4000 pixels, above the limit"):
        load_sample(mask)
    # PIL's own bomb guard (twice its limit) is the same kind of line, not a traceback.
    Image.MAX_IMAGE_PIXELS, saved = 1000, Image.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(SampleError, match=r"s0000\.png: Image size \(20000000 pixels\) exceeds limit"):
            load_sample(image)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_the_pixel_limit_has_a_flag_that_reaches_every_command_and_worker(tmp_path, make_seg_dataset, monkeypatch,
                                                                          capsys):
    from PIL import Image

    from syntagen_st import train as train_cli
    from syntagen_st.core.rules import MAX_IMAGE_PIXELS, PIXEL_LIMIT_ENV, pixel_limit

    monkeypatch.setenv(PIXEL_LIMIT_ENV, str(MAX_IMAGE_PIXELS))  # whatever the flag sets is undone after the test
    root = make_seg_dataset(tmp_path / "plain", "plain", n=2, size=32)
    Image.new("RGB", (5000, 4000)).save(root / "images" / "s0000.png")
    Image.new("L", (5000, 4000)).save(root / "masks" / "s0000.png")
    big, small = find_samples(root)
    with pytest.raises(SampleError, match="above the limit of 16,777,216"):
        load_sample(big)
    assert pixel_limit("5000x4000") == 20_000_000
    assert load_sample(big)["mask"].shape == (4000, 5000)
    pixel_limit("1000")
    with pytest.raises(SampleError, match=r"s0001\.png: 32x32 pixels, above the limit of 1,000"):
        load_sample(small)
    # Through a command: the limit reaches the loader's worker processes (started after the flag is read).
    (root / "images" / "s0000.png").unlink()
    (root / "masks" / "s0000.png").unlink()
    code, _, err = run_cli(train_cli.main, ["--data", root, "--out", tmp_path / "out", "--max-image-pixels", "31x31",
                                            "--steps", "1", "--crop-size", "32", "--batch-size", "2", "--logger", "none",
                                            "--backbone-weights", "none", "--arch", "lraspp_mobilenet_v3_large",
                                            "--train.num_workers", "1", "--no-progress"], capsys)
    assert code == 2 and "s0001.png: 32x32 pixels, above the limit of 961" in err, err


def test_a_dataset_whose_files_lead_outside_it_is_refused(tmp_path, make_seg_dataset):
    root = make_seg_dataset(tmp_path / "plain", "plain", n=2)
    outside = make_seg_dataset(tmp_path / "elsewhere", "plain", n=1)
    (root / "masks" / "s0001.png").unlink()
    (root / "masks" / "s0001.png").symlink_to(outside / "masks" / "s0000.png")
    with pytest.raises(UserError, match=r"masks/s0001\.png: leads outside .*plain"):
        find_samples(root)
    # A link that stays inside (as the export's VOC tree may be) is fine.
    (root / "masks" / "s0001.png").unlink()
    (root / "masks" / "s0001.png").symlink_to(root / "masks" / "s0000.png")
    assert len(find_samples(root)) == 2
