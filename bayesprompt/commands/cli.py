"""Command-line plumbing shared by the scripts in experiments/: exit codes, the device and
precision defaults, and the options generated from a configuration dataclass (RunConfig): one
flag per field, `--config FILE` defaults, and the KEY=VALUE syntax of sweeps."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bayesprompt.errors import RunInterrupted, RunsFailed, UserError
from bayesprompt.files import read_json
from bayesprompt.options import (
    check_field_value,
    field_default,
    field_type,
    parse_field_value,
    parse_options,
)
from bayesprompt.runs.config import default_device

#: The exit code of a process stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run `main`; a UserError (or bad arguments) prints one paragraph and exits with 2, failed
    runs of a sweep exit with 1, Ctrl-C prints one line and exits with 130."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunsFailed as failed:
        print(failed, file=sys.stderr)
        sys.exit(1)
    except RunInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Device and precision options of every script."""
    parser.add_argument("--device", default=default_device(),
                        help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="autocast precision: fp16 or bf16 on CUDA, bf16 on CPUs with bf16 "
                        "matrix units (default: bf16 on CUDA and on such CPUs, else fp32)")


def flag(name: str) -> str:
    """The command-line spelling of a field: `num_particles` -> `--num-particles`."""
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type,
                         defaults: dict | None = None, help_values: dict | None = None) -> None:
    """One option per field of `config_class`, help and choices from the field's metadata:
    `--field-name VALUE` (str, int, float; `none` for an optional field's default),
    `--flag/--no-flag` (bool), `--field-name A B ...` (list), and the repeatable
    `--set KEY=VALUE` for the dict field. `defaults` overrides the dataclass defaults (a
    `--config` file's values); `help_values` fills `{name}` placeholders of the help texts."""
    defaults = defaults or {}
    for item in fields(config_class):
        kind, _ = field_type(config_class, item.name)
        default = defaults.get(item.name, field_default(item))
        text = item.metadata.get("help", "").format(**(help_values or {})).replace("%", "%%")
        if kind is dict:
            parser.add_argument("--set", dest=item.name, action="append", default=[],
                                metavar="KEY=VALUE", help=text)
            continue
        if kind is bool:
            parser.add_argument(flag(item.name), action=argparse.BooleanOptionalAction,
                                default=default, help=text)
            continue
        if default is not None and "default" not in text and kind is not list:
            text += " (default: %(default)s)"

        def parse(value: str, name: str = item.name) -> Any:
            try:
                return parse_field_value(config_class, name, value)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None

        if kind is list:
            parser.add_argument(flag(item.name), nargs="*", default=default,
                                metavar=item.name.upper(), help=text)
        else:
            parser.add_argument(flag(item.name), type=parse, default=default, help=text,
                                choices=item.metadata.get("choices"))


def config_from_arguments(arguments: argparse.Namespace, config_class: type,
                          defaults: dict | None = None) -> Any:
    """The `config_class` of parsed `add_config_arguments` options; the dict field is the
    default's (a `--config` file's) entries updated by the `--set` pairs."""
    values = {}
    for item in fields(config_class):
        value = getattr(arguments, item.name)
        if field_type(config_class, item.name)[0] is dict:
            value = {**(defaults or {}).get(item.name, {}), **parse_options(value)}
        values[item.name] = value
    return config_class(**values)


def read_config_file(path: str | Path, config_class: Any) -> dict:
    """The field values of a saved configuration (a run folder's config.json, or the folder),
    checked: unknown keys, values of the wrong type, a missing or damaged file are UserErrors.

    config.json holds resolved values; an optional field whose saved value is what its default
    resolves to (eval_seed = seed, the dataset's epochs, the default run folder) is returned as
    None again, so that e.g. `--config FILE --seed 2` also moves eval_seed and the folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    what = ("a run's options (config.json of a run folder, as svi_train.py writes it); pass "
            "the config.json of a finished or started run")
    saved = read_json(path, what)
    names = [item.name for item in fields(config_class)]
    unknown = sorted(set(saved) - set(names))
    if unknown:
        raise UserError(
            f"{path} has keys that are not options of this version of bayesprompt: "
            f"{', '.join(unknown)} (a config written by another version?). Remove them from a "
            f"copy of the file and pass that. Known options: {', '.join(names)}.")
    try:
        values = {name: check_field_value(config_class, name, value)
                  for name, value in saved.items()}
    except ValueError as error:
        raise UserError(f"{path}: {error}. Fix the value in a copy of the file, or give the "
                        "option on the command line.") from None
    for name, value in list(values.items()):
        if value is not None and field_type(config_class, name)[1]:
            resolved = config_class(**{**values, name: None}).resolved()
            if asdict(resolved)[name] == value:
                values[name] = None
    return values
