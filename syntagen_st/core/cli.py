"""The one way a command is parsed and run: its parser (with the config sections it reads and the
shortcut flags), the run-folder policy, and ``run_main``'s one-line error exit."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import shlex
import shutil
import sys
from argparse import ArgumentError
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from .checks import validate
from .config import ADDED_SINCE, CHANGED_DEFAULTS, Config, as_recorded, config_differences
from .errors import UserError
from .layout import LOCK, RunLayout
from .rules import MAX_IMAGE_PIXELS, pixel_limit
from .store import atomic_write_text

SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in ("seed", "name"))

SHORTCUTS = {
    "rounds": "loop.rounds",
    "source": "loop.source",
    "num_images": "generate.num_images",
    "steps": "train.max_steps",
    "arch": "train.arch",
    "crop_size": "train.crop_size",
    "batch_size": "train.batch_size",
    "logger": "train.logger",
    "backbone_weights": "train.backbone_weights",
    "devices": "train.devices",
    "num_nodes": "train.num_nodes",
    "num_workers": "train.num_workers",
}
"""Short flags (``--num-images``) for the config keys a command's users set most; one table for all CLIs."""


def _field_type(dotted: str) -> type:
    section, name = dotted.split(".")
    return get_type_hints(type(getattr(Config(), section)))[name]


def command_parser(prog: str, description: str, progress: bool = False, images: bool = False) -> ArgumentParser:
    """A command's parser: its errors are raised (``run_main`` prints them as one line),
    ``--no-progress`` when the command draws progress bars, and ``--max-image-pixels`` when it
    decodes images the user gives it."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs and CI)")
    if images:
        parser.add_argument(
            "--max-image-pixels", action=_PixelLimit, metavar="N", default=None,
            help=f"largest image or mask decoded, as a count or WxH (default {MAX_IMAGE_PIXELS:,} = 4096x4096); "
                 "a larger one is refused from its header, so memory stays bounded")
    return parser


class _PixelLimit(argparse.Action):
    """``--max-image-pixels``: put in force as it is parsed (``core.rules.pixel_limit``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, pixel_limit(str(values)))
        except ValueError as err:
            raise ArgumentError(self, str(err)) from None


def config_parser(
    prog: str, description: str, sections: Iterable[str] = SECTIONS, shortcuts: Iterable[str] = (), progress: bool = False,
    images: bool = False,
) -> ArgumentParser:
    """``command_parser`` with ``--config FILE``, ``--seed``, ``--name`` and ``--section.field`` for
    each field of the given config sections, plus the named shortcut flags.

    Every section is still read from a --config file and accepted as a flag, so a run's full
    config.yaml works with every command; --help lists only the sections the command uses.
    """
    # Each config field's help is the docstring under it in core/config.py.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = command_parser(prog, description, progress, images)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (later flags override it)")
    parser.add_class_arguments(Config, None)
    hidden = set(SECTIONS) - set(sections)
    for action in parser._actions:
        if action.dest.split(".")[0] in hidden:
            action.help = argparse.SUPPRESS
    parser._action_groups = [
        g for g in parser._action_groups
        if not (g._group_actions and all(a.help == argparse.SUPPRESS for a in g._group_actions))
    ]
    for group in parser._action_groups:
        if group.title and group.title.startswith("Config("):
            group.title = "run"
    for flag in shortcuts:
        kind = _field_type(SHORTCUTS[flag])
        options = {"choices": get_args(kind)} if get_origin(kind) is Literal else {"type": kind if kind in (int, float) else str}
        parser.add_argument(f"--{flag.replace('_', '-')}", default=None, help=f"= --{SHORTCUTS[flag]}", **options)
    # config_from maps only these: a command may use a shortcut's name for a flag of its own.
    parser.shortcut_flags = tuple(shortcuts)
    return parser


def config_from(parser: ArgumentParser, ns: Namespace) -> Config:
    """Build and validate the Config held in a parsed namespace, shortcut flags applied."""
    for flag in getattr(parser, "shortcut_flags", ()):
        if ns[flag] is not None:
            ns[SHORTCUTS[flag]] = ns[flag]
    values = parser.instantiate(ns)
    cfg = Config(**{f.name: values[f.name] for f in dataclasses.fields(Config)})
    return validate(cfg)


def load_config_file(path: str | Path) -> Config:
    """A Config from a YAML file alone (e.g. a run's saved config.yaml), validated."""
    parser = config_parser("config", "")
    try:
        return config_from(parser, parser.parse_args(["--config", str(path)]))
    except (UserError, ArgumentError) as err:
        raise UserError(f"{path}: {' '.join(str(err).split())}") from None


def read_run_config(path: str | Path) -> dict:
    """The values of a run's saved config.yaml as written; a UserError naming the file when it is
    not a readable YAML mapping."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path}: unreadable run config ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: unreadable run config (not a mapping)")
    return values


def load_run_config(path: str | Path) -> Config:
    """A run's saved config.yaml as the run was made: settings it predates take the values it ran
    with (``core.config.as_recorded``), not today's defaults; a UserError naming the file."""
    values = read_run_config(path)
    try:
        return config_from_dict(as_recorded(values))
    except (UserError, ArgumentError) as err:
        raise UserError(f"{path}: {' '.join(str(err).split())}") from None


def config_from_dict(values: dict) -> Config:
    """A Config from a dict such as ``Config.to_dict()`` or submission.json's ``config``, validated."""
    parser = config_parser("config", "")
    return config_from(parser, parser.parse_object(values))


def check_out(path: str | os.PathLike, flag: str = "--out", file: bool = False) -> Path:
    """An output path the command can write, checked before any work: a file where a folder
    belongs (or, ``file``, a folder where a file belongs), a path under a file, or a folder this
    user cannot write in is one line."""
    path = Path(path).expanduser()
    if file and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'metrics.json'}")
    if not file and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    nearest = path if path.is_dir() else next(p for p in path.absolute().parents if p.exists())
    if not nearest.is_dir():
        raise UserError(f"{flag} {path}: {nearest} is a file, not a folder; choose another {flag}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: this user cannot write in {nearest}; choose another {flag}")
    return path


def check_run_folder(
    root: Path, cfg: Config, free: set[str], *, overwrite: bool, resume: bool = False,
    resumable: set[str] | None = None, plan_resume: Callable[[Config], Callable[[], None]] | None = None,
) -> Callable[[], None] | None:
    """The one policy for a command's output folder, checked without writing anything (a command
    calls it before any work, and ``prepare_run_folder`` again under the folder's lock).

    A folder holding a run with the same config (``free`` keys aside) is continued. Another
    config needs ``--overwrite`` (delete and start again) or, where the command can continue a
    changed run (``resumable`` keys given), ``--resume``. ``plan_resume(old_config)`` then says
    whether the run can honour the change in full (a UserError saying why when it cannot) and
    returns what makes it continue (e.g. forgetting the steps to redo), returned here.
    A non-empty folder that holds no run is replaced only with --overwrite.
    """
    run = RunLayout(root)
    saved = run.config
    if overwrite:
        return None
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a folder; choose another --out")
    if not saved.exists():
        # A folder holding only prompts/ is a run to start: saved prompts regenerate without the LLM.
        if root.is_dir() and any(p.name not in (run.prompts_dir.name, LOCK) for p in root.iterdir()):
            raise UserError(f"{root} exists and is not a syntagen_st run; choose another --out or pass --overwrite")
        return None
    previous = load_run_config(saved)
    changed = config_differences(previous.to_dict(), cfg.to_dict(), free)
    diffs = "; ".join(changed[:3])
    if not diffs:
        return None
    keys = [d.split(":")[0] for d in changed]
    added = {f"{section}.{key}": value for (section, key), value in ADDED_SINCE.items()}
    earlier = added | {f"{section}.{key}": value for (section, key), value in CHANGED_DEFAULTS.items()}
    saved_values, defaults, given = previous.to_dict(), Config().to_dict(), cfg.to_dict()
    if all(key in earlier and _dotted(saved_values, key) == earlier[key] and _dotted(given, key) == _dotted(defaults, key)
           for key in keys):
        # Only a setting added or a default changed since the run differs: its values continue it.
        flags = " ".join(f"--{key} {shlex.quote(json.dumps(earlier[key], separators=(',', ':')))}" for key in keys)
        made = (f"made before {', '.join(keys)} existed, which it ran without" if set(keys) <= set(added)
                else f"made with earlier defaults of {', '.join(keys)}")
        raise UserError(f"{root} holds a run {made}; continue it with {flags}, or pass --overwrite to start again")
    if resumable is None:
        raise UserError(f"{root} holds a run with another config ({diffs}); "
                        "pass --overwrite to start again or choose another --out")
    try:
        if config_differences(previous.to_dict(), cfg.to_dict(), free | resumable):
            raise UserError("its samples and folds depend on them")
        redo = plan_resume(previous) if plan_resume is not None else None
    except UserError as why:
        start = f"cannot resume {root} with changed {diffs}" if resume else \
            f"{root} holds a run with another config ({diffs}), which cannot continue it"
        raise UserError(f"{start}: {why}; pass --overwrite to start again or choose another --out") from None
    if not resume:
        raise UserError(f"{root} holds a run with another config ({diffs}); "
                        "pass --resume to continue it with this config or --overwrite to start again")
    return redo


def _dotted(values: dict, key: str) -> object:
    """``values["a"]["b"]`` for the dotted key "a.b"; None where a part is missing."""
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def prepare_run_folder(
    root: Path, cfg: Config, free: set[str], *, overwrite: bool, resume: bool = False,
    resumable: set[str] | None = None, plan_resume: Callable[[Config], Callable[[], None]] | None = None,
) -> None:
    """``check_run_folder``, then the folder made (emptied with ``overwrite``, the continuation of a
    changed run prepared) and its config.yaml written last."""
    redo = check_run_folder(root, cfg, free, overwrite=overwrite, resume=resume, resumable=resumable,
                            plan_resume=plan_resume)
    if redo is not None:
        redo()
    if overwrite and root.is_dir():
        # The lock stays: this command holds it.
        for path in root.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != LOCK:
                path.unlink()
    elif overwrite and root.exists():
        root.unlink()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RunLayout(root).config, cfg.to_yaml())


_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EMFILE}
"""OS errors of the machine, not of the code (a full disk, no permission): one line, like a user's error."""


def _show_package_logs() -> None:
    log = logging.getLogger("syntagen_st")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def run_main(main: Callable[[Sequence[str] | None], int | None], prog: str, argv: Sequence[str] | None = None) -> None:
    """Run a command: the package's log lines as plain messages on stderr (libraries keep their
    own levels), user errors as one line on stderr and exit code 2."""
    _show_package_logs()
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except (UserError, ArgumentError) as err:
        message = " ".join(str(err).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in _MACHINE_ERRNOS:
            raise
        # Every file is written atomically: what was in flight is lost, the rest stays, a rerun resumes.
        print(f"{prog}: error: {' '.join(str(err).split())}; fix that and rerun the same command to resume",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
