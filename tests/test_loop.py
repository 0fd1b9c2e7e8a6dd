"""The self-training loop: budgets, cross-fitting, the smoke run end to end, resume, bad values."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, SMOKE, bleeding_square, run_cli, run_tree
from PIL import Image

from syntagen_st import fit as fit_mod
from syntagen_st import reproduce as reproduce_mod
from syntagen_st.core.cli import load_config_file
from syntagen_st.core.store import load_mask, save_mask
from syntagen_st.selftrain import refine as refine_mod
from syntagen_st.selftrain.pool import assign_folds, round_budgets


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


@pytest.mark.slow
def test_smoke_loop_end_to_end_and_no_sample_is_relabelled_by_its_own_model(tmp_path, monkeypatch):
    import syntagen_st.segmentation.network as network
    import syntagen_st.selftrain.steps as steps

    trained_on: dict[str, set[str]] = {}
    real_train, real_load, real_predict = steps.train, network.load_model, network.predict_proba

    def spy_train(cfg, data, out, *args, **kwargs):
        if not isinstance(data, (str, os.PathLike)):
            trained_on[str(Path(out) / "model.safetensors")] = {s.image.stem for s in data}
        return real_train(cfg, data, out, *args, **kwargs)

    def spy_load(path, *args, **kwargs):
        model = real_load(path, *args, **kwargs)
        model.loaded_from = str(path)
        return model

    calls: list[tuple[str, list[str]]] = []

    def spy_predict(model, images, *args, **kwargs):
        images = list(images)
        calls.append((getattr(model, "loaded_from", "?"), [Path(i).stem for i in images]))
        return real_predict(model, images, *args, **kwargs)

    evidence_labels: list[bytes] = []
    real_evidence = refine_mod.class_evidence

    def spy_evidence(label, *args, **kwargs):
        evidence_labels.append(label.tobytes())
        return real_evidence(label, *args, **kwargs)

    blind_given: list[tuple[str, object]] = []
    real_relabel, real_score = refine_mod.relabel, refine_mod.sample_score

    def spy_relabel(*args, **kwargs):
        blind_given.append(("relabel", args[7]))
        return real_relabel(*args, **kwargs)

    def spy_score(*args, **kwargs):
        blind_given.append(("score", args[5]))
        return real_score(*args, **kwargs)

    monkeypatch.setattr(steps, "train", spy_train)
    monkeypatch.setattr(network, "load_model", spy_load)
    monkeypatch.setattr(network, "predict_proba", spy_predict)
    monkeypatch.setattr(refine_mod, "class_evidence", spy_evidence)
    monkeypatch.setattr(refine_mod, "relabel", spy_relabel)
    monkeypatch.setattr(refine_mod, "sample_score", spy_score)

    out = tmp_path / "run"
    # relabel_confidence 0: even these weak models rewrite labels, so a refined label differs from its original.
    assert run_cli(fit_mod.main, [*SMALL, "--refine.relabel_confidence", "0", "--out", out])[0] == 0
    folds = {model for model in trained_on if f"{os.sep}rounds{os.sep}" in model}
    assert len(folds) == 4 and len(trained_on) == 5  # and the final model
    # The blind-model rules are on by default: relabel and the scores get the round's blind classes.
    kinds = {kind for kind, _ in blind_given}
    assert kinds == {"relabel", "score"} and all(isinstance(b, np.ndarray) and b.shape == (21,) for _, b in blind_given)
    # Every prediction came from a fold model, and none of them had trained on what it predicted.
    for model, ids in calls:
        assert model in folds, (model, sorted(trained_on))
        assert not set(ids) & trained_on[model], (model, set(ids) & trained_on[model])
    # Each round predicts in two passes (reliability, then relabelling), each sample once per pass.
    for r in range(2):
        rows = [json.loads(line) for line in (out / "rounds" / str(r) / "samples.jsonl").read_text().splitlines()]
        active = sorted(row["id"] for row in rows if row["mask"].startswith(f"rounds/{r}/labels/"))
        of_round = [ids for model, ids in calls if f"{os.sep}rounds{os.sep}{r}{os.sep}" in model]
        passes = [sum(of_round[:len(of_round) // 2], []), sum(of_round[len(of_round) // 2:], [])]
        assert active and all(sorted(p) == active for p in passes), (active, passes)

    # The gate is measured against the original attention labels, never against refined ones
    # (a model's own output would vouch for it); and a sample is relabelled once, in the first
    # round that judged it: later rounds keep its label.
    originals = {load_mask(p).tobytes() for p in (out / "pool" / "masks").iterdir()}
    assert evidence_labels and set(evidence_labels) <= originals
    first = {row["id"]: row for row in map(json.loads, (out / "rounds" / "0" / "samples.jsonl").read_text().splitlines())}
    judged = [i for i, row in first.items() if row.get("judged") and row["kept"]]
    assert judged and any(load_mask(out / first[i]["mask"]).tobytes() not in originals for i in judged)
    for i in judged:
        assert np.array_equal(load_mask(out / "rounds" / "1" / "labels" / f"{i}.png"), load_mask(out / first[i]["mask"])), i

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
    # submission.json holds the sha256 of every entry file (itself and the card aside; the VOC tree
    # links to the same files), each one right.
    exported = {str(p.relative_to(out / "export")) for p in (out / "export").rglob("*")
                if p.is_file() and p.relative_to(out / "export").parts[0] != "VOCdevkit"}
    assert exported - {"submission.json", "README.md"} <= set(manifest["files"])
    assert len(manifest["files"]) >= 2 * manifest["pairs"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / "export" / name).read_bytes()).hexdigest() == digest, name
    checksum = (out / "final" / "checksum.txt").read_text().split()[0]
    assert manifest["model_sha256"] == checksum
    assert hashlib.sha256((out / "final" / "model.safetensors").read_bytes()).hexdigest() == checksum
    # The final model trained on exactly the exported files.
    from torchvision.datasets import VOCSegmentation

    voc = VOCSegmentation(str(out / "export"), year="2012", image_set="train")
    assert len(voc) == len(train_list)


def _kill_when(cmd: list[str], out: Path, ready) -> None:
    """Start the run and kill -9 it as soon as ``ready()`` holds."""
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_result(tmp_path):
    # The final training checkpoints every 3 of its 15 steps, so a kill there resumes through Lightning.
    cmd = [sys.executable, "-m", "syntagen_st.fit", *SMALL, "--train.max_steps", "15", "--train.checkpoint_every", "3"]
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], check=True, capture_output=True)

    killed = tmp_path / "killed"
    done = lambda: json.loads((killed / "state.json").read_text())["done"]  # noqa: E731
    # Kill -9 in the middle of round 0's second fold model, then during the final training.
    _kill_when(cmd, killed, lambda: (killed / "rounds" / "0" / "fold1" / "train_config.yaml").exists())
    assert "round0/fold1" not in done()
    _kill_when(cmd, killed, lambda: (killed / "final" / "checkpoints" / "last.ckpt").exists())
    assert "final2/export" in done() and "final2/train" not in done()
    subprocess.run([*cmd, "--out", str(killed)], check=True, capture_output=True)

    clean, resumed = run_tree(tmp_path / "clean"), run_tree(killed)
    assert clean.keys() == resumed.keys()
    assert {"export/submission.json", "final/model.safetensors", "final/checksum.txt"} <= clean.keys()
    # What a kill during the final training keeps: the export, byte for byte. What it does not:
    # the final model's bytes. Lightning resumes from the last checkpoint's weights, optimiser and
    # step, but the interrupted epoch's data order and augmentations are drawn again, so the
    # resumed model (and its checksum) differs; submission.json and the card record the new one.
    model_files = {"final/model.safetensors", "final/checksum.txt", "export/submission.json", "export/README.md"}
    differing = [k for k in clean if clean[k] != resumed[k] and not k.endswith("config.yaml")]
    assert not set(differing) - model_files, differing
    before, after = (json.loads(tree["export/submission.json"]) for tree in (clean, resumed))
    checksum = resumed["final/checksum.txt"].decode().split()[0]
    assert after["model_sha256"] == checksum == hashlib.sha256(resumed["final/model.safetensors"]).hexdigest()
    assert {**before, "model_sha256": None} == {**after, "model_sha256": None}
    card = resumed["export/README.md"].decode().replace(checksum, before["model_sha256"])
    assert card == clean["export/README.md"].decode()
def _fit(*argv: str) -> None:
    assert run_cli(fit_mod.main, [*SMALL, *argv], prog="fit")[0] == 0


@pytest.mark.slow
def test_redone_refine_and_resume_with_more_rounds(tmp_path, capsys):
    out = tmp_path / "run"
    # 'equal' shares: 2 rounds of 6 images, which a 3-round run of 18 begins with too.
    _fit("--out", str(out), "--loop.budget_split", "equal")
    round1 = {p: p.read_bytes() for p in sorted((out / "rounds" / "1").rglob("*")) if p.is_file() and "fold" not in str(p)}

    # Killed after round 1's samples.jsonl was written but before the step was marked done:
    # the redo must read the labels of round 0, not its own.
    state = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({"done": state["done"][: state["done"].index("round1/refine")]}))
    _fit("--out", str(out), "--loop.budget_split", "equal")
    assert {p: p.read_bytes() for p in round1} == round1

    # A change the begun rounds depend on is refused, naming the keys: another seed, fewer rounds,
    # or a budget a run from scratch would share out otherwise (the entry could not be reproduced).
    equal = ("--loop.budget_split", "equal")
    for argv, why in ((["--rounds", "3", "--seed", "1"], "seed: 0 -> 1"), (["--rounds", "1"], "loop.rounds: 2 -> 1"),
                      (["--rounds", "3", "--loop.generate_total", "15"], "round 1 generates 5 images with them, not 6")):
        assert why in _refused(capsys, *SMALL, *equal, "--out", str(out), *argv, "--resume")

    # More rounds where the begun ones stay the same: the new round gets its share, and the export,
    # the final model, submission.json, the card and the report all follow the new config.
    old_checksum = (out / "final" / "checksum.txt").read_text()
    _fit("--out", str(out), *equal, "--rounds", "3", "--loop.generate_total", "18", "--resume")
    assert sum(1 for r in json.loads("[" + ",".join(
        line for f in (out / "pool" / "manifest").glob("*.jsonl") for line in f.read_text().splitlines()) + "]")
        if r["round"] == 2) == 6
    train_list = (out / "export" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text()
    assert "r02_" in train_list
    assert json.loads((out / "state.json").read_text())["done"][-2:] == ["final3/export", "final3/train"]
    manifest = json.loads((out / "export" / "submission.json").read_text())
    assert manifest["model_sha256"] == (out / "final" / "checksum.txt").read_text().split()[0]
    assert manifest["config"]["loop"]["rounds"] == 3 and manifest["config"]["loop"]["generate_total"] == 18
    assert "3 rounds, 18 images generated" in (out / "export" / "README.md").read_text()
    assert "3 of 3 rounds" in (out / "report" / "index.html").read_text()
    assert (out / "final" / "checksum.txt").read_text() != old_checksum

    # The entry is what its config makes from scratch.
    code, stdout, err = run_cli(reproduce_mod.main, [out / "export", "--full", "--into", tmp_path / "again"], capsys)
    assert code == 0, stdout + err
    assert re.search(r"ids: (\d+) and \1: same", stdout) and "final model sha256: same" in stdout


def test_folder_source_with_a_broken_mask_stops_with_one_line(capsys, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "images" / "a.png")
    save_mask(data / "masks" / "a.png", np.full((16, 16), 38, np.uint8))
    err = _refused(capsys, *SMALL, "--out", str(tmp_path / "run"), "--source", f"folder:{data}")
    assert "a.png" in err and "outside 0..20" in err


def _refused(capsys, *argv) -> str:
    code, _, err = run_cli(fit_mod.main, argv, capsys)  # earlier commands' output is not this error
    assert code == 2
    err = err.strip()
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
    (out / "config.yaml").write_text(load_config_file(SMOKE).to_yaml())  # as fit saves it: every key
    err = _refused(capsys, "--config", SMOKE, "--out", str(out), "--seed", "3")
    # A seed change cannot continue the run: --resume is not offered.
    assert "another config (seed: 0 -> 3)" in err and "--resume" not in err and "--overwrite" in err
    err = _refused(capsys, "--config", SMOKE, "--out", str(out), "--loop.max_pairs", "5")
    assert "another config (loop.max_pairs: 10000 -> 5)" in err and "--resume" in err and "--overwrite" in err


@pytest.mark.slow
def test_folder_source_refines_an_existing_dataset(tmp_path):
    """Labels change exactly where a held-out model of a reliable class is confident (it writes
    its class) or where it doubts a label it is not sure of (255), and nowhere else. The model's
    view is its flip-averaged softmax times the label prior, snapped to the image (the defaults,
    ``refine.flip_tta`` and ``refine.relabel_image``); the gate reads the model alone."""
    from syntagen_st.core.classes import VOC_CLASSES, class_index
    from syntagen_st.core.config import Config
    from syntagen_st.core.store import load_mask
    from syntagen_st.segmentation.network import load_model, predict_proba
    from syntagen_st.selftrain import refine as rf
    from syntagen_st.selftrain.combine import guided_view, relabel_filter

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(8):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 8 if i % 2 else 12
        image[8:24, 8:24] = (200, 60, 60) if i % 2 else (60, 60, 200)
        (data / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(data / "images" / f"img{i}.png")
        save_mask(data / "masks" / f"img{i}.png", mask)
    (data / "classes.jsonl").write_text("".join(
        json.dumps({"id": f"img{i}", "classes": ["cat" if i % 2 else "dog"]}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    relabel_at, keep_at = 0.6, 0.3
    # Round models long enough to learn the colours: a 4-step model predicts one class everywhere.
    _fit("--rounds", "1", "--source", f"folder:{data}", "--out", str(out), "--loop.round_steps", "40", "--train.lr", "0.05",
         "--refine.relabel_confidence", str(relabel_at), "--refine.keep_confidence", str(keep_at))
    rows = {r["id"]: r for f in (out / "pool" / "manifest").glob("*.jsonl") for r in map(json.loads, f.open())}
    assert sorted(r["classes"][0] for r in rows.values()) == ["cat"] * 4 + ["dog"] * 4
    assert all(r["label_source"] == "folder" for r in rows.values())

    stats = json.loads((out / "rounds" / "0" / "stats.json").read_text())
    reliable = np.array([name in stats["reliable"] for name in VOC_CLASSES])
    ids = sorted(rows)
    fold = assign_folds(ids, 2, 0)
    defaults = Config().refine
    changed_total = confident_total = 0
    for k in range(2):
        model = load_model(out / "rounds" / "0" / f"fold{k}" / "model.safetensors")
        group = [i for i in ids if fold[i] == k]
        probs = predict_proba(model, [out / "pool" / "images" / f"{i}.png" for i in group], batch_size=4, flip=True)
        for sid, p in zip(group, probs):
            label = load_mask(out / "pool" / "masks" / f"{sid}.png")
            refined = load_mask(out / "rounds" / "0" / "labels" / f"{sid}.png")
            image = np.asarray(Image.open(out / "pool" / "images" / f"{sid}.png").convert("RGB"))
            view = guided_view(rf.restricted(p, [class_index(c) for c in rows[sid]["classes"]]), label, image,
                               defaults.relabel_prior, relabel_filter(defaults, Config().label))
            p, pred, top = view.probs, view.pred, view.top
            p_label = np.take_along_axis(p, label.astype(np.intp)[None], 0)[0]
            confident = reliable[pred] & (top >= relabel_at) & reliable[label]
            doubted = ~confident & reliable[label] & reliable[pred] & (pred != label) & (p_label < keep_at)
            expected = np.where(confident, pred, np.where(doubted, 255, label))
            assert np.array_equal(refined, expected), sid
            changed_total += int((refined != label).sum())
            confident_total += int(confident.sum())
    assert reliable.any() and changed_total > 0 and confident_total > changed_total
    assert stats["pixels_relabelled"] == changed_total
    checksum = (out / "final" / "checksum.txt").read_text().split()[0]
    assert checksum == hashlib.sha256((out / "final" / "model.safetensors").read_bytes()).hexdigest()


def test_import_folder_without_a_class_list_takes_the_classes_its_masks_hold(tmp_path, caplog):
    from syntagen_st.core.store import Pool, load_mask
    from syntagen_st.selftrain.pool import import_folder

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, values in enumerate([(8, 12), (15,), ()]):
        mask = np.zeros((16, 16), np.uint8)
        for j, v in enumerate(values):
            mask[j * 4 : j * 4 + 3] = v
        mask[-1] = 255
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / "images" / f"p{i}.png")
        save_mask(data / "masks" / f"p{i}.png", mask)
    # Degenerate pictures are skipped and counted: one pixel (it broke the training's rescale), one flat colour.
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(data / "images" / "q1.png")
    save_mask(data / "masks" / "q1.png", np.zeros((1, 1), np.uint8))
    Image.fromarray(np.full((16, 16, 3), (200, 30, 30), np.uint8)).save(data / "images" / "q2.png")
    save_mask(data / "masks" / "q2.png", np.zeros((16, 16), np.uint8))
    pool = Pool(tmp_path / "pool")
    with caplog.at_level("WARNING", logger="syntagen_st"):
        assert import_folder(str(data), pool) == 3
    assert "skipped 2 degenerate images (under 16 px a side, or one flat colour): q1.png, q2.png" in caplog.text
    rows = sorted(pool.rows(), key=lambda r: r["id"])
    assert [r["classes"] for r in rows] == [["cat", "dog"], ["person"], []]
    assert [Path(r["source"]).name for r in rows] == ["p0.png", "p1.png", "p2.png"]
    assert np.array_equal(load_mask(pool.mask_path("r00_000001")), load_mask(data / "masks" / "p1.png"))
    assert import_folder(str(data), pool) == 0  # a resumed import copies nothing twice


def test_import_folder_snaps_its_labels_to_the_images_edges(tmp_path):
    import dataclasses

    from syntagen_st.core.config import LabelConfig
    from syntagen_st.core.store import Pool, load_mask
    from syntagen_st.selftrain.pool import import_folder

    data, image, blob = bleeding_square(tmp_path / "data")
    on, off = Pool(tmp_path / "on"), Pool(tmp_path / "off")
    import_folder(str(data), on, LabelConfig())
    import_folder(str(data), off, dataclasses.replace(LabelConfig(), refine_image=False))
    assert np.array_equal(load_mask(off.mask_path("r00_000000")), blob)
    truth = image[..., 0] == 210
    refined = load_mask(on.mask_path("r00_000000"))
    assert ((blob == 8) != truth).mean() > 0.03
    assert ((refined == 8) != truth).mean() < 0.01


def test_corrupt_state_file_is_one_line(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(load_config_file(SMOKE).to_yaml())  # as fit saves it: every key
    (out / "state.json").write_text('{"done": ["round0/da')
    err = _refused(capsys, "--config", SMOKE, "--out", str(out))
    assert "state.json" in err and "--overwrite" in err


def test_overwrite_replaces_an_existing_run(monkeypatch, capsys, tmp_path):
    def fake_run(job, after_round=None) -> None:
        (job.run.root / "final").mkdir()
        (job.run.root / "final" / "checksum.txt").write_text("abc  model.safetensors\n")

    import syntagen_st.selftrain.loop as loop
    import syntagen_st.submission.export as export

    monkeypatch.setattr(loop, "run_loop", fake_run)
    monkeypatch.setattr(export, "read_submission", lambda export: {"valid_entry": True})
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(load_config_file(SMOKE).to_yaml())  # as fit saves it: every key
    (out / "stale.txt").write_text("from the old run")
    code, printed, _ = run_cli(fit_mod.main, ["--config", SMOKE, "--out", out, "--seed", "3", "--overwrite"], capsys)
    assert code == 0 and "model sha256 abc" in printed
    assert not (out / "stale.txt").exists() and "seed: 3" in (out / "config.yaml").read_text()
    # A folder that is no run is replaced only on request.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not a syntagen_st run" in _refused(capsys, "--config", SMOKE, "--out", str(other))
    run_cli(fit_mod.main, ["--config", SMOKE, "--out", other, "--overwrite"])
    assert not (other / "notes.txt").exists() and (other / "config.yaml").exists()


def test_final_selection_keeps_the_best_within_max_pairs_favouring_weak_classes(tmp_path):
    from syntagen_st.core.config import Config
    from syntagen_st.core.layout import RunLayout
    from syntagen_st.core.store import Pool, atomic_write_json, write_jsonl
    from syntagen_st.selftrain.selection import selected

    run = RunLayout(tmp_path)
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
    chosen = [s.image.stem for s in selected(run, cfg)]
    # 0.9 x 0.5 = 0.45 and 0.6 x 1.5 = 0.9 beat 0.5 x 0.5; the dropped sample never counts.
    assert chosen == ["r00_000000", "r00_000001"]


@pytest.mark.slow
def test_fit_evaluates_the_final_model_on_voc_val(tmp_path, make_seg_dataset, capsys):
    from conftest import numpy_confusion, numpy_iou

    from syntagen_st.core.classes import VOC_CLASSES
    from syntagen_st.core.store import load_mask
    from syntagen_st.segmentation.data import find_voc_samples
    from syntagen_st.segmentation.network import load_model, predict_proba

    voc = make_seg_dataset(tmp_path / "voc", kind="voc", n=4, size=32)
    out = tmp_path / "run"
    _fit("--out", str(out), "--rounds", "1", "--loop.generate_total", "4", "--voc-root", str(voc))
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    # The same numbers from the saved final model, predicted and counted independently.
    samples = find_voc_samples(voc, "val")
    model = load_model(out / "final" / "model.safetensors")
    preds = [p.argmax(0).astype(np.uint8) for p in predict_proba(model, [s.image for s in samples], batch_size=1)]
    truths = [load_mask(s.mask) for s in samples]
    assert metrics["val_images"] == 2 and metrics["pixels"] == sum(int((t != 255).sum()) for t in truths)
    assert np.array_equal(metrics["confusion_matrix"], numpy_confusion(preds, truths))
    expected = numpy_iou(preds, truths)
    got = np.array([np.nan if metrics["per_class_iou"][c] is None else metrics["per_class_iou"][c] for c in VOC_CLASSES])
    assert np.allclose(got, expected, equal_nan=True) and metrics["mIoU"] == pytest.approx(np.nanmean(expected))
    printed = capsys.readouterr().out
    assert f"{100 * metrics['mIoU']:.2f}" in printed.split("mIoU")[-1]


def test_fold_checkpoints_are_pruned_only_once_their_round_is_refined(tmp_path):
    from syntagen_st.core.layout import RunLayout
    from syntagen_st.selftrain.runner import RunState
    from syntagen_st.selftrain.steps import prune_fold_checkpoints

    run = RunLayout(tmp_path)
    for r in (0, 1):
        for k in (0, 1):
            fold = run.fold(r, k)
            fold.checkpoints.mkdir(parents=True)
            fold.last_checkpoint.write_bytes(b"ckpt")
            fold.weights.write_bytes(b"weights")
    state = RunState(run)
    for step in ("round0/data", "round0/fold0", "round0/fold1", "round0/refine", "round1/data", "round1/fold0"):
        state.mark_done(step)
    prune_fold_checkpoints(run, 1, 2)  # round 1 not refined: a redo of its refine reads its folds
    prune_fold_checkpoints(run, 0, 2)
    kept = {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert kept == {
        "rounds/0/fold0/model.safetensors": b"weights", "rounds/0/fold1/model.safetensors": b"weights",
        "rounds/1/fold0/checkpoints/last.ckpt": b"ckpt", "rounds/1/fold0/model.safetensors": b"weights",
        "rounds/1/fold1/checkpoints/last.ckpt": b"ckpt", "rounds/1/fold1/model.safetensors": b"weights",
        "state.json": kept["state.json"],
    }


@pytest.mark.slow
def test_a_resume_after_the_pruning_gives_the_same_run(smoke_run, tmp_path):
    import shutil

    # The shared smoke run pruned every round's fold checkpoints and kept the fold weights.
    for fold in sorted((smoke_run.root / "rounds").glob("*/fold*")):
        assert (fold / "model.safetensors").stat().st_size > 0
        assert not (fold / "checkpoints").exists(), fold
    # Stopped after round 0 (its checkpoints already gone): the rerun finishes to the same files.
    out = tmp_path / "run"
    shutil.copytree(smoke_run.root, out, symlinks=True)
    state = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({"done": state["done"][: state["done"].index("round1/data")]}))
    for gone in ("rounds/1", "export", "final"):
        shutil.rmtree(out / gone)
    args = [a for a in SMALL if a != "--no-progress"]
    code, _, _ = run_cli(fit_mod.main, [*args, "--refine.relabel_confidence", "0.05", "--out", out, "--no-progress",
                                        "--keep-checkpoints"], prog="fit")
    assert code == 0
    assert run_tree(out) == run_tree(smoke_run.root)
    # --keep-checkpoints kept round 1's (a resumable Lightning checkpoint), round 0's stay pruned.
    assert all((out / "rounds" / "1" / f"fold{k}" / "checkpoints" / "last.ckpt").stat().st_size > 0 for k in (0, 1))
    assert not (out / "rounds" / "0" / "fold0" / "checkpoints").exists()
