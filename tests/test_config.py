"""Bad values are refused before any work: one line on stderr, exit code 2."""

import subprocess
import sys

import pytest
from conftest import SMOKE, run_cli

from syntagen_st import generate as gen_mod
from syntagen_st.core.errors import UserError
from syntagen_st.prompts.records import load_prompt_file

BASE = ["--config", SMOKE, "--no-progress"]


def _fails(capsys, tmp_path, *extra: str) -> str:
    assert run_cli(gen_mod.main, [*BASE, "--out", str(tmp_path / "out"), *extra], prog="syntagen_st.generate")[0] == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused config"
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--generate.classes", '["person", "unicorn"]'], "unknown class name 'unicorn'"),
        (["--generate.height", "100"], "multiple of 8"),
        (["--generate.width", "72"], "multiple of 32"),
        (["--model.pretrained", "./no/such/folder"], "does not exist"),
        (["--model.pretrained", "not a model"], "neither a folder nor a hub id"),
        (["--num-images", "-1"], "num_images must be >= 0"),
        (["--generate.batch_size", "0"], "batch_size must be >= 1"),
        (["--label.fg_threshold", "1.5"], "fg_threshold must be in [0, 1]"),
        (["--label.band_threshold", "-0.1"], "band_threshold must be in [0, 1]"),
        (["--label.band_threshold", "0.7"], "must not exceed"),
        (["--generate.steps", "abc"], "generate.steps"),
        (["--generate.prompts_file", "missing.txt"], "does not exist"),
        (["--no-such-flag", "1"], "no-such-flag"),
        (["--label.cross_factor", "3"], "must be powers of 2, got 3"),
        (["--label.extra_cross_factors", "[8, 6]", "--label.cross_weights", "[1, 1, 1]"], "powers of 2, got 6"),
        (["--label.extra_cross_factors", "[8]"], "label.cross_weights has 1 weights for 2 cross grids"),
        (["--label.cross_weights", "[1, 1]"], "label.cross_weights has 2 weights for 1 cross grids"),
        (["--label.extra_cross_factors", "[8]", "--label.cross_weights", "[0.7, 0]"], "positive and finite"),
        (["--label.extra_cross_factors", "[4]", "--label.cross_weights", "[1, 1]"], "repeats a cross grid"),
        (["--label.extra_self_factor", "2"], "extra_self_factor 2 repeats label.self_factor"),
        (["--label.extra_self_factor", "8"], "self-attention at latent / 8 is coarser than the cross grid at latent / 4"),
        (["--label.extra_cross_factors", "[8]", "--label.cross_weights", "[1, 1]", "--generate.height", "96"],
         "generate.height must be a multiple of 64 (8 x the largest label factor)"),
    ],
)
def test_bad_values_are_refused(capsys, tmp_path, args, message):
    assert message in _fails(capsys, tmp_path, *args)


def test_prompt_file_line_without_a_class_names_its_line(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a horse in a field\n\n# comment\na bowl of soup on a wooden counter\n")
    err = _fails(capsys, tmp_path, "--generate.prompt_source", "file", "--generate.prompts_file", str(prompts))
    assert f"{prompts}:4" in err and "names no known class" in err


def test_prompt_files_plain_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("A man riding a horse\nTwo cats on a couch next to a dining table\n")
    assert load_prompt_file(plain) == [
        ("A man riding a horse", ("person", "horse")),
        ("Two cats on a couch next to a dining table", ("cat", "sofa", "diningtable")),
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a rider", "classes": ["person", "Horse"]}\n{"prompt": "x", "classes": ["dragon"]}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: unknown class name 'dragon'"):
        load_prompt_file(jsonl)


def test_existing_run_with_another_config_is_refused(capsys, tmp_path):
    out = str(tmp_path / "run")
    common = [*BASE, "--generate.height", "64", "--generate.width", "64", "--generate.steps", "1", "--num-images", "1"]
    assert run_cli(gen_mod.main, [*common, "--out", out])[0] == 0
    code, _, err = run_cli(gen_mod.main, [*common, "--out", out, "--seed", "5"], capsys)
    assert code == 2 and "another config (seed: 0 -> 5)" in err
    assert run_cli(gen_mod.main, [*common, "--out", out, "--seed", "5", "--overwrite"])[0] == 0


@pytest.mark.slow
def test_module_entry_point_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "syntagen_st.generate", *BASE, "--out", str(tmp_path / "o"), "--generate.height", "100"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "syntagen_st.generate: error: generate.height must be a positive multiple of 8, got 100"]


def test_device_names_are_checked(monkeypatch):
    import torch

    from syntagen_st.core.device import resolve_device
    from syntagen_st.core.errors import ConfigError

    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'cuda:1' but CUDA is not available"):
        resolve_device("cuda:1", "model.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu", "--device")


@pytest.mark.parametrize(
    ("module", "shown", "hidden"),
    [
        ("train", ["--train.arch", "--steps", "--batch-size", "--no-progress"], ["--generate.steps", "--refine.", "--loop."]),
        # evaluate reads one setting: the loader's workers.
        ("evaluate", ["--num-workers", "--voc-root", "--data"], ["--generate.", "--model.", "--loop.", "--train.arch"]),
        ("prompts.__main__", ["--generate.llm", "--model.pretrained", "--source", "--classes"],
         ["--train.", "--refine.", "--loop.", "--label."]),
        # generate runs on --devices (= --train.devices), the one train setting it reads.
        ("generate", ["--generate.steps", "--model.pretrained", "--label.tau", "--num-images", "--devices"],
         ["--train.arch", "--train.max_steps", "--refine.", "--loop."]),
        ("fit", ["--generate.steps", "--train.arch", "--refine.folds", "--loop.rounds", "--rounds", "--resume"], []),
    ],
)
def test_each_cli_shows_only_its_own_sections(module, shown, hidden, capsys):
    import importlib

    main = importlib.import_module(f"syntagen_st.{module}").main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert all(flag in out for flag in shown), [f for f in shown if f not in out]
    assert not [f for f in hidden if f in out]


def test_a_full_run_config_is_read_by_a_command_that_shows_one_section(tmp_path):
    from syntagen_st.core.cli import config_from, config_parser

    parser = config_parser("t", "", sections=("train",), shortcuts=("steps",))
    cfg = config_from(parser, parser.parse_args(["--config", SMOKE, "--steps", "7", "--generate.steps", "2"]))
    assert cfg.train.max_steps == 7 and cfg.generate.steps == 2 and cfg.train.arch == "lraspp_mobilenet_v3_large"


def test_a_full_disk_is_one_line_and_a_bug_stays_a_traceback(capsys):
    import errno

    def full_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/pool/images/r00_000003.png")

    code, _, err = run_cli(full_disk, [], capsys, "syntagen_st.fit")
    assert code == 2 and err.strip().splitlines() == [
        "syntagen_st.fit: error: [Errno 28] No space left on device: 'runs/x/pool/images/r00_000003.png'; "
        "fix that and rerun the same command to resume"]

    def bug(argv):
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        run_cli(bug, [], capsys)


def test_every_config_field_says_what_it_is_in_the_help(capsys):
    import ast
    import inspect

    from syntagen_st import fit
    from syntagen_st.core import config

    tree = ast.parse(inspect.getsource(config))
    undocumented = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for field, after in zip(cls.body, [*cls.body[1:], None]):
            if isinstance(field, ast.AnnAssign) and not (
                    isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                undocumented.append(f"{cls.name}.{field.target.id}")
    assert undocumented == []
    with pytest.raises(SystemExit):
        fit.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in (("--generate.steps", "Denoising steps per image."), ("--seed", "The run seed"),
                        ("--refine.min_reliability", "The gate's lower bound")):
        assert f"{flag} " in text and words in text.rsplit(f"{flag} ", 1)[1][:300], flag  # its entry under options


def test_a_wrong_flag_or_value_answers_before_torch_is_loaded():
    """Flags and config are checked before the stages load torch, diffusers and Lightning (seconds)."""
    code = (
        "import sys, importlib, contextlib, io\n"
        "for verb in ('fit', 'generate', 'train', 'evaluate', 'export', 'validate', 'reproduce', 'report', 'prompts'):\n"
        "    module = importlib.import_module('syntagen_st.prompts.__main__' if verb == 'prompts' else 'syntagen_st.' + verb)\n"
        "    for argv in (['--no-such-flag'], ['--seed', '-1']):\n"
        "        err = io.StringIO()\n"
        "        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):\n"
        "            from syntagen_st.core.cli import run_main\n"
        "            run_main(module.main, verb, argv)\n"
        "        assert err.getvalue().startswith(verb + ': error:'), (verb, argv, err.getvalue())\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'pytorch_lightning', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_setting_recorded_as_added_or_changed_is_a_real_key_whose_default_differs():
    # A recorded run is read with these values: one equal to today's default, or naming no key,
    # would silently read an older run as made with today's settings.
    from syntagen_st.core.config import ADDED_SINCE, CHANGED_DEFAULTS, Config

    for (section, key), earlier in {**ADDED_SINCE, **CHANGED_DEFAULTS}.items():
        now = getattr(getattr(Config(), section), key)
        assert now != earlier, f"{section}.{key}"


@pytest.mark.parametrize("section, field, value, message", [
    ("refine", "keep_confidence", None, r"refine.keep_confidence must be a number, got None"),
    ("train", "lr", "fast", r"train.lr must be a number, got 'fast'"),
    ("label", "prior_kernel", True, r"label.prior_kernel must be a number or null, got True"),
    ("refine", "flip_tta", 1, r"refine.flip_tta must be true or false, got 1"),
    ("train", "confidence_weighting", "no", r"train.confidence_weighting must be true or false, got 'no'"),
])
def test_a_setting_typed_a_number_or_a_flag_that_holds_none_is_one_clear_line(section, field, value, message):
    import dataclasses

    from syntagen_st.core.checks import validate
    from syntagen_st.core.cli import load_config_file
    from syntagen_st.core.errors import ConfigError

    cfg = load_config_file(SMOKE)
    bad = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
    with pytest.raises(ConfigError, match=message):
        validate(bad)
