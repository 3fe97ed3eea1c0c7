"""What the model-scanning commands (``scan-once``, ``repair``) share: how they fail, the options that
say where models, backbones and OOD images come from, and turning those options into Settings.

Not a command module (the leading underscore keeps ``scanner.cli`` from registering it); it imports
nothing heavy, so ``scanner --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from scanner.errors import ConfigError
from scanner.report import ExitCode
from scanner.settings import Settings, check_device, load_settings, parse_backbone_pairs

F = TypeVar("F", bound=Callable[..., Any])


def csv_list(value: str | None) -> list[str] | None:
    """The items of a comma-separated option (blanks dropped); None when the option was not given."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def csv_set(value: str | None) -> set[str] | None:
    """The items of a comma-separated filter option as a set; None when the option was not given (no filter)."""
    return None if value is None else set(csv_list(value) or ())


def families_or_none(value: str) -> tuple[str, ...]:
    """Trigger families from an ``F1,F2|none`` option: ``none`` is the empty tuple (the step is skipped)."""
    return () if value == "none" else tuple(csv_list(value) or ())


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"scanner: error: {message}", err=True)
    sys.exit(code)


def device_option(help: str) -> Callable[[F], F]:
    """``--device`` (default cpu), checked while the command line is parsed: a malformed name, or a CUDA
    device torch cannot see, is a usage error (exit 2) before any work starts."""

    def checked(ctx: click.Context, param: click.Parameter, value: str) -> str:
        try:
            return check_device(value)
        except ConfigError as exc:
            fail(str(exc), int(ExitCode.USAGE))

    return click.option("--device", default="cpu", show_default=True, help=help, callback=checked)


#: ``scanner.engine.config.TRIGGER_SCORES``, spelt out: importing the engine imports torch, and the CLI must print
#: its first line before that slow import (a test holds the two equal)
TRIGGER_SCORES = ("share", "margin", "patch-margin", "patch-twin", "patch-student")


def trigger_score_option(f: F) -> F:
    """``--trigger-score share|margin|patch-margin|patch-twin|patch-student``: what CI scores a confirmed class from
    (``DetectorConfig.trigger_score``; None = the detector's default)."""
    return click.option("--trigger-score", type=click.Choice(TRIGGER_SCORES), default=None,
                        help="CI: score confirmed classes by their triggers' share gains, margin lifts, or the "
                             "patch trigger's median margin, alone, less the twin's, or its lead over a distilled "
                             "student where the trigger is natural (patch-student: needs --student-steps; default: "
                             "the detector's)")(f)


def model_source_options(f: F) -> F:
    """--ood, --seed, --config and --backbone, in that order (as ood_dir, seed, config, backbones)."""
    for decorate in reversed((
        click.option("--ood", "ood_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Folder of PNG/JPEG images to use as the OOD pool (default: the bundled pool)."),
        click.option("--seed", type=int, help="Seed of every random choice (default 0)."),
        click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Settings TOML file (default: ./scanner.toml when present)."),
        click.option("--backbone", "backbones", multiple=True, metavar="NAME=PATH",
                     help="Declare a local CLIP backbone file or folder (repeatable)."),
    )):
        f = decorate(f)
    return f


def settings_or_exit(config: Path | None, backbones: tuple[str, ...], flags: dict[str, Any]) -> Settings:
    """Settings from the TOML file, the environment and ``flags`` (plus ``--backbone`` pairs); a usage
    error (exit 2) with the reason when any of them is invalid."""
    try:
        bb = parse_backbone_pairs(list(backbones), "flag --backbone") if backbones else None
        return load_settings(config_file=config, flags={**flags, "backbones": bb})
    except ConfigError as exc:
        fail(str(exc), int(ExitCode.USAGE))
