"""The HTML report: written by fit, complete, offline, and honest about unfinished runs."""

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SMOKE
from PIL import Image

from syntagen_st import fit as fit_mod
from syntagen_st import report
from syntagen_st.core.cli import run_main
from syntagen_st.reporting.facts import change_shares

# Two short rounds in which every class counts as reliable, so labels change and samples drop.
TINY_FIT = [
    "--config", SMOKE, "--generate.height", "64", "--generate.width", "64", "--generate.steps", "2",
    "--loop.rounds", "2", "--loop.generate_total", "10", "--loop.round_steps", "2", "--train.max_steps", "2",
    "--train.crop_size", "32", "--refine.min_class_pixels", "0", "--refine.min_reliability", "0",
    "--refine.relabel_confidence", "0.05", "--refine.drop_fraction", "0.25", "--no-progress",
]
SECTIONS = ("glance", "iou", "steering", "balance", "sheets", "refinement", "final")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    with pytest.raises(SystemExit) as done:
        run_main(fit_mod.main, "fit", [*TINY_FIT, "--out", str(out)])
    assert done.value.code == 0
    return out


def embedded_images(page: str) -> list[Image.Image]:
    """Every data-URI image of the page, decoded (raises if one does not decode)."""
    images = []
    for fmt, data in re.findall(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format.lower() == fmt
        images.append(image)
    assert len(images) == page.count("<img "), "an <img> whose source is not an embedded PNG/JPEG"
    return images


def run_classes(run: Path) -> set[str]:
    rows = [json.loads(line) for f in (run / "pool" / "manifest").glob("*.jsonl") for line in f.read_text().splitlines()]
    return {c for row in rows for c in row["classes"]}


def test_fit_writes_a_complete_offline_report(smoke_run):
    page = (smoke_run / "report" / "index.html").read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    assert "2 of 2 rounds" in page and "incomplete" not in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    images = embedded_images(page)
    # 3 plots + contact-sheet rows + changed and dropped samples.
    assert len(images) > 3 + len(run_classes(smoke_run))
    for name in run_classes(smoke_run):
        assert f'<h3 id="sheet-{name}">' in page
    checksum = (smoke_run / "final" / "checksum.txt").read_text().split()[0]
    assert checksum in page
    # Every dropped sample is listed with its recorded reason.
    rows = [json.loads(line) for line in (smoke_run / "rounds" / "1" / "samples.jsonl").read_text().splitlines()]
    dropped = [r for r in rows if not r["kept"]]
    assert dropped and all(r["id"] in page and r["reason"] in page for r in dropped)
    # The held-out predictions the contact sheets show are saved, one palette PNG per sample.
    preds = sorted((smoke_run / "rounds" / "1" / "pred").glob("*.png"))
    assert len(preds) == sum(1 for r in rows if r["mask"].startswith("rounds/1/"))
    assert Image.open(preds[0]).mode == "P"


def test_a_run_cut_after_round_0_names_what_is_missing(smoke_run, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(smoke_run, cut, ignore=shutil.ignore_patterns("report"))
    # Killed during round 1's first fold model, in a run planned for 3 rounds.
    shutil.rmtree(cut / "rounds" / "1")
    (cut / "rounds" / "1" / "fold0").mkdir(parents=True)
    shutil.rmtree(cut / "export")
    shutil.rmtree(cut / "final")
    state = json.loads((cut / "state.json").read_text())
    state["done"] = [s for s in state["done"] if s.startswith("round0/")] + ["round1/data"]
    state["seconds"] = {k: v for k, v in state["seconds"].items() if k in state["done"]}
    (cut / "state.json").write_text(json.dumps(state))
    config = yaml.safe_load((cut / "config.yaml").read_text())
    config["loop"]["rounds"] = 3
    (cut / "config.yaml").write_text(yaml.safe_dump(config))

    with pytest.raises(SystemExit) as done:
        run_main(report.main, "report", [str(cut), "--no-progress"])
    assert done.value.code == 0
    page = (cut / "report" / "index.html").read_text()
    assert "1 of 3 rounds" in page and "2 of 3 rounds missing" in page
    assert "round 1 in progress or stopped (steps done: data; not done: fold0, fold1, refine)" in page
    assert "round 2 not started" in page and "no finished export yet" in page and "no final model yet" in page
    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    embedded_images(page)
    # Without an export, the balance and the sheets describe the kept samples of round 0.
    assert "kept samples after round 0 (nothing exported yet)" in page


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(SystemExit) as done:
        run_main(report.main, "syntagen_st.report", [str(tmp_path)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a syntagen_st run folder" in err


def test_a_report_the_disk_refuses_is_a_warning_and_a_bug_in_it_stops_the_run(tmp_path, monkeypatch, caplog):
    from syntagen_st import fit
    from syntagen_st.core.layout import RunLayout

    def refused(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def buggy(*args, **kwargs):
        raise KeyError("stats")

    write = fit.report_writer(RunLayout(tmp_path))
    monkeypatch.setattr(fit, "write_report", refused)
    with caplog.at_level("WARNING", logger="syntagen_st"):
        write()
    assert "report not written: [Errno 28] No space left on device" in caplog.text
    monkeypatch.setattr(fit, "write_report", buggy)
    with pytest.raises(KeyError):
        write()


def test_change_shares_count_changed_and_ignored_pixels():
    # A pixel that was 255 already and stays 255 is no change.
    before = np.array([[1, 1], [0, 255]], np.uint8)
    after = np.array([[1, 255], [8, 255]], np.uint8)
    assert change_shares(before, after) == (0.5, 0.25)
    assert all(np.isnan(change_shares(before, after[:1])))
