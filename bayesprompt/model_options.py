"""Numeric `--set KEY=VALUE` options of a model file, checked in one place."""

from __future__ import annotations

from bayesprompt.errors import UserError


def numeric_options(model: str, options: dict, defaults: dict[str, float | int],
                    minimum: dict[str, float | int]) -> dict[str, float | int]:
    """`defaults` updated by `options`: each value of the default's type (an int is a float
    too) and at least its `minimum`; anything else is a UserError naming the option."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UserError(f"Unknown {model} option(s) {unknown}; known: {', '.join(defaults)}.")
    values = dict(defaults)
    for key, value in options.items():
        kind = type(defaults[key])
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float
                                                     else int):
            raise UserError(f"--set {key}= expects a {kind.__name__} for {model}, got "
                            f"{value!r}.")
        if value < minimum[key]:
            raise UserError(f"--set {key}= must be at least {minimum[key]} for {model}, got "
                            f"{value!r}.")
        values[key] = kind(value)
    return values
