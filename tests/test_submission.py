"""The competition submission: export, validate, reproduce, and loading nothing unsafely."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from syntagen_st import export as export_mod
from syntagen_st import reproduce as reproduce_mod
from syntagen_st import validate as validate_mod
from syntagen_st.core.cli import load_config_file
from syntagen_st.core.errors import UserError
from syntagen_st.core.store import load_mask, save_mask
from syntagen_st.segmentation.data import Sample
from syntagen_st.submission.export import export_entry
from syntagen_st.submission.reproduce import image_diff, label_agreement, regeneration_batches

SIZE = 64
"""The shared smoke run's image side (conftest.SMALL)."""


@pytest.fixture(scope="session")
def exported(smoke_run, tmp_path_factory) -> Path:
    """``export RUN --out DIR --zip`` of the smoke run (DIR; the zip is DIR.zip)."""
    out = tmp_path_factory.mktemp("exported") / "entry"
    assert run_cli(export_mod.main, [smoke_run.root, "--out", out, "--zip", "--no-progress"])[0] == 0
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- export


def test_fit_exports_the_entry_layout_that_torchvision_loads(smoke_run):
    from torchvision.datasets import VOCSegmentation

    export = smoke_run.root / "export"
    sub = json.loads((export / "submission.json").read_text())
    ids = (export / "train.txt").read_text().split()
    assert sub["pairs"] == len(ids) > 0 and sorted(sub["samples"]) == ids
    # The final model trained on these files, and its checksum is recorded.
    assert sub["model_sha256"] == (smoke_run.root / "final" / "checksum.txt").read_text().split()[0]
    assert sub["model_sha256"] == _sha(smoke_run.root / "final" / "model.safetensors")
    assert sub["seed"] == 0 and sub["config"]["generate"]["height"] == SIZE
    assert sub["stable_diffusion"]["id"] == "tiny" and sub["stable_diffusion"]["licence"] == "CreativeML OpenRAIL-M"
    assert {"torch", "diffusers", "syntagen_st"} <= {k for k, v in sub["versions"].items() if v}
    assert not sub["valid_entry"] and any("64x64" in r for r in sub["not_an_entry"])
    assert sorted(sub["files"]) == sorted(["train.txt", *(f"image/{i}.jpg" for i in ids), *(f"mask/{i}.png" for i in ids)])
    assert all(_sha(export / name) == digest for name, digest in sub["files"].items())

    # Per-class counts are those of the masks.
    masks = [load_mask(export / "mask" / f"{i}.png") for i in ids]
    person = 15
    assert sub["classes"]["person"] == {"images": sum(bool((m == person).any()) for m in masks),
                                        "pixels": int(sum((m == person).sum() for m in masks))}
    assert sub["classes"]["background"]["pixels"] + sub["classes"]["ignore"]["pixels"] <= len(ids) * SIZE * SIZE

    # The VOC tree is links to the entry files, never copies, and torchvision reads it as it is.
    voc = export / "VOCdevkit" / "VOC2012"
    for i in ids:
        assert os.path.samefile(voc / "JPEGImages" / f"{i}.jpg", export / "image" / f"{i}.jpg")
        assert os.path.samefile(voc / "SegmentationClass" / f"{i}.png", export / "mask" / f"{i}.png")
    dataset = VOCSegmentation(str(export), year="2012", image_set="train")
    assert len(dataset) == len(ids)
    image, target = dataset[0]
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    assert np.array_equal(np.array(target), masks[0])

    card = (export / "README.md").read_text()
    assert "Not a valid SyntaGen competition entry" in card and "| person |" in card
    assert "CreativeML OpenRAIL-M" in card and "syntagen_st.reproduce" in card and sub["model_sha256"] in card
    # The card states the relabelling gate as the loop applied it: a band on the labels' cores.
    refine = sub["config"]["refine"]
    assert f"on their cores (pixels {refine['core_margin']:.3g} of the side" in card
    assert f"lies in [{refine['min_reliability']:g}, {refine['max_core_agreement']:g}] over at least " \
           f"{refine['min_class_pixels']:,} core pixels" in card


def test_export_cli_zip_is_deterministic_and_validates(smoke_run, exported, tmp_path, capsys):
    zip1 = exported.with_name("entry.zip")
    code, out, err = run_cli(export_mod.main, [smoke_run.root, "--out", tmp_path / "again", "--zip", "--no-progress"], capsys, "export")
    assert code == 0 and "NOT a valid competition entry" in err
    zip2 = tmp_path / "again.zip"
    assert _sha(zip1) == _sha(zip2)
    # The CLI's export holds the same files as fit's, so it carries the final model's checksum.
    assert json.loads((exported / "submission.json").read_text())["model_sha256"] == \
        (smoke_run.root / "final" / "checksum.txt").read_text().split()[0]
    with zipfile.ZipFile(zip1) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) and "submission.json" in names and "README.md" in names
        assert not any(n.startswith("VOCdevkit") for n in names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) and stat.S_ISREG(i.external_attr >> 16) for i in infos)

    for target in (exported, zip1):
        code, out, _ = run_cli(validate_mod.main, [target, "--image-size", SIZE], capsys, "validate")
        assert code == 0 and "VALID" in out and "INVALID" not in out, out
    # At the competition's size a smoke export is invalid, every image named.
    code, out, _ = run_cli(validate_mod.main, [zip1], capsys, "validate")
    assert code == 1 and "must be 512x512" in out and "INVALID" in out


def test_export_refusals_name_the_file(smoke_run, tmp_path):
    cfg = load_config_file(str(smoke_run.root / "config.yaml"))
    ids = (smoke_run.root / "export" / "train.txt").read_text().split()
    pool = smoke_run.root / "pool"
    samples = [Sample(pool / "images" / f"{i}.png", pool / "masks" / f"{i}.png") for i in ids[:2]]

    with pytest.raises(UserError, match="10001 pairs exceed the competition's limit of 10000"):
        export_entry([samples[0]] * 10_001, tmp_path / "x", cfg, {})

    claiming = load_config_file(str(smoke_run.root / "config.yaml"))
    claiming.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(UserError, match=rf"{ids[0]}\.png: 64x64 image; a competition entry needs 512x512"):
        export_entry(samples, tmp_path / "y", claiming, {})

    bad = tmp_path / "bad.png"
    save_mask(bad, np.full((SIZE, SIZE), 77, np.uint8))
    with pytest.raises(UserError, match=r"bad\.png: mask values \[77\] outside 0..20 and 255"):
        export_entry([samples[0], Sample(samples[1].image, bad)], tmp_path / "z", cfg, {})
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ---------------------------------------------------------------- validate


def _entry_copy(exported: Path, dest: Path) -> Path:
    shutil.copytree(exported, dest, ignore=shutil.ignore_patterns("VOCdevkit"))
    return dest


def _ids(entry: Path) -> list[str]:
    return (entry / "train.txt").read_text().split()


def _resize(entry: Path) -> str:
    name = f"image/{_ids(entry)[0]}.jpg"
    Image.new("RGB", (500, 500), (10, 20, 30)).save(entry / name, quality=95)
    return f"{name}: 500x500, must be 64x64"


def _mask77(entry: Path) -> str:
    name = f"mask/{_ids(entry)[1]}.png"
    mask = load_mask(entry / name)
    mask[0, 0] = 77
    save_mask(entry / name, mask)
    return f"{name}: values [77] outside 0..20 and 255"


def _no_mask(entry: Path) -> str:
    sid = _ids(entry)[2]
    (entry / "mask" / f"{sid}.png").unlink()
    return f"image/{sid}.jpg: no mask mask/{sid}.png"


def _duplicate(entry: Path) -> str:
    a, b = _ids(entry)[:2]
    shutil.copy(entry / "image" / f"{a}.jpg", entry / "image" / f"{b}.jpg")
    return f"image/{b}.jpg: same pixels as image/{a}.jpg"


def _extra_id(entry: Path) -> str:
    with open(entry / "train.txt", "a") as f:
        f.write("ghost_000001\n")
    return "train.txt: lists 'ghost_000001', which has no image and no mask"


def _wrong_checksum(entry: Path) -> str:
    sub = json.loads((entry / "submission.json").read_text())
    name = f"mask/{_ids(entry)[3]}.png"
    sub["files"][name] = "0" * 64
    (entry / "submission.json").write_text(json.dumps(sub))
    return f"{name}: sha256"


@pytest.mark.parametrize(("break_it", "kind"), [
    (_resize, "image size"), (_mask77, "mask values"), (_no_mask, "missing mask"),
    (_duplicate, "duplicate image"), (_extra_id, "train.txt"), (_wrong_checksum, "checksum"),
])
def test_validate_names_each_violation(exported, tmp_path, capsys, break_it, kind):
    entry = _entry_copy(exported, tmp_path / "entry")
    expected = break_it(entry)
    code, out, _ = run_cli(validate_mod.main, [entry, "--image-size", SIZE], capsys, "validate")
    assert code == 1, out
    assert any(line.startswith(expected) for line in out.splitlines()), out
    counts = next(line for line in out.splitlines() if " violations: " in line)
    assert f"{kind} " in counts and "INVALID" in out


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def _link_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(("entries", "expected"), [
    ([("train.txt", b"a\n"), ("../evil.png", b"x")], "../evil.png: path leaves the target folder"),
    ([("train.txt", b"a\n"), ("/tmp/syntagen_abs_evil.png", b"x")], "/tmp/syntagen_abs_evil.png: absolute path"),
    ([("train.txt", b"a\n"), (_link_info("image/a.jpg"), b"/etc/passwd")], "image/a.jpg: a link in the zip"),
    ([("train.txt", b"a\n"), ("image/a.jpg", bytes(3_000_000))], "expands to 3000002 bytes, above the limit of 1000000"),
])
def test_validate_refuses_unsafe_zips_without_writing(tmp_path, capsys, monkeypatch, entries, expected):
    target = tmp_path / "target"
    target.mkdir()
    archive = _zip(target / "entry.zip", entries)
    monkeypatch.chdir(target)
    before = sorted(p for p in tmp_path.rglob("*"))
    code, out, _ = run_cli(validate_mod.main, [archive, "--max-bytes", 1_000_000], capsys, "validate")
    assert code == 1 and "zip safety 1" in out and "refused" in out, out
    assert any(expected in line for line in out.splitlines()), out
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/syntagen_abs_evil.png").exists()


def test_validate_never_reads_an_oversized_entry_file_into_memory(exported, tmp_path, capsys):
    """A zip entry of 80 MiB of zeros is 80 KB compressed: validate names it without reading it."""
    import resource

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(exported.with_name("entry.zip")) as src, zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        with dst.open("image/zeros.jpg", "w") as f:
            for _ in range(80):
                f.write(bytes(2**20))
    assert archive.stat().st_size < 2**20 * 2
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, _ = run_cli(validate_mod.main, [archive, "--image-size", SIZE], capsys, "validate")
    assert code == 1
    assert "image/zeros.jpg: cannot read (image/zeros.jpg: 83,886,080 bytes, above the limit of 67,108,864" in out, out
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 60, grown_mib


# ---------------------------------------------------------------- reproduce


def test_each_sample_regenerates_in_a_batch_of_its_recorded_length():
    from syntagen_st.prompts.records import PromptRecord

    records = [PromptRecord(f"s{i}", 0, i, "p", ("cat",), "p; cat", i) for i in range(5)]
    batches = regeneration_batches(records, {"s0": 4, "s1": 1, "s2": 4, "s3": 4, "s4": 2})
    assert list(batches) == [1, 2, 4]
    assert [r.id for r in batches[1]] == ["s1"]
    assert [r.id for r in batches[2]] == ["s4", "s4-pad0"]
    assert [r.id for r in batches[4]] == ["s0", "s2", "s3", "s0-pad0"]
    assert batches[4][3].seed == 0 and batches[4][3].class_prompt == "p; cat"  # a copy: the same work, not compared


def test_reproduce_regenerates_identical_samples(smoke_run, exported, tmp_path, capsys, monkeypatch):
    from syntagen_st.generation.sampler import SampleGenerator

    batches: list[tuple[int, list[str]]] = []
    real_fill = SampleGenerator.fill

    def spy_fill(self, pool, records, *args, batch_size=None, **kwargs):
        batches.append((batch_size, [r.id for r in records]))
        return real_fill(self, pool, records, *args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(SampleGenerator, "fill", spy_fill)
    code, out, _ = run_cli(reproduce_mod.main, [smoke_run.root, "--sample", 3, "--no-progress"], capsys, "reproduce")
    rows = {json.loads(line)["id"]: json.loads(line) for f in (smoke_run.root / "pool" / "manifest").glob("*.jsonl")
            for line in f.read_text().splitlines()}
    chosen = [i for _, ids in batches for i in ids if "-pad" not in i]
    assert len(chosen) == 3 and all(len(ids) % n == 0 and rows[i]["batch"] == n for n, ids in batches for i in ids if i in chosen)
    monkeypatch.undo()
    # Each sample regenerates in a batch as long as the one it was made in (its row says so), so
    # batched CPU kernels block the same way: identical images and labels. In a batch of 3 where
    # the run had 4 they were not (max pixel difference 1, labels 99.98%).
    assert code == 0 and "images identical: 3/3" in out, out
    assert float(re.search(r"pixel agreement ([\d.]+)% \(mean\)", out).group(1)) == 100.0, out
    # From the zip alone: the regenerated images are JPEG-encoded as the export's were.
    zipped = exported.with_name("entry.zip")
    code, out, _ = run_cli(reproduce_mod.main, [zipped, "--sample", 2, "--no-progress"], capsys, "reproduce")
    assert code == 0 and "images identical: 2/2" in out, out
    # A replaced image is found, with its difference.
    entry = _entry_copy(exported, tmp_path / "entry")
    sid = _ids(entry)[0]
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(entry / "image" / f"{sid}.jpg", quality=95)
    code, out, _ = run_cli(reproduce_mod.main, [entry, "--ids", sid, "--no-progress"], capsys, "reproduce")
    assert code == 1 and "images identical: 0/1" in out and "PSNR" in out, out


def test_reproduce_refuses_a_recorded_batch_that_is_no_length(exported, tmp_path, capsys):
    entry = _entry_copy(exported, tmp_path / "entry")
    submission = json.loads((entry / "submission.json").read_text())
    sid = _ids(entry)[0]
    for bad in ("4", -3, 10_000, 2.5):
        submission["samples"][sid]["batch"] = bad
        (entry / "submission.json").write_text(json.dumps(submission))
        code, _, err = run_cli(reproduce_mod.main, [entry, "--ids", sid, "--no-progress"], capsys, "reproduce")
        assert code == 2 and err.strip() == f"reproduce: error: sample {sid}: recorded batch {bad!r} is not a batch length (1..256)", err


@pytest.mark.slow
def test_reproduce_full_reruns_fit_and_gets_identical_exports(smoke_run, tmp_path, capsys):
    code, out, _ = run_cli(reproduce_mod.main, [smoke_run.root, "--full", "--into", tmp_path / "again"], capsys, "reproduce")
    assert code == 0, out
    pairs = json.loads((smoke_run.root / "export" / "submission.json").read_text())["pairs"]
    assert f"images identical: {pairs}/{pairs}" in out and f"masks identical: {pairs}/{pairs}" in out
    assert "final model sha256: same" in out


def test_image_diff_and_agreement_on_hand_made_arrays():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert image_diff(a, b) == {"identical": True, "max": 0, "mean": 0.0, "psnr": float("inf")}
    b[0, 0, 0] = 255
    diff = image_diff(a, b)
    assert diff["max"] == 255 and diff["mean"] == pytest.approx(255 / 48)
    assert diff["psnr"] == pytest.approx(10 * np.log10(48))
    assert label_agreement(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 0]])) == 0.75


# ---------------------------------------------------------------- loading nothing unsafely


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(smoke_run, tmp_path, capsys, make_seg_dataset):
    from syntagen_st import evaluate as evaluate_mod
    from syntagen_st.segmentation.network import load_model
    from syntagen_st.segmentation.trainer import checkpoint_step

    marker = tmp_path / "pwned.txt"
    ckpt = tmp_path / "model.ckpt"
    torch.save({"global_step": 1, "state_dict": {}, "hyper_parameters": {"train": {"arch": "x"}},
                "payload": _Payload(str(marker))}, ckpt)
    data = make_seg_dataset(tmp_path / "data", n=2, size=32)
    code, _, err = run_cli(evaluate_mod.main, [ckpt, "--data", data, "--device", "cpu"], capsys, "evaluate")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.ckpt: refused" in err, err
    with pytest.raises(UserError, match="refused"):
        checkpoint_step(ckpt)
    assert not marker.exists()

    # Our own checkpoints still load, to the same weights as the final safetensors.
    ours = load_model(smoke_run.root / "final" / "checkpoints" / "last.ckpt")
    final = load_model(smoke_run.root / "final" / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), final.state_dict().values()))
    # The payload is real: full unpickling would have created the file.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_an_entry_recorded_before_the_refinement_reproduces_without_it():
    from syntagen_st.core.config import Config
    from syntagen_st.submission.reproduce import Source, resolve_config

    old = Config().to_dict()
    del old["label"]["refine_image"]
    assert resolve_config(Source("old", old, {}, None), None, None, None, False).label.refine_image is False
    new = Config().to_dict()
    assert resolve_config(Source("new", new, {}, None), None, None, None, False).label.refine_image is True


def test_an_entry_recorded_before_multires_attention_reproduces_with_one_grid():
    from syntagen_st.core.config import Config, cross_factors, self_factors
    from syntagen_st.submission.reproduce import Source, resolve_config

    old = Config().to_dict()
    for key in ("extra_cross_factors", "cross_weights", "extra_self_factor"):
        del old["label"][key]
    label = resolve_config(Source("old", old, {}, None), None, None, None, False).label
    assert (cross_factors(label), label.cross_weights, self_factors(label)) == ([4], [1.0], [2])


def _card_of(config: dict) -> str:
    """The card of a small hand-made entry with ``config``."""
    from syntagen_st.submission.card import render_card

    return render_card({
        "name": "entry", "valid_entry": True, "not_an_entry": [], "pairs": 2, "seed": 0, "config": config,
        "stable_diffusion": {"id": "sd", "family": "1.x", "kind": "hub"}, "classes": {}, "versions": {},
    })


def _labels_line(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("- **Labels**"))


def test_the_card_names_the_image_guided_refinement_only_when_it_was_on():
    from syntagen_st.core.config import Config

    on = Config().to_dict()
    on["label"].update(refine_kernel=0.05, refine_eps=0.002, refine_work_side=96, prior_confidence=0.9,
                       prior_kernel=0.1, prior_passes=2)
    line = _labels_line(_card_of(on))
    assert ("upsampled to the image and snapped to its edges with kornia's guided filter (window 0.05 of the shorter "
            "side, eps 0.002, coefficients computed at about 96 px); a class where its score >= 0.6") in line
    assert "prior" not in line
    off = Config().to_dict()
    off["label"]["refine_image"] = False
    old = Config().to_dict()
    del old["label"]["refine_image"]  # recorded before the refinement existed: made without it
    for config in (off, old):
        card = _card_of(config)
        assert "guided" not in card and "snapped" not in card
        assert _labels_line(card) == ("- **Labels**: cross-attention of the class tokens refined by self-attention "
                                      "to the power 4; a class where its score >= 0.6, 255 in [0.5, 0.6), background "
                                      "below; classes under 0.2 of the strongest peak are absent.")
    # An imported dataset: its masks were refined as a prior with the stated confidence, or taken as given.
    on["loop"]["source"] = off["loop"]["source"] = "folder:/data"
    line = _labels_line(_card_of(on))
    assert "imported, each mask refined as a prior (0.9 on its class" in line
    assert ("weighed by the image's colour model of each class (RGB histograms of 6 levels a channel, each class's "
            "pixel count to the power 0.2, the model to the power 1.5, a class's colour claimed within about 0.125 of "
            "the shorter side of its own pixels), then refined by the image with a fully connected "
            "CRF (pydensecrf, 10 mean-field iterations; appearance kernel 0.25 of the shorter side and 13 RGB levels, "
            "weight 10; smoothness kernel 1.5 px, weight 3)") in line
    assert "guided" not in line
    anywhere = copy.deepcopy(on)
    anywhere["label"]["colour_reach"] = None
    assert "the power 1.5), then refined by the image" in _labels_line(_card_of(anywhere))
    assert line.endswith("; a pixel the mask gave a class or 255 that comes out background is 255; a label that "
                         "places no pixel of a class it names keeps no background (255).")
    assert _labels_line(_card_of({**on, "label": {k: v for k, v in on["label"].items() if k != "absent_doubt"}})) \
        .endswith("comes out background is 255.")  # recorded before the rule: made without it
    # Recorded before the colour model: made without it, and the card says nothing of it.
    assert "colour model" not in _labels_line(_card_of({**on, "label": {k: v for k, v in on["label"].items()
                                                                       if k != "colour_weight"}}))
    on["label"]["prior_method"] = "guided"
    line = _labels_line(_card_of(on))
    assert ("snapped to the image's edges with kornia's guided filter (window 0.1 of the shorter side, eps 0.002, "
            "coefficients computed at about 96 px) in 2 passes, each from the last one's label") in line
    assert "CRF" not in line
    # Recorded before the import had its own window, passes and method: the attention's window, one pass.
    older = {**on, "label": {k: v for k, v in on["label"].items()
                             if k not in ("prior_kernel", "prior_passes", "prior_method")}}
    assert "(window 0.05 of the shorter side, eps 0.002, coefficients computed at about 96 px) once;" in _labels_line(
        _card_of(older))
    assert "attention" not in line
    assert _labels_line(_card_of(off)) == "- **Labels**: imported as given."


def test_the_card_states_the_blind_model_rules_only_where_they_ran():
    from syntagen_st.core.config import Config

    def line(config, start):
        return next(x for x in _card_of(config).splitlines() if x.startswith(start))

    now = Config().to_dict()
    assert line(now, "- **Relabel**").startswith(
        "- **Relabel**: where the held-out model (its softmax times the label's prior at 0.7, weighed by the image's "
        "colour model of each class (RGB histograms of 6 levels a channel, each class's pixel count to the power 0.2, "
        "the model to the power 1.5, a class's colour claimed within about 0.125 of the shorter side of its own "
        "pixels), then refined by the image with a fully connected CRF (pydensecrf, 10 mean-field "
        "iterations;")
    guided = copy.deepcopy(now)
    guided["refine"]["relabel_method"] = "guided"
    assert line(guided, "- **Relabel**").startswith(
        "- **Relabel**: where the held-out model (its softmax times the label's prior at 0.7, weighed by the image's "
        "colour model of each class (RGB histograms of 6 levels a channel, each class's pixel count to the power 0.2, "
        "the model to the power 1.5, a class's colour claimed within about 0.125 of the shorter side of its own "
        "pixels), then snapped to the image with kornia's guided filter (window 0.25 of the shorter "
        "side)) is >= 0.8 confident")
    plain = copy.deepcopy(now)
    del plain["refine"]["relabel_image"]  # recorded before the guided relabel: the model alone
    assert line(plain, "- **Relabel**").startswith("- **Relabel**: where the held-out model is >= 0.8 confident")
    assert line(now, "- **Relabel**").endswith(
        "become 255; on a sample naming a class the model has not learnt, the model writes no background.")
    assert line(now, "- **Filter**").endswith("dropped, classes the model has not learnt left out of the agreement.")
    for key in ("background_when_blind", "score_blind_classes"):
        del now["refine"][key]  # recorded before the rules: the model wrote and scored every class
    assert line(now, "- **Relabel**").endswith("become 255.")
    assert line(now, "- **Filter**").endswith("by model-label agreement dropped.")


def test_an_entry_recorded_before_the_guided_relabel_the_flip_and_the_persistence_rule_reproduces_without_them():
    from syntagen_st.core.config import Config
    from syntagen_st.submission.reproduce import Source, resolve_config

    keys = ("relabel_image", "flip_tta", "min_core_persistence")
    old = Config().to_dict()
    for key in keys:
        del old["refine"][key]
    refine = resolve_config(Source("old", old, {}, None), None, None, None, False).refine
    assert [getattr(refine, key) for key in keys] == [False, False, 0.0]
    new = Config().to_dict()
    refine = resolve_config(Source("new", new, {}, None), None, None, None, False).refine
    assert [getattr(refine, key) for key in keys] == [getattr(Config().refine, key) for key in keys]
    assert Config().refine.min_core_persistence > 0  # so the old entry's 0 is a real difference
