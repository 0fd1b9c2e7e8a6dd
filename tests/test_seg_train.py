"""Training end to end on a tiny set: loss falls, resume, export, corrupt samples, W&B offline, CLI errors."""

from __future__ import annotations

import csv
import glob
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, wandb_history_keys

from syntagen_st import train as train_cli
from syntagen_st.core.config import TrainConfig
from syntagen_st.core.store import sha256_file
from syntagen_st.segmentation.trainer import checkpoint_step, train

STEPS = 12


def tiny_config(**overrides) -> TrainConfig:
    cfg = TrainConfig(
        arch="lraspp_mobilenet_v3_large", backbone_weights="none", max_steps=STEPS, batch_size=4, crop_size=48,
        lr=0.02, num_workers=0, logger="csv", log_every=1, val_every=STEPS, checkpoint_every=5, val_panels=2,
    )
    return TrainConfig(**{**cfg.__dict__, **overrides})


def csv_rows(out: Path, version: int) -> list[dict]:
    with open(out / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from two threads, and OpenMP barriers stall for seconds on a busy CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_seg_dataset):
    """One short training on 8 good samples + 1 corrupt image, validated on a VOC tree's val split."""
    base = tmp_path_factory.mktemp("train")
    data = make_seg_dataset(base / "data", "plain", n=8)
    (data / "images" / "broken.png").write_bytes(b"not a png")
    (data / "masks" / "broken.png").write_bytes((data / "masks" / "s0000.png").read_bytes())
    val = make_seg_dataset(base / "voc", "voc", n=4, seed=7)
    out = base / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = train(tiny_config(), data, out, val_data=val)
    return {"data": data, "val": val, "out": out, "weights": weights, "warnings": [str(w.message) for w in caught]}


def test_loss_falls_and_final_weights_are_exported(trained):
    out = trained["out"]
    losses = [float(r["train/loss"]) for r in csv_rows(out, 0) if r.get("train/loss")]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert trained["weights"] == out / "model.safetensors"
    assert (out / "checksum.txt").read_text() == f"{sha256_file(trained['weights'])}  model.safetensors\n"
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == STEPS
    metrics = yaml.safe_load((out / "metrics.json").read_text())
    assert metrics["step"] == STEPS and len(metrics["per_class_iou"]) == 21 and metrics["val_images"] == 2
    assert yaml.safe_load((out / "train_config.yaml").read_text())["train"]["max_steps"] == STEPS


def test_corrupt_training_sample_is_skipped_and_counted(trained):
    assert any("skipped 1 corrupt training samples" in w for w in trained["warnings"]), trained["warnings"]


def cli_args(trained, steps: int) -> list[str]:
    cfg = tiny_config()
    return [
        "--data", str(trained["data"]), "--out", str(trained["out"]), "--steps", str(steps), "--arch", cfg.arch,
        "--crop-size", "48", "--batch-size", "4", "--logger", "csv", "--backbone-weights", "none",
        "--train.num_workers", "0", "--train.log_every", "1", "--train.checkpoint_every", "5", "--train.lr", "0.02",
    ]


def test_rerun_resumes_the_step_count_then_only_reexports(trained, capsys):
    out = trained["out"]
    code, stdout, _ = run_cli(train_cli.main, cli_args(trained, STEPS + 4), capsys)
    assert code == 0 and "sha256:" in stdout
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == STEPS + 4
    steps = [int(r["step"]) for r in csv_rows(out, 1) if r.get("train/loss")]
    assert steps == list(range(STEPS, STEPS + 4))  # continued, not restarted
    digest = sha256_file(out / "model.safetensors")

    (out / "model.safetensors").unlink()
    code, _, _ = run_cli(train_cli.main, cli_args(trained, STEPS + 4), capsys)  # finished: nothing trains, weights come back
    assert code == 0 and sha256_file(out / "model.safetensors") == digest
    assert not (out / "logs" / "version_2").exists()


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"--data": "/nonexistent/data"}, "/nonexistent/data: no such folder"),
        ({"--steps": "0"}, "train.max_steps must be >= 1"),
        ({"--arch": "unet"}, "unet"),
        ({"--train.arch": "unet"}, "unet"),
        ({"--backbone-weights": "/no/such.pth"}, "train.backbone_weights: file '/no/such.pth' does not exist"),
        ({"--bogus": "1"}, "bogus"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(trained, capsys, change, expect):
    argv = cli_args(trained, 3)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, _, err = run_cli(train_cli.main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err


def test_wandb_offline_run_holds_per_class_iou(tmp_path, trained, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(tiny_config(max_steps=2, val_every=2, logger="wandb"), trained["data"], tmp_path / "out", val_data=trained["val"])
    runs = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    expected = {"val/mIoU", "train/loss", "val/iou/aeroplane", "val/iou/tvmonitor", "val/iou/background",
                "val/iou_table/_type", "val/iou_bar_table/_type", "val/overlays/all_masks"}
    assert expected <= wandb_history_keys(runs[0], expected)
    masks = glob.glob(str(Path(runs[0]).parent / "files" / "media" / "images" / "mask" / "val" / "*.png"))
    assert len(masks) >= 2  # 2 panels x (label, prediction); W&B stores identical masks once


def test_training_opens_its_own_wandb_run_beside_an_open_one(tmp_path, trained, monkeypatch):
    """The loop keeps a round-level W&B run open while it trains: training must neither adopt nor end it."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    outer = wandb.init(project="p", name="rounds", dir=str(tmp_path), reinit="create_new")
    try:
        train(tiny_config(max_steps=1, logger="wandb"), trained["data"], tmp_path / "out")
        outer.log({"still_open": 1})  # raises if training finished this run
    finally:
        outer.finish()
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) == 2


def test_evaluate_reads_a_run_folder_and_a_lightning_checkpoint(tmp_path, trained, capsys):
    """A run folder is evaluated through final/model.safetensors, a .ckpt through its network:
    the same weights give the same numbers, each written beside (or named as) its source."""
    import json
    import shutil

    from syntagen_st import evaluate as evaluate_cli

    out, voc = trained["out"], str(trained["val"])
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    shutil.copy(out / "model.safetensors", run / "final" / "model.safetensors")
    ckpt = out / "checkpoints" / "last.ckpt"
    assert run_cli(evaluate_cli.main, [str(run), "--voc-root", voc], capsys)[0] == 0
    from_run = json.loads((run / "final" / "metrics.json").read_text())
    code, _, _ = run_cli(evaluate_cli.main, [str(ckpt), "--voc-root", voc, "--out", str(tmp_path / "ckpt.json")], capsys)
    from_ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    assert code == 0 and from_run["weights"] == str(run / "final" / "model.safetensors")
    assert from_ckpt["weights_sha256"] == sha256_file(ckpt) and from_run["weights_sha256"] == sha256_file(out / "model.safetensors")
    assert from_ckpt["confusion_matrix"] == from_run["confusion_matrix"] and from_run["pixels"] > 0


def test_confidence_weighting_weights_the_loss_by_attention_confidence(tmp_path, make_seg_dataset, monkeypatch):
    """With confidence_weighting, each pixel's loss is weighted by its pool sample's attention
    confidence: high inside the labelled object, low where the attention saw nothing."""
    from syntagen_st.segmentation import module as segmodel

    pool = make_seg_dataset(tmp_path / "pool", "pool", n=4, size=48)
    seen = []
    real_loss = segmodel.seg_loss

    def spy_loss(outputs, target, aux_weight, weight=None):
        seen.append((target.clone(), None if weight is None else weight.clone()))
        return real_loss(outputs, target, aux_weight, weight)

    monkeypatch.setattr(segmodel, "seg_loss", spy_loss)
    train(tiny_config(max_steps=2, confidence_weighting=True, scale_min=1.0, scale_max=1.0), pool, tmp_path / "out")
    assert len(seen) == 2
    for target, weight in seen:
        assert weight is not None and weight.shape == target.shape
        assert 0 <= weight.min() and weight.max() <= 1
        foreground = (target > 0) & (target < 255)
        assert weight[foreground].mean() > 0.7 and weight[target == 0].mean() < 0.3
