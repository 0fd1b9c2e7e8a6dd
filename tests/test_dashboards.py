"""Per-round W&B logging, read back from an offline run's files."""

import glob

import numpy as np
from conftest import wandb_history_keys

from syntagen_st.core.classes import FOREGROUND_CLASSES, VOC_CLASSES
from syntagen_st.core.config import Config
from syntagen_st.core.layout import RunLayout
from syntagen_st.core.store import save_image
from syntagen_st.selftrain.dashboard import RoundLogger


def test_round_logger_writes_per_class_tables_and_overlays(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = Config()
    cfg.train.logger = "wandb"
    image = tmp_path / "r00_000000.png"
    save_image(image, np.zeros((16, 16, 3), np.uint8))
    label = np.zeros((16, 16), np.uint8)
    label[4:8, 4:8] = 8
    stats = {
        "samples": 3, "dropped": 1, "pixels_relabelled": 12, "reliable": ["cat"],
        "iou_model_vs_labels": {c: (0.5 if c == "cat" else None) for c in VOC_CLASSES},
        "core_iou_model_vs_labels": {c: (0.7 if c == "cat" else None) for c in VOC_CLASSES},
        "weakness": {c: 0.4 for c in VOC_CLASSES},
        "weights": {c: 1.0 for c in FOREGROUND_CLASSES},
    }
    logger = RoundLogger(cfg, RunLayout(tmp_path / "run"))
    logger.log_round(0, stats, [(image, label, label, label)])
    logger.finish()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    expected = {"round", "round/dropped", "round/pixels_relabelled", "round/miou_model_vs_labels", "round/classes/_type",
                "round/weights_table/_type", "round/iou_table/_type", "round/core_iou_table/_type", "round/overlays/all_masks"}
    assert expected <= wandb_history_keys(runs[0], expected)


def test_round_logger_is_silent_without_wandb(tmp_path):
    cfg = Config()
    cfg.train.logger = "csv"
    logger = RoundLogger(cfg, RunLayout(tmp_path))
    logger.log_round(0, {}, [])
    logger.finish()
    assert not list(tmp_path.iterdir())


def test_round_logger_numbers_rounds_from_one_like_the_terminal(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(RoundLogger, "_experiment", lambda self: type("Run", (), {"log": lambda _, d: logged.append(d)})())
    stats = {
        "samples": 3, "dropped": 1, "pixels_relabelled": 12, "reliable": ["cat"],
        "iou_model_vs_labels": {c: 0.5 for c in VOC_CLASSES}, "core_iou_model_vs_labels": {c: 0.7 for c in VOC_CLASSES},
        "weakness": {c: 0.4 for c in VOC_CLASSES}, "weights": {c: 1.0 for c in FOREGROUND_CLASSES},
    }
    RoundLogger(Config(), RunLayout(tmp_path)).log_round(0, stats, [])  # rounds/0 on disk
    [entry] = logged
    assert entry["round"] == 1
    titles = {key: entry[key].spec.string_fields["title"] for key in ("round/weights", "round/iou", "round/core_iou")}
    assert titles == {"round/weights": "prompt weights after round 1", "round/iou": "model vs labels, round 1",
                      "round/core_iou": "model vs label cores (the gate's evidence), round 1"}
