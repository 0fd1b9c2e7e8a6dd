"""The self-training loop: budgets, cross-fitting, the smoke run end to end, resume, bad values."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from syntagen_st import fit as fit_mod
from syntagen_st.cli import run_main
from syntagen_st.loop import assign_folds, round_budgets
from syntagen_st.store import save_mask

from conftest import SMOKE

# The smoke config, shrunk: 2 rounds of 6 images at 64 px, 4-step round models. Every class
# counts as reliable (min_reliability 0, max_agreement 1), so the relabel and drop paths run even
# with such weak models.
SMALL = [
    "--config", SMOKE, "--generate.height", "64", "--generate.width", "64", "--generate.steps", "2",
    "--loop.rounds", "2", "--loop.generate_total", "12", "--loop.round_steps", "4", "--train.max_steps", "4",
    "--train.crop_size", "32", "--refine.min_class_pixels", "0", "--refine.min_reliability", "0", "--refine.max_agreement", "1",
    "--refine.drop_fraction", "0.2",
    "--no-progress",
]


def test_round_budgets_add_up():
    assert round_budgets(10_000, 3, "front") == [5000, 2500, 2500]
    assert round_budgets(10, 3, "equal") == [4, 3, 3]
    assert round_budgets(7, 1, "front") == [7]
    for total, rounds in ((36, 3), (5, 5), (101, 4)):
        for split in ("front", "equal"):
            budgets = round_budgets(total, rounds, split)
            assert sum(budgets) == total and len(budgets) == rounds and min(budgets) >= 0


def test_folds_are_fixed_and_balanced():
    ids = [f"r00_{i:06d}" for i in range(1001)]
    folds = assign_folds(ids, 2, 0)
    assert folds == assign_folds(list(reversed(ids)), 2, 0)
    assert sorted(folds.values()).count(0) == 501
    assert folds != assign_folds(ids, 2, 1)
    assert sorted(assign_folds(ids[:3], 3, 0).values()) == [0, 1, 2]


def _tree(root: Path) -> dict[str, bytes]:
    skip = ("fold", "final", "wandb", "logs", "state.json", "export")
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(skip) for part in p.relative_to(root).parts)
    }


def test_smoke_loop_end_to_end_and_no_sample_is_relabelled_by_its_own_model(tmp_path, monkeypatch):
    import syntagen_st.segmodel as segmodel
    import syntagen_st.train as train_mod

    trained_on: dict[str, set[str]] = {}
    real_train, real_load, real_predict = train_mod.train, segmodel.load_model, segmodel.predict_proba

    def spy_train(cfg, data, out, *args, **kwargs):
        if not isinstance(data, (str, os.PathLike)):
            trained_on[str(Path(out) / "model.safetensors")] = {s.image.stem for s in data}
        return real_train(cfg, data, out, *args, **kwargs)

    def spy_load(path, *args, **kwargs):
        model = real_load(path, *args, **kwargs)
        model.loaded_from = str(path)
        return model

    violations = []

    def spy_predict(model, images, *args, **kwargs):
        images = list(images)
        seen = trained_on.get(getattr(model, "loaded_from", ""), set())
        violations.extend(Path(i).stem for i in images if Path(i).stem in seen)
        return real_predict(model, images, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train", spy_train)
    monkeypatch.setattr(segmodel, "load_model", spy_load)
    monkeypatch.setattr(segmodel, "predict_proba", spy_predict)

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        run_main(fit_mod.main, "fit", [*SMALL, "--out", str(out)])
    assert done.value.code == 0
    assert len(trained_on) == 4 and not violations

    state = json.loads((out / "state.json").read_text())["done"]
    assert state[-2:] == ["final2/export", "final2/train"]
    rows = [json.loads(line) for line in (out / "rounds" / "1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["mask"].startswith("rounds/1/labels/") or not r["kept"] for r in rows)
    dropped = [r for r in rows if not r["kept"]]
    assert dropped and all(r["reason"] for r in dropped)
    stats = json.loads((out / "rounds" / "0" / "stats.json").read_text())
    weights = json.loads((out / "rounds" / "0" / "weights.json").read_text())
    assert stats["weights"] == weights and abs(np.mean(list(weights.values())) - 1) < 1e-6
    # Round 1's prompts were drawn with round 0's weights.
    assert sorted(p.name for p in (out / "pool" / "images").iterdir())[-1] == "r01_000005.png"

    manifest = json.loads((out / "export" / "submission.json").read_text())
    train_list = (out / "export" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert manifest["pairs"] == len(train_list) == sum(r["kept"] for r in rows)
    checksum = (out / "final" / "checksum.txt").read_text().split()[0]
    assert manifest["model_sha256"] == checksum
    import hashlib

    assert hashlib.sha256((out / "final" / "model.safetensors").read_bytes()).hexdigest() == checksum
    # The final model trained on exactly the exported files.
    from torchvision.datasets import VOCSegmentation

    voc = VOCSegmentation(str(out / "export"), year="2012", image_set="train")
    assert len(voc) == len(train_list)


def test_kill_and_resume_gives_the_same_result(tmp_path):
    env = os.environ | {"SYNTAGEN_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "syntagen_st.fit", *SMALL, "--loop.rounds", "2"]
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill -9 in the middle of round 0's second fold model.
    while time.time() < deadline and not (killed / "rounds" / "0" / "fold1" / "train_config.yaml").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "round0/fold1" not in json.loads((killed / "state.json").read_text())["done"]
    subprocess.run([*cmd, "--out", str(killed)], check=True, env=env, capture_output=True)

    clean, resumed = _tree(tmp_path / "clean"), _tree(killed)
    assert clean.keys() == resumed.keys()
    differing = [k for k in clean if clean[k] != resumed[k] and not k.endswith("config.yaml")]
    assert not differing, differing


def _fit(*argv: str) -> None:
    with pytest.raises(SystemExit) as done:
        run_main(fit_mod.main, "fit", [*SMALL, *argv])
    assert done.value.code == 0


def test_redone_refine_and_resume_with_more_rounds(tmp_path, capsys):
    out = tmp_path / "run"
    _fit("--out", str(out))
    round1 = {p: p.read_bytes() for p in sorted((out / "rounds" / "1").rglob("*")) if p.is_file() and "fold" not in str(p)}

    # Killed after round 1's samples.jsonl was written but before the step was marked done:
    # the redo must read the labels of round 0, not its own.
    state = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({"done": state["done"][: state["done"].index("round1/refine")]}))
    _fit("--out", str(out))
    assert {p: p.read_bytes() for p in round1} == round1

    # More rounds: the new round gets the raised budget, and the export and final model follow.
    old_checksum = (out / "final" / "checksum.txt").read_text()
    assert "cannot resume" in _refused(capsys, *SMALL, "--out", str(out), "--rounds", "3", "--seed", "1", "--resume")
    _fit("--out", str(out), "--rounds", "3", "--loop.generate_total", "15", "--resume")
    assert sum(1 for r in json.loads("[" + ",".join(
        line for f in (out / "pool" / "manifest").glob("*.jsonl") for line in f.read_text().splitlines()) + "]")
        if r["round"] == 2) == 3
    train_list = (out / "export" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text()
    assert "r02_" in train_list
    assert json.loads((out / "state.json").read_text())["done"][-2:] == ["final3/export", "final3/train"]
    manifest = json.loads((out / "export" / "submission.json").read_text())
    assert manifest["model_sha256"] == (out / "final" / "checksum.txt").read_text().split()[0]
    assert (out / "final" / "checksum.txt").read_text() != old_checksum


def test_folder_source_with_a_broken_mask_stops_with_one_line(capsys, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "images" / "a.png")
    save_mask(data / "masks" / "a.png", np.full((16, 16), 38, np.uint8))
    err = _refused(capsys, *SMALL, "--out", str(tmp_path / "run"), "--source", f"folder:{data}")
    assert "a.png" in err and "outside 0..20" in err


def _refused(capsys, *argv) -> str:
    capsys.readouterr()  # earlier commands' output (e.g. fit's not-an-entry warning) is not this error
    with pytest.raises(SystemExit) as exit_info:
        run_main(fit_mod.main, "syntagen_st.fit", list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "loop.rounds must be >= 1"),
        (["--loop.max_pairs", "10001"], "competition's limit"),
        (["--loop.generate_total", "2", "--rounds", "3"], "smaller than the number of rounds"),
        (["--source", "folder:/no/such/folder"], "does not exist"),
        (["--source", "nonsense"], "must be 'sd' or 'folder:PATH'"),
    ],
)
def test_bad_values_are_refused_before_any_work(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    assert message in _refused(capsys, "--config", SMOKE, "--out", str(out), *args)
    assert not out.exists()


def test_folder_source_without_pairs_is_refused(capsys, tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    err = _refused(capsys, "--config", SMOKE, "--out", str(tmp_path / "run"),
                   "--source", f"folder:{tmp_path / 'data'}")
    assert "holds no samples" in err and not (tmp_path / "run").exists()


def test_existing_run_with_another_config_needs_resume_or_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(Path(SMOKE).read_text())
    err = _refused(capsys, "--config", SMOKE, "--out", str(out), "--seed", "3")
    assert "another config (seed: 0 -> 3)" in err and "--resume" in err and "--overwrite" in err


def test_folder_source_refines_an_existing_dataset(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(8):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 8 if i % 2 else 12
        (data / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(data / "images" / f"img{i}.png")
        save_mask(data / "masks" / f"img{i}.png", mask)
    (data / "classes.jsonl").write_text("".join(
        json.dumps({"id": f"img{i}", "classes": ["cat" if i % 2 else "dog"]}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        run_main(fit_mod.main, "fit", [*SMALL, "--rounds", "1", "--source", f"folder:{data}", "--out", str(out)])
    assert done.value.code == 0
    rows = [json.loads(line) for f in (out / "pool" / "manifest").glob("*.jsonl") for line in f.open()]
    assert sorted(r["classes"][0] for r in rows) == ["cat"] * 4 + ["dog"] * 4
    assert all(r["label_source"] == "folder" for r in rows)
    assert (out / "final" / "checksum.txt").exists()


def test_final_selection_keeps_the_best_within_max_pairs_favouring_weak_classes(tmp_path):
    from syntagen_st.config import Config
    from syntagen_st.loop import Loop, Run
    from syntagen_st.store import Pool, atomic_write_json, write_jsonl

    run = Run(tmp_path)
    pool = Pool(tmp_path / "pool")
    classes = {"r00_000000": ["cat"], "r00_000001": ["dog"], "r00_000002": ["cat"], "r00_000003": ["dog"]}
    pool.write_manifest_shard("r00_000000", [{"id": i, "round": 0, "classes": c} for i, c in classes.items()])
    scores = {"r00_000000": 0.9, "r00_000001": 0.6, "r00_000002": 0.5, "r00_000003": 0.1}
    write_jsonl(run.round_dir(0) / "samples.jsonl", [
        {"id": i, "kept": i != "r00_000003", "reason": None, "mask": f"pool/masks/{i}.png", "score": s}
        for i, s in scores.items()])
    atomic_write_json(run.round_dir(0) / "weights.json", {"cat": 0.5, "dog": 1.5})
    cfg = Config()
    cfg.loop.rounds, cfg.loop.max_pairs, cfg.train.logger = 1, 2, "none"
    chosen = [s.image.stem for s in Loop(cfg, run).selected()]
    # 0.9 x 0.5 = 0.45 and 0.6 x 1.5 = 0.9 beat 0.5 x 0.5; the dropped sample never counts.
    assert chosen == ["r00_000000", "r00_000001"]


def test_fit_evaluates_the_final_model_on_voc_val(tmp_path, make_seg_dataset, capsys):
    voc = make_seg_dataset(tmp_path / "voc", kind="voc", n=4, size=32)
    out = tmp_path / "run"
    _fit("--out", str(out), "--rounds", "1", "--loop.generate_total", "4", "--voc-root", str(voc))
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["val_images"] == 2 and "miou" in {k.lower() for k in metrics}
    assert "background" in capsys.readouterr().out
