"""Typed option values: the text of a flag or a KEY=VALUE pair, or a JSON value from a config
file, read as a dataclass field's type (str, int, float, bool, list, dict) with one clear
message when it is not one. Shared by the command line, `--config`, sweeps, `fit(**options)`
and model files' own options (e.g. E2MIM's)."""

from __future__ import annotations

import json
import math
import types
from dataclasses import MISSING, Field, make_dataclass
from typing import Any, get_args, get_origin, get_type_hints

from bayesprompt.errors import UserError


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
    if kind is float and not _finite(value):
        raise ValueError(f"{name}= must be a finite number, not {value!r}")
    fits = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            list: lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v)}
    if not fits.get(kind, lambda v: isinstance(v, kind))(value):
        raise ValueError(f"{name} takes {'a list of text' if kind is list else DESCRIBED[kind]}"
                         f"{' or null' if optional else ''}, not {json.dumps(value)}")
    return float(value) if kind is float else value


def _finite(value: Any) -> bool:
    """False for a number, or the text of one ('nan', '-inf'), that is not finite (an integer
    beyond float's range included); True for anything else (its type is checked apart)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return True
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
    except ValueError:
        return True


def field_default(item: Field) -> Any:
    return item.default_factory() if item.default is MISSING else item.default


def numeric_options(model: str, options: dict, defaults: dict[str, float | int],
                    minimum: dict[str, float | int]) -> dict[str, float | int]:
    """A model file's numeric `--set KEY=VALUE` options: `defaults` updated by `options`, each
    value checked against its default's type (`check_field_value`; an int is a float too)
    and at least its `minimum`. Anything else is a UserError naming the option."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UserError(f"Unknown {model} option(s) {unknown}; known: {', '.join(defaults)}.")
    schema = make_dataclass(f"{model}_options", [(k, type(v), v) for k, v in defaults.items()])
    values = dict(defaults)
    for key, value in options.items():
        try:
            values[key] = check_field_value(schema, key, value)
        except ValueError as error:
            raise UserError(f"--set {error} ({model}).") from None
        if values[key] < minimum[key]:
            raise UserError(f"--set {key}= must be at least {minimum[key]} for {model}, got "
                            f"{value!r}.")
    return values
