"""A run folder that keeps its word: honest resumes, one writer, readable files, one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, run_cli

from syntagen_st import evaluate as evaluate_mod
from syntagen_st import export as export_mod
from syntagen_st import fit as fit_mod
from syntagen_st import generate as generate_mod
from syntagen_st import report as report_mod
from syntagen_st import train as train_mod
from syntagen_st.core.cli import load_config_file, prepare_run_folder
from syntagen_st.core.config import NEUTRAL_KEYS, LoopConfig
from syntagen_st.core.layout import EntryLayout, RunLayout, final_step, round_step, round_tasks
from syntagen_st.core.lock import exclusive
from syntagen_st.core.store import atomic_write_bytes
from syntagen_st.segmentation.checkpoints import AtomicCheckpointIO
from syntagen_st.selftrain.resume import generated_counts, plan_resume

# ---------------------------------------------------------------- 1. a run's config is its identity


def _finished_run(root: Path, *argv: str) -> RunLayout:
    """A run folder as a finished fit leaves it, by hand: config.yaml, every step done, the round
    folders, an export and a final model (no fit needed to test the policy)."""
    run = RunLayout(root)
    cfg = load_config_file(SMOKE) if not argv else fit_config(*argv)
    root.mkdir(parents=True)
    run.config.write_text(cfg.to_yaml())
    rounds = cfg.loop.rounds
    done = [round_step(r, t) for r in range(rounds) for t in round_tasks(cfg.refine.folds)]
    run.state.write_text(json.dumps({"done": [*done, final_step(rounds, "export"), final_step(rounds, "train")]}))
    for r in range(rounds):
        run.round_dir(r).mkdir(parents=True)
    run.pool.manifest.mkdir(parents=True)
    run.export.root.mkdir()
    run.export.submission.write_text("{}")
    run.final.root.mkdir()
    run.final.checksum.write_text("0" * 64 + "  model.safetensors\n")
    return run


def fit_config(*argv: str):
    from syntagen_st.core.cli import config_from, config_parser

    parser = config_parser("fit", "", shortcuts=("rounds",))
    return config_from(parser, parser.parse_args(["--config", SMOKE, *argv]))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_counts_follow_add_data():
    assert generated_counts(LoopConfig(rounds=3, generate_total=36, budget_split="front")) == [18, 9, 9]
    assert generated_counts(LoopConfig(rounds=2, generate_total=36, budget_split="front")) == [18, 18]
    assert generated_counts(LoopConfig(rounds=2, generate_total=12, budget_split="equal")) == [6, 6]
    assert generated_counts(LoopConfig(rounds=3, generate_total=18, budget_split="equal")) == [6, 6, 6]


def test_fewer_rounds_on_a_finished_run_are_refused_in_one_line(capsys, tmp_path):
    """The issue's case: a finished 3-round run resumed with --rounds 2 --resume exported round 3's
    samples under a config that says 2 rounds. Now it is refused, naming the key, and nothing changes."""
    run = _finished_run(tmp_path / "smoke")
    before = _tree(run.root)
    for extra in ([], ["--resume"]):
        code, _, err = run_cli(fit_mod.main, ["--config", SMOKE, "--rounds", "2", "--out", run.root, *extra], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "loop.rounds: 3 -> 2" in err and "--overwrite" in err
        assert "pass --resume" not in err  # no advice that leads to a refusal
    assert _tree(run.root) == before


def test_a_change_a_begun_round_depends_on_is_refused(tmp_path):
    run = _finished_run(tmp_path / "run")
    for argv, why in ((["--loop.round_steps", "11"], "fold models"), (["--train.lr", "0.5"], "fold models"),
                      (["--rounds", "4"], "round 2 generates 6 images")):
        cfg = fit_config(*argv)
        with pytest.raises(Exception, match=why):
            prepare_run_folder(run.root, cfg, set(NEUTRAL_KEYS), overwrite=False, resume=True,
                               resumable=fit_mod.RESUMABLE_KEYS, plan_resume=plan_resume(run, cfg, set(NEUTRAL_KEYS)))


def test_a_change_only_the_final_steps_read_redoes_them(tmp_path):
    run = _finished_run(tmp_path / "run")
    cfg = fit_config("--loop.max_pairs", "5", "--train.max_steps", "7")
    prepare_run_folder(run.root, cfg, set(NEUTRAL_KEYS), overwrite=False, resume=True,
                       resumable=fit_mod.RESUMABLE_KEYS, plan_resume=plan_resume(run, cfg, set(NEUTRAL_KEYS)))
    done = json.loads(run.state.read_text())["done"]
    assert not [s for s in done if s.startswith("final")] and "round2/refine" in done
    assert not run.export.root.exists() and not run.final.root.exists()
    assert load_config_file(run.config).loop.max_pairs == 5


def test_more_rounds_continue_where_the_begun_rounds_stay_the_same(tmp_path):
    run = _finished_run(tmp_path / "run", "--loop.budget_split", "equal", "--loop.generate_total", "36")
    cfg = fit_config("--loop.budget_split", "equal", "--loop.generate_total", "48", "--rounds", "4")
    prepare_run_folder(run.root, cfg, set(NEUTRAL_KEYS), overwrite=False, resume=True,
                       resumable=fit_mod.RESUMABLE_KEYS, plan_resume=plan_resume(run, cfg, set(NEUTRAL_KEYS)))
    assert load_config_file(run.config).loop.rounds == 4 and not run.export.root.exists()


# ---------------------------------------------------------------- 2. one writer per run folder

HOLD = """
import sys, time
from pathlib import Path
from syntagen_st.core.lock import exclusive
with exclusive(Path(sys.argv[1]), "run"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_on_a_folder_in_use_is_refused_and_a_dead_holder_blocks_nothing(capsys, tmp_path):
    run = _finished_run(tmp_path / "run")
    holder = _holder(run.lock)
    try:
        for main, argv in ((fit_mod.main, ["--config", SMOKE, "--out", run.root]),
                           (generate_mod.main, ["--config", SMOKE, "--out", run.root]),
                           (export_mod.main, [run.root, "--out", tmp_path / "entry"]),
                           (report_mod.main, [run.root])):
            code, out, err = run_cli(main, argv, capsys)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"in use by pid {holder.pid} on " in err, err
            assert out == "", out  # the refusal comes before the plan
    finally:
        holder.kill()
        holder.wait()
    with exclusive(run.lock, "run"):  # the kernel released the killed holder's lock
        assert run.lock.read_text().split()[0] == str(os.getpid())
    assert run.lock.read_text() == ""


def test_two_exports_into_one_entry_folder_are_one_at_a_time(capsys, tmp_path):
    entry = EntryLayout(tmp_path / "entry")
    holder = _holder(entry.lock)
    try:
        code, out, err = run_cli(export_mod.main, [_finished_run(tmp_path / "run").root, "--out", entry.root], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"entry is in use by pid {holder.pid} on " in err, err
    assert not entry.root.exists() and entry.lock.parent == tmp_path  # beside the entry, never in it


# ---------------------------------------------------------------- 3. files as the umask says


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_and_checkpoints_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "ckpt" / "last.ckpt")
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "ckpt" / "last.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert torch.load(tmp_path / "ckpt" / "last.ckpt")["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]  # no temp left, none elsewhere


def test_every_file_of_a_finished_run_is_readable_as_the_umask_says(smoke_run):
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in smoke_run.root.rglob("*") if p.is_file() and not p.is_symlink() and "wandb" not in p.parts]
    modes = {str(p.relative_to(smoke_run.root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    wrong = {k: v for k, v in modes.items() if int(v, 8) != 0o666 & ~mask}
    # (the fold models' checkpoints are pruned once their round is refined: their weights stay)
    assert {"export/submission.json", "export/README.md", "final/model.safetensors", "report/index.html",
            "final/checkpoints/last.ckpt", "rounds/0/fold0/model.safetensors"} <= modes.keys()
    assert not wrong, wrong


# ---------------------------------------------------------------- 4. one line, before any work


def _unfinished(root: Path) -> Path:
    run = _finished_run(root)
    state = json.loads(run.state.read_text())
    run.state.write_text(json.dumps({"done": state["done"][: state["done"].index("round1/refine")]}))
    return root


def _generated_only(root: Path) -> Path:
    run = RunLayout(root)
    run.pool.manifest.mkdir(parents=True)
    run.config.write_text(load_config_file(SMOKE).to_yaml())
    return root


def _garbled_config(root: Path) -> Path:
    run = _finished_run(root)
    run.config.write_text("seed: [\n")
    return run.root


def _recorded_before_the_flip(root: Path) -> Path:
    """A finished run whose config.yaml predates refine.flip_tta (and the keys added with it)."""
    import yaml

    run = _finished_run(root)
    values = yaml.safe_load(run.config.read_text())
    for key in ("relabel_image", "flip_tta", "min_core_persistence"):
        del values["refine"][key]
    run.config.write_text(yaml.safe_dump(values))
    return run.root


def _made_with_earlier_defaults(root: Path) -> Path:
    """A finished run whose config.yaml holds the import's earlier default confidence and
    predates its window and passes."""
    import yaml

    run = _finished_run(root)
    values = yaml.safe_load(run.config.read_text())
    values["label"]["prior_confidence"] = 0.7
    for key in ("prior_kernel", "prior_passes"):
        del values["label"][key]
    run.config.write_text(yaml.safe_dump(values))
    return run.root


CASES = {
    "a run made before today's defaults": (fit_mod.main, lambda t: ["--config", SMOKE, "--out",
                                                                    _recorded_before_the_flip(t / "run")],
                                           "continue it with --refine.flip_tta false --refine.min_core_persistence 0.0 "
                                           "--refine.relabel_image false, or pass --overwrite"),
    "a run made with earlier defaults": (fit_mod.main, lambda t: ["--config", SMOKE, "--out",
                                                                  _made_with_earlier_defaults(t / "run")],
                                         "holds a run made with earlier defaults of label.prior_confidence, "
                                         "label.prior_kernel, label.prior_passes; continue it with "
                                         "--label.prior_confidence 0.7 --label.prior_kernel null "
                                         "--label.prior_passes 1, or pass --overwrite"),
    "a garbled config.yaml": (fit_mod.main, lambda t: ["--config", SMOKE, "--out", _garbled_config(t / "run")],
                              "run/config.yaml: unreadable run config"),
    "fit --out FILE": (fit_mod.main, lambda t: ["--config", SMOKE, "--out", t / "afile"], "is a file, not a folder"),
    "fit --out under a file": (fit_mod.main, lambda t: ["--config", SMOKE, "--out", t / "afile" / "run"],
                               "afile is a file, not a folder"),
    "generate --out FILE": (generate_mod.main, lambda t: ["--config", SMOKE, "--out", t / "afile"], "is a file"),
    "train --out FILE": (train_mod.main, lambda t: ["--data", t / "adir", "--out", t / "afile"], "is a file"),
    "train --data missing": (train_mod.main, lambda t: ["--data", t / "nothing", "--out", t / "new"], "no such folder"),
    "export a generate-only folder": (export_mod.main, lambda t: [_generated_only(t / "gen"), "--out", t / "new"],
                                      "no round of fit has run on it"),
    "export an interrupted run": (export_mod.main, lambda t: [_unfinished(t / "run"), "--out", t / "new"],
                                  "round 2 of 3 not finished; rerun fit to resume"),
    "export --out .": (export_mod.main, lambda t: [_finished_run(t / "run").root, "--out", "."], "holds the current folder"),
    "export --out FILE": (export_mod.main, lambda t: [_finished_run(t / "run").root, "--out", t / "afile"], "is a file"),
    "evaluate --out FOLDER": (evaluate_mod.main, lambda t: [t / "nothing.safetensors", "--data", t / "adir", "--out",
                                                            t / "adir"], "is a folder; give a file name"),
    "fit --config missing": (fit_mod.main, lambda t: ["--config", t / "none.yaml", "--out", t / "new"], "does not exist"),
    "fit --config FOLDER": (fit_mod.main, lambda t: ["--config", t / "adir", "--out", t / "new"], "not a file"),
    "fit --voc-root FILE": (fit_mod.main, lambda t: ["--config", SMOKE, "--voc-root", t / "afile", "--out", t / "new"],
                            "afile"),
}


def _made_with_a_list_default(root: Path, monkeypatch) -> Path:
    """A finished run saved with an earlier default that is a list of strings (quoting)."""
    import yaml

    from syntagen_st.core import config

    monkeypatch.setitem(config.CHANGED_DEFAULTS, ("generate", "classes"), ["cat", "dining table"])
    run = _finished_run(root)
    values = yaml.safe_load(run.config.read_text())
    values["generate"]["classes"] = ["cat", "dining table"]
    run.config.write_text(yaml.safe_dump(values))
    return run.root


@pytest.mark.parametrize("made", [_made_with_earlier_defaults, _recorded_before_the_flip, _made_with_a_list_default])
def test_the_flags_a_refusal_names_continue_the_run(tmp_path, monkeypatch, made):
    from syntagen_st.core.cli import check_run_folder
    from syntagen_st.core.errors import UserError

    root = made(tmp_path / "run", monkeypatch) if made is _made_with_a_list_default else made(tmp_path / "run")
    with pytest.raises(UserError) as refused:
        check_run_folder(root, fit_config(), set(NEUTRAL_KEYS), overwrite=False)
    flags = shlex.split(str(refused.value).split("continue it with ")[1].split(", or pass")[0])
    assert check_run_folder(root, fit_config(*flags), set(NEUTRAL_KEYS), overwrite=False) is None


def test_a_value_the_user_chose_is_not_taken_for_an_earlier_default(tmp_path):
    from syntagen_st.core.cli import check_run_folder
    from syntagen_st.core.errors import UserError

    root = _finished_run(tmp_path / "run", "--loop.rounds", "5").root
    with pytest.raises(UserError) as refused:
        check_run_folder(root, fit_config(), set(NEUTRAL_KEYS), overwrite=False)
    assert "another config (loop.rounds: 5 -> 3)" in str(refused.value) and "earlier defaults" not in str(refused.value)


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_before_anything_is_written(capsys, tmp_path, case):
    main, argv, message = CASES[case]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    argv = argv(tmp_path)
    before = _tree(tmp_path)
    code, _, err = run_cli(main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert _tree(tmp_path) == before and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_out_in_an_unwritable_folder_is_one_line(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, _, err = run_cli(fit_mod.main, ["--config", SMOKE, "--out", locked / "run"], capsys)
    assert code == 2 and "cannot write in" in err


# ---------------------------------------------------------------- 12. a damaged pool file


@pytest.mark.slow
def test_a_damaged_pool_file_is_named_and_repair_regenerates_it_bit_identical(capsys, tmp_path, smoke_run):
    import shutil

    from conftest import SMALL

    from syntagen_st.selftrain.runner import RunState

    run = RunLayout(tmp_path / "run")
    shutil.copytree(smoke_run.root, run.root)
    sid = run.export.train_list.read_text().split()[0]  # exported: read by the last round's refine
    image, mask = run.pool.image_path(sid), run.pool.mask_path(sid)
    original = image.read_bytes(), mask.read_bytes()
    image.write_bytes(original[0][: len(original[0]) // 2])
    mask.unlink()
    last = load_config_file(run.config).loop.rounds - 1
    redo = {round_step(last, "refine"), final_step(last + 1, "export"), final_step(last + 1, "train")}
    RunState(run).forget(lambda step: step in redo)
    argv = [*SMALL, "--refine.relabel_confidence", "0.05", "--out", run.root]

    code, _, err = run_cli(fit_mod.main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{sid}.png" in err and "--repair" in err, err
    # A surviving file the regeneration does not match: this machine does not make the run's bits.
    mask.write_bytes(run.pool.mask_path(run.export.train_list.read_text().split()[1]).read_bytes())
    code, _, err = run_cli(fit_mod.main, [*argv, "--repair"], capsys)
    assert code == 2 and f"sample {sid} comes out otherwise than the run made it (mask differs)" in err, err
    assert len(image.read_bytes()) == len(original[0]) // 2  # nothing was replaced
    mask.unlink()
    code, out, err = run_cli(fit_mod.main, [*argv, "--repair"], capsys)
    assert code == 0, err
    assert f"repaired 1 pool samples from their seeds: {sid}" in out
    assert (image.read_bytes(), mask.read_bytes()) == original
    assert run.final.read_checksum() == RunLayout(smoke_run.root).final.read_checksum()


def test_repair_is_refused_where_it_cannot_help(capsys, tmp_path):
    code, _, err = run_cli(fit_mod.main, ["--config", SMOKE, "--out", tmp_path / "new", "--repair"], capsys)
    assert code == 2 and "holds no run to repair" in err and not (tmp_path / "new").exists()
    code, _, err = run_cli(fit_mod.main, ["--config", SMOKE, "--out", tmp_path / "new", "--repair", "--overwrite"], capsys)
    assert code == 2 and "choose one" in err
