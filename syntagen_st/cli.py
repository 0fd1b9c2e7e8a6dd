"""Shared CLI plumbing: the config parser and the one-line error exit."""

from __future__ import annotations

import dataclasses
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from .config import Config, validate
from .errors import UserError


def config_parser(prog: str, description: str) -> ArgumentParser:
    """A parser with ``--config FILE`` and every Config field as ``--section.field``."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (later flags override it)")
    parser.add_class_arguments(Config, None)
    return parser


def config_from(parser: ArgumentParser, ns: Namespace) -> Config:
    """Build and validate the Config held in a parsed namespace."""
    values = parser.instantiate(ns)
    cfg = Config(**{f.name: values[f.name] for f in dataclasses.fields(Config)})
    return validate(cfg)


def load_config_file(path: str) -> Config:
    """A Config from a YAML file alone (e.g. a run's saved config.yaml)."""
    parser = config_parser("config", "")
    return config_from(parser, parser.parse_args(["--config", str(path)]))


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def run_main(main: Callable[[Sequence[str] | None], int | None], prog: str, argv: Sequence[str] | None = None) -> None:
    """Run a CLI entry point: user errors become one line on stderr and exit code 2."""
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except (UserError, ArgumentError) as err:
        message = " ".join(str(err).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
