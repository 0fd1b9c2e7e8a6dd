"""What a person sees in the terminal: step titles, round summaries, and no library noise."""

import json
import subprocess
import sys

from conftest import SMOKE

from syntagen_st.selftrain.summary import round_summary, step_title


def test_step_titles_count_rounds_and_folds_from_one():
    assert step_title("round0/data", 3, 2) == "round 1/3: add samples"
    assert step_title("round2/fold1", 3, 2).startswith("round 3/3: train fold model 2/2")
    assert step_title("round1/refine", 3, 2) == "round 2/3: predict held out, relabel, filter, steer"
    assert step_title("final3/train", 3, 2) == "final: train the fixed protocol on the export"


def test_round_summary_shows_the_pool_classes_the_gate_relabels_drops_and_weights():
    stats = {
        "round": 0, "samples": 10, "dropped": 1, "pixels_relabelled": 250, "pixels": 1000,
        "classes_in_pool": ["dog", "cat"], "reliable": ["background", "dog"],
        "iou_model_vs_labels": {"background": 0.9, "cat": 0.25, "dog": 0.625, "car": None},
        "weights": {"cat": 1.5, "dog": 0.5, "car": 1.0},
    }
    text = round_summary(stats, {"r00_000003": "score 0.1 in the worst 10%"}, rounds=2)
    lines = text.splitlines()
    assert lines[0] == "round 1/2 done: 10 samples, 250 pixels relabelled (25.00% of 1,000), 1 dropped"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert rows == {"background": ["0.900", "yes"], "cat": ["0.250", "1.50"], "dog": ["0.625", "yes", "0.50"]}
    assert "not in the pool yet: car 1.00" in text
    assert "dropped r00_000003: score 0.1 in the worst 10%" in text
    assert "weight next round" in lines[1]
    assert "no foreground class is reliable" not in text
    last = round_summary(stats | {"round": 1, "reliable": ["background"]}, {}, rounds=2)
    assert "weight in selection" in last and "no foreground class is reliable yet" in last


def test_smoke_fit_prints_each_step_and_each_round_and_no_noise(tmp_path):
    out = tmp_path / "run"
    args = [
        "--config", SMOKE, "--generate.height", "64", "--generate.width", "64", "--generate.steps", "2",
        "--loop.rounds", "2", "--loop.generate_total", "12", "--loop.round_steps", "4", "--train.max_steps", "4",
        "--train.crop_size", "32", "--train.num_workers", "8", "--refine.min_class_pixels", "0",
        "--refine.min_reliability", "0", "--refine.max_core_agreement", "1", "--refine.drop_fraction", "0.2",
    ]
    result = subprocess.run([sys.executable, "-m", "syntagen_st.fit", *args, "--out", str(out)],
                            capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "Epoch", "v_num", "Seed set",
                  "worker processes", "logging interval", "stopped: `max_steps"):
        assert noise not in text, noise
    assert "smoke-r0-fold0" in result.stderr and "step" in result.stderr  # the step progress bar is kept
    titles = [line for line in result.stdout.splitlines() if line.startswith(("round ", "final:")) and "done" not in line]
    assert titles == [
        "round 1/2: add samples", "round 1/2: train fold model 1/2 (on the other folds' samples)",
        "round 1/2: train fold model 2/2 (on the other folds' samples)", "round 1/2: predict held out, relabel, filter, steer",
        "round 2/2: add samples", "round 2/2: train fold model 1/2 (on the other folds' samples)",
        "round 2/2: train fold model 2/2 (on the other folds' samples)", "round 2/2: predict held out, relabel, filter, steer",
        "final: select and export the dataset", "final: train the fixed protocol on the export",
    ]
    for r in range(2):
        stats = json.loads((out / "rounds" / str(r) / "stats.json").read_text())
        block = result.stdout.split(f"round {r + 1}/2 done: ", 1)[1].split("\nround ", 1)[0].split("\nfinal:", 1)[0]
        share = 100 * stats["pixels_relabelled"] / stats["pixels"]
        assert block.startswith(f"{stats['samples']} samples, {stats['pixels_relabelled']:,} pixels relabelled ({share:.2f}% ")
        for name in stats["classes_in_pool"]:
            line = next(row for row in block.splitlines() if row.split()[0] == name)
            value = stats["iou_model_vs_labels"][name]
            assert line.split()[1] == ("-" if value is None else f"{value:.3f}")
            assert line.split()[-1] == f"{stats['weights'][name]:.2f}"
            assert ("yes" in line.split()) == (name in stats["reliable"])
        rows = [json.loads(line) for line in (out / "rounds" / str(r) / "samples.jsonl").read_text().splitlines()]
        dropped_now = [row for row in rows if not row["kept"] and f"dropped {row['id']}: {row['reason']}" in block]
        assert len(dropped_now) == stats["dropped"]
    assert stats["dropped"] + json.loads((out / "rounds" / "0" / "stats.json").read_text())["dropped"] > 0
