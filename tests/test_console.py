"""What a person sees in the terminal: step titles, round summaries, and no library noise."""

import json
import re

from syntagen_st.core.config import RefineConfig
from syntagen_st.selftrain.summary import round_summary, step_title


def test_step_titles_count_rounds_and_folds_from_one():
    assert step_title("round0/data", 3, 2) == "round 1 of 3: add samples"
    assert step_title("round2/fold1", 3, 2).startswith("round 3 of 3: train fold model 2 of 2")
    assert step_title("round1/refine", 3, 2) == "round 2 of 3: predict held out, relabel, filter, steer"
    assert step_title("final3/train", 3, 2) == "final: train the fixed protocol on the export"


def test_round_summary_shows_the_gate_its_core_evidence_verdicts_drops_and_weights():
    cfg = RefineConfig(min_reliability=0.5, max_core_agreement=0.85, min_class_pixels=100)
    stats = {
        "round": 0, "samples": 10, "dropped": 1, "pixels_relabelled": 250, "pixels": 1000,
        "classes_in_pool": ["dog", "cat", "cow"], "reliable": ["background", "dog"],
        "iou_model_vs_labels": {"background": 0.9, "cat": 0.25, "dog": 0.625, "cow": 0.7, "car": None},
        "core_iou_model_vs_labels": {"background": 0.95, "cat": 0.3, "dog": 0.7, "cow": 0.9, "car": None},
        "weights": {"cat": 1.5, "dog": 0.5, "cow": 1.0, "car": 1.0},
    }
    text = round_summary(stats, {"r00_000003": "score 0.1 in the worst 10%"}, 2, cfg)
    lines = text.splitlines()
    assert lines[0] == "round 1 of 2 done: 10 samples, 250 pixels relabelled (25.00% of 1,000), 1 dropped"
    assert "[0.5, 0.85]" in lines[1] and "at least 100 core pixels" in lines[1] and "cores" in lines[1]
    assert "core IoU" in lines[2] and "all-pixel IoU" in lines[2] and "weight next round" in lines[2]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:7]}
    assert rows == {
        "background": ["0.950", "0.900", "yes"],
        "cat": ["0.300", "0.250", "below", "band", "1.50"],
        "cow": ["0.900", "0.700", "above", "band", "1.00"],
        "dog": ["0.700", "0.625", "yes", "0.50"],
    }
    assert "not in the pool yet: car 1.00" in text
    assert "dropped r00_000003: score 0.1 in the worst 10%" in text
    assert "no foreground class passes the gate" not in text
    last = round_summary(stats | {"round": 1, "reliable": ["background"]}, {}, 2, cfg)
    assert "weight in selection" in last and "no foreground class passes the gate yet" in last


def test_smoke_fit_prints_each_step_and_each_round_and_no_noise(smoke_run):
    out = smoke_run.root
    result = smoke_run
    text = result.stdout + result.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "Epoch", "v_num", "Seed set",
                  "worker processes", "logging interval", "stopped: `max_steps"):
        assert noise not in text, noise
    # The step progress bar is kept, counting optimizer steps to the end of each training.
    for name in ("smoke-round1-fold1", "smoke-round1-fold2", "smoke-round2-fold1", "smoke-round2-fold2", "smoke-final"):
        assert re.search(rf"{name}: 100%\|[^\n\r]*\| 4/4 \[", result.stderr), name
    titles = [line for line in result.stdout.splitlines() if line.startswith(("round ", "final:")) and "done" not in line]
    assert titles == [
        "round 1 of 2: add samples", "round 1 of 2: train fold model 1 of 2 (on the other folds' samples)",
        "round 1 of 2: train fold model 2 of 2 (on the other folds' samples)",
        "round 1 of 2: predict held out, relabel, filter, steer",
        "round 2 of 2: add samples", "round 2 of 2: train fold model 1 of 2 (on the other folds' samples)",
        "round 2 of 2: train fold model 2 of 2 (on the other folds' samples)",
        "round 2 of 2: predict held out, relabel, filter, steer",
        "final: select and export the dataset", "final: train the fixed protocol on the export",
    ]
    for r in range(2):
        stats = json.loads((out / "rounds" / str(r) / "stats.json").read_text())
        block = result.stdout.split(f"round {r + 1} of 2 done: ", 1)[1].split("\nround ", 1)[0].split("\nfinal:", 1)[0]
        share = 100 * stats["pixels_relabelled"] / stats["pixels"]
        assert block.startswith(f"{stats['samples']} samples, {stats['pixels_relabelled']:,} pixels relabelled ({share:.2f}% ")
        for name in stats["classes_in_pool"]:
            line = next(row for row in block.splitlines() if row.split()[0] == name)
            for column, key in ((1, "core_iou_model_vs_labels"), (2, "iou_model_vs_labels")):
                value = stats[key][name]
                assert line.split()[column] == ("-" if value is None else f"{value:.3f}"), (name, key)
            assert line.split()[-1] == f"{stats['weights'][name]:.2f}"
            assert ("yes" in line.split()) == (name in stats["reliable"])
        rows = [json.loads(line) for line in (out / "rounds" / str(r) / "samples.jsonl").read_text().splitlines()]
        dropped_now = [row for row in rows if not row["kept"] and f"dropped {row['id']}: {row['reason']}" in block]
        assert len(dropped_now) == stats["dropped"]
    assert stats["dropped"] + json.loads((out / "rounds" / "0" / "stats.json").read_text())["dropped"] > 0
