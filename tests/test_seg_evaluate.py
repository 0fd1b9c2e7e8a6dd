"""Evaluation: IoU against an independent numpy confusion matrix, the CLI, and bad input."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import numpy_iou, run_cli
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from syntagen_st import evaluate as evaluate_cli
from syntagen_st.core.classes import VOC_CLASSES
from syntagen_st.core.store import load_mask, save_mask
from syntagen_st.segmentation.data import MEAN, STD, find_voc_samples
from syntagen_st.segmentation.evaluate import evaluate
from syntagen_st.segmentation.metrics import iou_from_confusion, mean_iou
from syntagen_st.segmentation.network import build_segmenter, predict_proba, save_weights


def colour_rule(rgb: np.ndarray) -> np.ndarray:
    """Red -> aeroplane; blue, or bright background -> person (errors on purpose); green (cat) missed."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    pred = np.zeros(r.shape, dtype=np.int64)
    pred[(b > 0.7) | ((r + g + b) / 3 > 0.53)] = 15
    pred[(r > 0.7) & (g < 0.3)] = 1
    return pred


class ColourModel(torch.nn.Module):
    """A 'segmenter' whose answer is known without running a network."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rgb = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).permute(0, 2, 3, 1)
        pred = torch.from_numpy(colour_rule(rgb.numpy()))
        return {"out": torch.nn.functional.one_hot(pred, 21).permute(0, 3, 1, 2).float()}


def test_evaluate_matches_numpy_confusion_matrix(tmp_path, make_seg_dataset):
    root = make_seg_dataset(tmp_path / "voc", "voc", n=12, seed=3)
    samples = find_voc_samples(root, "val")
    metrics = evaluate(ColourModel(), samples)
    images = [np.asarray(Image.open(s.image).convert("RGB"), dtype=np.float64) / 255 for s in samples]
    truths = [load_mask(s.mask) for s in samples]
    expected = numpy_iou([colour_rule(im) for im in images], truths)
    got = np.array([np.nan if v is None else v for v in metrics["per_class_iou"].values()])
    assert np.allclose(got, expected, equal_nan=True)
    assert metrics["per_class_iou"]["cat"] == 0.0  # present, never predicted: 0
    assert metrics["per_class_iou"]["dog"] is None  # absent from truth and prediction: NaN, not 0
    assert 0 < metrics["per_class_iou"]["person"] < 1
    assert metrics["mIoU"] == pytest.approx(np.nanmean(expected))
    assert metrics["pixels"] == sum(int((t != 255).sum()) for t in truths)


def test_iou_agrees_with_torchmetrics_jaccard():
    pred = torch.randint(0, 6, (3, 20, 20))
    target = torch.randint(0, 7, (3, 20, 20))
    target[0, :5] = 255
    jaccard = MulticlassJaccardIndex(21, average=None, ignore_index=255, zero_division=math.nan)(pred, target)
    from syntagen_st.segmentation.metrics import confusion_metric

    ours = iou_from_confusion(confusion_metric()(pred, target))
    assert torch.allclose(ours.float(), jaccard.float(), equal_nan=True)
    assert mean_iou(ours) == pytest.approx(float(torch.nanmean(jaccard)))


def test_evaluate_cli_prints_table_and_writes_metrics(tmp_path, make_seg_dataset, capsys):
    root = make_seg_dataset(tmp_path / "voc", "voc", n=6, seed=1)
    model = build_segmenter("lraspp_mobilenet_v3_large").eval()
    # A random head's class scores nearly tie over the whole image, and a rounding difference (thread
    # count, kernel choice) would flip every pixel at once: make its decisions clear.
    with torch.no_grad():
        for conv in (model.classifier.low_classifier, model.classifier.high_classifier):
            conv.weight.mul_(1000.0)
            conv.bias.copy_(torch.linspace(0, 1, conv.bias.numel()))
    out_dir = tmp_path / "trained"
    save_weights(model, out_dir / "model.safetensors", "lraspp_mobilenet_v3_large")
    code, out, _ = run_cli(evaluate_cli.main, [str(out_dir), "--voc-root", str(root / "VOCdevkit"), "--train.num_workers", "0"], capsys)
    assert code == 0
    rows = out.splitlines()
    assert [r.split()[0] for r in rows[1:23]] == [*VOC_CLASSES, "mIoU"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    samples = find_voc_samples(root, "val")
    # batch 1, as evaluate predicts
    preds = [p.argmax(0) for p in predict_proba(model, [s.image for s in samples], batch_size=1)]
    expected = numpy_iou(preds, [load_mask(s.mask) for s in samples])
    got = np.array([np.nan if v is None else v for v in metrics["per_class_iou"].values()])
    assert np.allclose(got, expected, equal_nan=True)
    assert metrics["images"] == 3 and len(metrics["weights_sha256"]) == 64


@pytest.mark.parametrize("damage", ["values", "size", "image", "no_root", "no_val", "no_model", "both_sources"])
def test_evaluate_bad_input_is_one_line_exit_2(tmp_path, make_seg_dataset, capsys, damage):
    root = make_seg_dataset(tmp_path / "voc", "voc", n=4)
    voc = root / "VOCdevkit" / "VOC2012"
    weights = tmp_path / "model.safetensors"
    save_weights(build_segmenter("lraspp_mobilenet_v3_large"), weights, "lraspp_mobilenet_v3_large")
    argv = [str(weights), "--voc-root", str(root), "--train.num_workers", "0"]
    expect = {
        "values": "s0002.png: mask values [99]", "size": "s0002.png: mask is 64x10", "image": "s0003.jpg: unreadable image",
        "no_root": "nowhere: no such folder", "no_val": "val.txt: missing split file", "no_model": "absent.safetensors",
        "both_sources": "exactly one of --voc-root",
    }[damage]
    if damage == "values":
        mask = np.zeros((64, 64), np.uint8)
        mask[3, 3] = 99
        save_mask(voc / "SegmentationClass" / "s0002.png", mask)
    elif damage == "size":
        save_mask(voc / "SegmentationClass" / "s0002.png", np.zeros((10, 64), np.uint8))
    elif damage == "image":
        (voc / "JPEGImages" / "s0003.jpg").write_bytes(b"\xff\xd8\xff garbage")
    elif damage == "no_root":
        argv[2] = str(tmp_path / "nowhere")
    elif damage == "no_val":
        (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    elif damage == "no_model":
        argv[0] = str(tmp_path / "absent.safetensors")
    elif damage == "both_sources":
        argv += ["--data", str(root)]
    code, _, err = run_cli(evaluate_cli.main, argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expect in err, err
    assert err.startswith("syntagen_st.evaluate: error:")


@pytest.mark.slow
def test_module_entry_point_runs(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "syntagen_st.evaluate", str(tmp_path / "x"), "--data", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "error:" in result.stderr
