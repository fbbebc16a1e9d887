"""Command-line plumbing shared by the scripts in experiments/: exit codes, the device and
precision defaults, and the options generated from a configuration dataclass (RunConfig): one
flag per field, `--config FILE` defaults, and the KEY=VALUE syntax of sweeps."""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch

from bayesprompt.errors import RunInterrupted, RunsFailed, UserError
from bayesprompt.files import read_json

#: The exit code of a process stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN runs bf16 matrix products natively here (AVX512-BF16 or AMX)."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def default_precision(device: str) -> str:
    """bf16 on CUDA and on CPUs with bf16 matrix units (1.5-2.5x faster, same accuracy on the
    offline world; README, "Speed and memory"), else fp32."""
    if device.startswith("cuda") or (device == "cpu" and cpu_has_bf16_matmul()):
        return "bf16"
    return "fp32"


def parse_options(pairs: list[str]) -> dict:
    """['key=value', ...] -> {key: value}, values read as JSON when they parse (1, 0.5, true)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got '{pair}'.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


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


#: How a list field is written as one KEY=VALUE value (sweeps): items joined by '+'.
LIST_SEPARATOR = "+"
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
#: Words an optional field's value may be to mean None, its default.
NONE_WORDS = ("none", "null")
DESCRIBED = {str: "text", int: "an integer", float: "a number",
             bool: f"true or false ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})",
             list: f"a list, items joined by '{LIST_SEPARATOR}' (empty for none)",
             dict: "KEY=VALUE pairs"}


def field_type(config_class: type, name: str) -> tuple[type, bool]:
    """The base type of a dataclass field (str, int, float, bool, list or dict) and whether
    it is optional (`X | None`)."""
    annotation = get_type_hints(config_class)[name]
    kinds = get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kind = next(k for k in kinds if k is not type(None))
    kind = get_origin(kind) or kind
    if kind not in DESCRIBED:
        raise TypeError(f"{config_class.__name__}.{name}: {annotation} has no command-line form")
    return kind, type(None) in kinds


def parse_field_value(config_class: type, name: str, text: str) -> Any:
    """The text of a field's value (a flag's argument, a sweep's KEY=VALUE) as the field's
    type; ValueError with a one-line description when it is not one."""
    kind, optional = field_type(config_class, name)
    if optional and text.lower() in NONE_WORDS:
        return None
    try:
        if kind is bool:
            if text.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError
            return text.lower() in TRUE_WORDS
        if kind is list:
            return text.split(LIST_SEPARATOR) if text else []
        if kind is dict:
            raise ValueError
        return kind(text)
    except ValueError:
        default = " (or none, for the default)" if optional else ""
        raise ValueError(f"{name} takes {DESCRIBED[kind]}{default}, not '{text}'") from None


def check_field_value(config_class: type, name: str, value: Any) -> Any:
    """A JSON value of a field (from a config file), checked against the field's type; ints
    are accepted for floats. ValueError when it does not fit."""
    kind, optional = field_type(config_class, name)
    if value is None and optional:
        return value
    fits = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            list: lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v)}
    if not fits.get(kind, lambda v: isinstance(v, kind))(value):
        raise ValueError(f"{name} takes {'a list of text' if kind is list else DESCRIBED[kind]}"
                         f"{' or null' if optional else ''}, not {json.dumps(value)}")
    return float(value) if kind is float else value


def field_default(item: Field) -> Any:
    return item.default_factory() if item.default is MISSING else item.default


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
