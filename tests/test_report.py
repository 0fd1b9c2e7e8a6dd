"""The HTML report: written by fit, complete, offline, and honest about unfinished runs."""

import base64
import dataclasses
import html
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import bleeding_square, run_cli
from PIL import Image

from syntagen_st import report
from syntagen_st.core.classes import VOC_CLASSES
from syntagen_st.core.config import RefineConfig
from syntagen_st.reporting import sections
from syntagen_st.reporting.facts import LabelScan, RoundFacts, RunFacts, change_shares
from syntagen_st.reporting.view import DatasetView, class_balance, class_gate, class_sheets, scaled_weights, step_times

SECTIONS = ("glance", "iou", "steering", "balance", "sheets", "refinement", "final")


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


def section(page: str, key: str) -> str:
    return page.split(f'<section id="{key}">', 1)[1].split("</section>", 1)[0]


def text(markup: str) -> str:
    """What a reader sees of some HTML: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def table_rows(markup: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first table's header and its rows by first cell (the class name, marks dropped)."""
    cells = [[text(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
             for row in re.findall(r"<tr[^>]*>(.*?)</tr>", markup.split("</table>", 1)[0])]
    return cells[0], {row[0].split(" ▲")[0]: row for row in cells[1:]}


def run_classes(run: Path) -> set[str]:
    rows = [json.loads(line) for f in (run / "pool" / "manifest").glob("*.jsonl") for line in f.read_text().splitlines()]
    return {c for row in rows for c in row["classes"]}


def test_fit_writes_a_complete_offline_report(smoke_run):
    page = (smoke_run.root / "report" / "index.html").read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    assert "2 of 2 rounds" in page and "incomplete" not in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    images = embedded_images(page)
    # 3 plots, a contact-sheet row for each class an exported label holds, changed and dropped samples.
    export = smoke_run.root / "export"
    held = {VOC_CLASSES[v] for sid in (export / "train.txt").read_text().split()
            for v in np.unique(np.asarray(Image.open(export / "mask" / f"{sid}.png"))) if 0 < v < len(VOC_CLASSES)}
    assert held and len(images) > 3 + len(held)
    for name in run_classes(smoke_run.root):
        assert f'<h3 id="sheet-{name}">' in page
    checksum = (smoke_run.root / "final" / "checksum.txt").read_text().split()[0]
    assert checksum in page
    # Every dropped sample is listed with its recorded reason.
    rows = [json.loads(line) for line in (smoke_run.root / "rounds" / "1" / "samples.jsonl").read_text().splitlines()]
    dropped = [r for r in rows if not r["kept"]]
    assert dropped and all(r["id"] in page and r["reason"] in page for r in dropped)
    # The held-out predictions the contact sheets show are saved, one palette PNG per sample.
    preds = sorted((smoke_run.root / "rounds" / "1" / "pred").glob("*.png"))
    assert len(preds) == sum(1 for r in rows if r["mask"].startswith("rounds/1/"))
    assert Image.open(preds[0]).mode == "P"


def test_the_report_shows_the_gate_s_band_and_each_class_s_core_iou_and_verdict(smoke_run):
    page = (smoke_run.root / "report" / "index.html").read_text()
    refine = yaml.safe_load((smoke_run.root / "config.yaml").read_text())["refine"]
    stats = json.loads((smoke_run.root / "rounds" / "1" / "stats.json").read_text())
    band = f"[{refine['min_reliability']:g}, {refine['max_core_agreement']:g}] over at least " \
           f"{refine['min_class_pixels']:,} core pixels"
    iou = section(page, "iou")
    assert "on their cores" in text(iou) and band in text(iou)
    assert "reached refine.min_reliability" not in page
    header, rows = table_rows(iou)
    core, verdict, all_pixels = header.index("core IoU % (round 2)"), header.index("relabel (round 2)"), \
        header.index("round 2 IoU % (all pixels)")
    assert verdict == core + 1 == all_pixels + 2
    for name in ["background", *stats["classes_in_pool"]]:
        value = stats["core_iou_model_vs_labels"][name]
        assert rows[name][core] == (f"{100 * value:.1f}" if value is not None else "—"), name
        # The shared smoke run opens every class it has evidence for.
        assert rows[name][verdict] == ("yes" if name in stats["reliable"] else "no evidence"), name
    refinement = text(section(page, "refinement"))
    assert "on their cores" in refinement and band in refinement


def test_a_run_cut_after_round_0_names_what_is_missing(smoke_run, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(smoke_run.root, cut, ignore=shutil.ignore_patterns("report"))
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

    assert run_cli(report.main, [str(cut), "--no-progress"], prog="report")[0] == 0
    page = (cut / "report" / "index.html").read_text()
    assert "1 of 3 rounds" in page and "2 of 3 rounds missing" in page
    assert "round 2 in progress or stopped (steps done: data; not done: fold0, fold1, refine)" in page
    assert "round 3 not started" in page and "no finished export yet" in page and "no final model yet" in page
    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    embedded_images(page)
    # Without an export, the balance and the sheets describe the kept samples of the first round.
    assert "kept samples after round 1 (nothing exported yet)" in page


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert run_cli(report.main, [str(tmp_path)], prog="syntagen_st.report")[0] == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a syntagen_st run folder" in err


def test_a_report_the_disk_refuses_is_a_warning_and_a_bug_in_it_stops_the_run(tmp_path, monkeypatch, caplog):
    from syntagen_st import fit
    from syntagen_st.core.layout import RunLayout

    def refused(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def buggy(*args, **kwargs):
        raise KeyError("stats")

    import syntagen_st.reporting.page as page

    write = fit.report_writer(RunLayout(tmp_path))
    monkeypatch.setattr(page, "write_report", refused)
    with caplog.at_level("WARNING", logger="syntagen_st"):
        write()
    assert "report not written: [Errno 28] No space left on device" in caplog.text
    monkeypatch.setattr(page, "write_report", buggy)
    with pytest.raises(KeyError):
        write()


def test_change_shares_count_changed_and_ignored_pixels():
    # A pixel that was 255 already and stays 255 is no change.
    before = np.array([[1, 1], [0, 255]], np.uint8)
    after = np.array([[1, 255], [8, 255]], np.uint8)
    assert change_shares(before, after) == (0.5, 0.25)
    assert all(np.isnan(change_shares(before, after[:1])))


GATE = RefineConfig(min_reliability=0.5, max_core_agreement=0.85, min_class_pixels=1000)
ROUND0 = {
    "round": 0, "samples": 4, "dropped": 0, "pixels_relabelled": 10, "reliable": ["background", "dog"],
    "iou_model_vs_labels": {"background": 0.9, "dog": 0.6, "cat": 0.2, "car": 0.5, "sheep": 0.7, "bird": None},
    "core_iou_model_vs_labels": {"background": 0.95, "dog": 0.7, "cat": 0.3, "car": 0.9, "sheep": 0.6, "bird": None},
    "weights": {"dog": 0.5, "cat": 2.0, "car": 1.0, "sheep": 0.5, "bird": 1.0},
    "weakness": {"dog": 0.3, "cat": 0.8, "car": 0.5, "sheep": 0.4, "bird": 1.0},
}


def hand_made_run(tmp_path: Path, stats: dict = ROUND0) -> RunFacts:
    config = {"refine": {"min_reliability": GATE.min_reliability, "max_core_agreement": GATE.max_core_agreement,
                         "min_class_pixels": GATE.min_class_pixels}, "loop": {"rounds": 1},
              "generate": {"classes": ["dog", "cat", "car", "sheep", "bird"]}}
    return RunFacts(tmp_path, config, ["round0/refine"], {}, {}, [RoundFacts(0, "done", "", stats, [])], None, None,
                    None, [])


def test_class_gate_gives_each_class_the_core_iou_it_was_judged_on_and_why():
    gate = class_gate(ROUND0, GATE)
    assert gate["dog"] == (0.7, "yes")
    assert gate["cat"] == (0.3, "below band")
    assert gate["car"] == (0.9, "above band")
    assert gate["sheep"] == (0.6, "too few pixels or no foreground")
    assert gate["bird"] == (None, "no evidence")
    # In the band, shut because its disagreement faded on the deep core (runs before the rule lack it).
    faded = ROUND0 | {"core_persistence": {"sheep": 0.5, "dog": 0.9}}
    assert class_gate(faded, GATE)["sheep"] == (0.6, "fades inward: boundary errors")
    assert class_gate(faded | {"core_persistence": {"sheep": 0.9}}, GATE)["sheep"][1] == "too few pixels or no foreground"
    # Background has no upper bound: shut above 0.85, it lacked pixels or an open foreground class.
    assert class_gate(ROUND0 | {"reliable": []}, GATE)["background"] == (0.95, "too few pixels or no foreground")


def test_iou_section_puts_the_gate_s_verdict_beside_the_core_iou_it_judged(tmp_path):
    page = sections.iou(hand_made_run(tmp_path))
    assert "[0.5, 0.85] over at least 1,000 core pixels" in text(page)
    header, rows = table_rows(page)
    assert header[1:5] == ["round 1 IoU % (all pixels)", "core IoU % (round 1)", "relabel (round 1)", "weakness % (round 1)"]
    assert {name: row[1:4] for name, row in rows.items()} == {
        "background": ["90.0", "95.0", "yes"], "dog": ["60.0", "70.0", "yes"], "cat": ["20.0", "30.0", "below band"],
        "car": ["50.0", "90.0", "above band"], "sheep": ["70.0", "60.0", "too few pixels or no foreground"],
        "bird": ["—", "—", "no evidence"],
    }
    refinement = text(sections.refinement(hand_made_run(tmp_path), DatasetView([], "no samples", _scan([], []))))
    assert "[0.5, 0.85] over at least 1,000 core pixels" in refinement


def test_weights_are_scaled_to_mean_1_over_the_run_s_classes():
    weights = scaled_weights({"weights": {"cat": 2.0, "dog": 1.0, "car": 0.5}}, ["cat", "dog", "sheep"])
    assert weights["cat"] == pytest.approx(4 / 3) and weights["dog"] == pytest.approx(2 / 3)
    assert np.isnan(weights["sheep"])


def test_step_times_add_the_fold_models_and_list_each_final_step():
    seconds = {"round0/data": 2.0, "round0/fold0": 3.0, "round0/fold1": 4.0, "round1/data": 1.0,
               "final2/export": 5.0, "final2/train": 6.0}
    times = step_times(seconds, rounds=2, folds=2)
    assert [(t.name, t.total, t.parts) for t in times] == [
        ("round 1", 9.0, (2.0, 7.0, None)), ("round 2", 1.0, (1.0, None, None)),
        ("export", 5.0, None), ("final training", 6.0, None)]


def _scan(ids: list[str], per_class: list[dict[int, int]]) -> LabelScan:
    pixels = np.zeros((len(ids), 21), np.int64)
    for n, counts in enumerate(per_class):
        for k, v in counts.items():
            pixels[n, k] = v
    return LabelScan(ids, pixels, np.full(len(ids), np.nan), np.full(len(ids), np.nan), [])


def test_balance_and_sheets_count_the_run_s_classes_and_pick_best_median_worst():
    car, cat, dog = 7, 8, 12
    labels = [{cat: 10}, {cat: 10, dog: 5}, {cat: 10, dog: 5}, {cat: 10, dog: 5, car: 2}, {cat: 10}, {cat: 10}]
    balance = class_balance(_scan(list("abcdef"), labels), ["car", "cat", "dog"])
    assert balance.images.tolist() == [1, 6, 3] and balance.pixels.tolist() == [2, 60, 15]
    # Uniform is a third of the images: car's tenth is below half of it.
    assert balance.image_share.tolist() == [0.1, 0.6, 0.3] and balance.thin == ["car"]
    scan = _scan(["a", "b", "c", "d"], [{cat: 10}, {cat: 30, dog: 5}, {cat: 20}, {}])
    rows = {"a": {"score": 0.9}, "b": {"score": 0.1}, "c": {"score": 0.5}}
    sheets = class_sheets(DatasetView(scan.ids, "four", scan), ["cat", "dog"], rows)
    assert [(s.name, s.holders, s.picks) for s in sheets] == [
        ("cat", 3, [("a", "best"), ("c", "median"), ("b", "worst")]), ("dog", 1, [("b", "best")])]


def test_fit_names_its_report_and_the_next_command_and_the_report_is_honest(smoke_run, tmp_path, capsys):
    root = smoke_run.root
    assert smoke_run.stdout.splitlines()[-2:] == [
        f"report: {root / 'report' / 'index.html'}",
        f"next: python -m syntagen_st.export {root} --out submission --zip, "
        "then python -m syntagen_st.validate submission.zip --image-size 64",
    ]
    page = (root / "report" / "index.html").read_text()
    glance = text(section(page, "glance"))
    # The source as it was: the tiny test pipeline, not "Stable Diffusion".
    assert "Sourcethe tiny random-initialised test pipeline 'tiny', not Stable Diffusion weights" in glance
    # The export's own not-an-entry reasons, word for word.
    reasons = json.loads((root / "export" / "submission.json").read_text())["not_an_entry"]
    assert reasons and f"Not a valid SyntaGen competition entry: {'; '.join(reasons)}." in glance
    # Who wrote it: fit at the end; the report command when it is asked.
    footer = text(page.split("<footer>", 1)[1])
    assert "by python -m syntagen_st.fit, at the end of the run (2 rounds, the export and the final training)" in footer
    out = tmp_path / "again.html"
    assert run_cli(report.main, [root, "--out", out, "--no-progress"], capsys)[0] == 0
    assert f"by python -m syntagen_st.report {root}." in text(out.read_text().split("<footer>", 1)[1])


def test_the_report_states_the_source_and_entry_rule_from_the_config_before_an_export():
    from syntagen_st.reporting.view import not_an_entry, source_line

    sd = {"model": {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5", "revision": "abc"},
          "loop": {"source": "sd"}, "generate": {"width": 512, "height": 512}}
    assert source_line(sd, None) == "Stable Diffusion stable-diffusion-v1-5/stable-diffusion-v1-5 from the Hugging Face hub, revision abc"
    assert source_line(sd, {"stable_diffusion": {"commit": "c0ffee"}}).endswith("revision abc, commit c0ffee")
    assert not_an_entry(sd, None) == []
    small = sd | {"generate": {"width": 256, "height": 256}}
    assert not_an_entry(small, None) == ["its images are 256x256, not 512x512"]
    local = sd | {"model": {"pretrained": "/models/sd15"}}
    assert source_line(local, {"stable_diffusion": {"sha256": "f00d"}}) == \
        "Stable Diffusion from the local folder /models/sd15, files sha256 f00d"
    folder = sd | {"loop": {"source": "folder:/data/voc"}}
    assert source_line(folder, None) == "folder import: /data/voc (not generated by Stable Diffusion)"
    assert not_an_entry(folder, None) == ["its images come from folder:/data/voc, not from Stable Diffusion and the seed"]
    tiny = sd | {"model": {"pretrained": "tiny-sd2"}}
    assert source_line(tiny, None) == "the tiny random-initialised test pipeline 'tiny-sd2', not Stable Diffusion weights"
    # Once exported, submission.json decides.
    assert not_an_entry(tiny, {"valid_entry": False, "not_an_entry": ["recorded reason"]}) == ["recorded reason"]
    assert not_an_entry(sd, {"valid_entry": True, "not_an_entry": []}) == []


def test_the_iou_chart_is_a_class_by_round_grid_that_grows_a_row_per_class():
    from syntagen_st.reporting import figures

    every = {c: [0.1 * (i % 10), None, 0.5] for i, c in enumerate(VOC_CLASSES[1:])}
    many = Image.open(io.BytesIO(figures.iou_over_rounds(["round 1", "round 2", "round 3"], every, {"cat"})))
    one = Image.open(io.BytesIO(figures.iou_over_rounds(["round 1", "round 2", "round 3"], {"cat": [0.1, None, 0.5]}, set())))
    # A row per class (20 rows, not 20 overlapping lines in a fixed frame).
    assert many.height > 2 * one.height


# ---------------------------------------------------------------- contact sheets: attention, refined, relabelled


def attention_label_by_hand(scores: np.ndarray, class_ids: np.ndarray, size: tuple[int, int], label: dict) -> np.ndarray:
    """What a stored attention score file gives without the image: bilinear upsampling, the top class
    at >= fg_threshold, 255 in the band below it (as docs/masks.md states the rule)."""
    import torch
    import torch.nn.functional as F

    full = F.interpolate(torch.from_numpy(scores).float()[None], size=size, mode="bilinear", align_corners=False)[0]
    top, arg = full.max(dim=0)
    out = np.zeros(size, np.uint8)
    out[top.numpy() >= label["fg_threshold"]] = class_ids[arg.numpy()][top.numpy() >= label["fg_threshold"]]
    out[(top.numpy() >= label["band_threshold"]) & (top.numpy() < label["fg_threshold"])] = 255
    return out


def sheet_heads(markup: str) -> list[str]:
    heads = re.findall(r'<div class="cols"[^>]*>(.*?)</div>', markup)
    assert heads and len(set(heads)) == 1
    return [text(h) for h in re.findall(r"<span>(.*?)</span>", heads[0])]


def test_the_contact_sheets_show_the_attention_the_refined_and_the_relabelled_label(smoke_run):
    from syntagen_st.core.store import load_mask
    from syntagen_st.reporting import figures
    from syntagen_st.reporting.facts import read_run
    from syntagen_st.reporting.view import read_rgb, sheet_columns, sheet_masks

    sheets_html = section((smoke_run.root / "report" / "index.html").read_text(), "sheets")
    assert sheet_heads(sheets_html) == ["image", "attention label", "refined label", "relabelled label",
                                        "held-out prediction"]
    assert "snapped to the image's edges with the guided filter" in text(sheets_html)
    facts = read_run(smoke_run.root)
    label = yaml.safe_load((smoke_run.root / "config.yaml").read_text())["label"]
    assert label["refine_image"] is True
    pool, columns = facts.run.pool, sheet_columns(facts.config)
    snapped = relabelled = 0
    for sid in sorted(facts.pool_rows):
        attention, refined, current, _ = sheet_masks(facts, sid, columns)
        stored = np.load(pool.scores_path(sid))
        assert np.array_equal(attention, attention_label_by_hand(stored["scores"], stored["class_ids"],
                                                                 refined.shape, label)), sid
        assert np.array_equal(refined, load_mask(pool.mask_path(sid)))
        assert np.array_equal(current, load_mask(facts.label_path(sid)))
        snapped += int((attention != refined).any())
        relabelled += int((current != refined).any())
    # The refinement changed pixels of most samples, and the rounds relabelled some.
    assert snapped > len(facts.pool_rows) // 2 and relabelled > 0
    # The page embeds exactly these panels for every sample it shows.
    shown = re.findall(r'alt="sample ([^"]+)"', sheets_html)
    assert shown
    for sid in set(shown):
        row = figures.panel_row(read_rgb(pool.image_path(sid)), sheet_masks(facts, sid, columns))
        assert base64.b64encode(row).decode("ascii") in sheets_html, sid


@pytest.mark.parametrize("recorded", ["off", "before the refinement existed"])
def test_a_run_without_the_refinement_has_no_refined_column_and_says_so(smoke_run, tmp_path, recorded):
    from syntagen_st.core.store import load_mask
    from syntagen_st.reporting.facts import read_run
    from syntagen_st.reporting.view import dataset_view, sheet_columns, sheet_masks

    run = tmp_path / "run"
    shutil.copytree(smoke_run.root, run, ignore=shutil.ignore_patterns("report", "final", "fold*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    if recorded == "off":
        config["label"]["refine_image"] = False
    else:
        del config["label"]["refine_image"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    facts = read_run(run)
    markup = sections.sheets(facts, dataset_view(facts))
    assert sheet_heads(markup) == ["image", "attention label", "relabelled label", "held-out prediction"]
    assert "label.refine_image was off for this run" in text(markup) and "no refined-label column" in text(markup)
    sid = sorted(facts.pool_rows)[0]
    attention, current, _ = sheet_masks(facts, sid, sheet_columns(facts.config))
    assert np.array_equal(attention, load_mask(facts.run.pool.mask_path(sid)))
    assert np.array_equal(current, load_mask(facts.label_path(sid)))
    assert "before: attention label" in sections.refinement(facts, dataset_view(facts))


def test_an_imported_dataset_s_sheet_shows_its_mask_as_given_beside_the_refined_one(tmp_path):
    from syntagen_st.core.config import LabelConfig
    from syntagen_st.core.layout import RunLayout
    from syntagen_st.core.store import load_mask
    from syntagen_st.reporting.facts import read_run
    from syntagen_st.reporting.view import dataset_view, sheet_columns, sheet_masks
    from syntagen_st.selftrain.pool import import_folder

    data, image, blob = bleeding_square(tmp_path / "data")
    run = RunLayout(tmp_path / "run")
    import_folder(str(data), run.pool, LabelConfig())
    run.config.write_text(yaml.safe_dump({"loop": {"source": f"folder:{data}", "rounds": 1}, "label": {"refine_image": True}}))
    facts = read_run(run.root)
    columns = sheet_columns(facts.config)
    given, refined, current, prediction = sheet_masks(facts, "r00_000000", columns)
    assert np.array_equal(given, blob) and prediction is None
    assert np.array_equal(refined, load_mask(run.pool.mask_path("r00_000000"))) and np.array_equal(current, refined)
    assert ((refined == 8) != (blob == 8)).mean() > 0.02
    markup = sections.sheets(facts, dataset_view(facts))
    assert sheet_heads(markup) == ["image", "label as imported", "refined label", "relabelled label", "held-out prediction"]
    assert "no round has finished: still the pool's" in text(markup)
    # A config recorded before the CRF: the guided filter; as fit saves it today: the CRF and its doubt rule.
    assert "snapped to the image's edges with the guided filter" in text(markup)
    assert "no background where" not in text(markup)  # recorded before absent_doubt: made without it
    run.config.write_text(yaml.safe_dump({"loop": {"source": f"folder:{data}", "rounds": 1},
                                          "label": dataclasses.asdict(LabelConfig())}))
    now = text(sections.sheets(read_run(run.root), dataset_view(facts)))
    assert ("snapped to the image's edges with a fully connected CRF on the image, 255 where it doubts the mask's "
            "class, after the image's colour model of each class (label.refine_image); no background where the "
            "mask places no pixel of a class it names") in now
    assert "guided filter" not in now
