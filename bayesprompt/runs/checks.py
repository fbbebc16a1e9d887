"""Checks of what a caller hands the Python API (`bayesprompt.api`): one UserError that says
what was expected (shape, dtype, device) and what came, instead of a torch or Pyro error from
deep inside a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from bayesprompt.errors import UserError
from bayesprompt.options import check_field_value


def check_options(config_class: type, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Options of `config_class` checked by the code that checks a `--config` file
    (`cli.check_field_value`); unknown names and values of the wrong type are UserErrors."""
    known = [item.name for item in fields(config_class)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"Unknown option(s) {unknown} of {where}; the options are the fields "
                        f"of {config_class.__name__}: {', '.join(sorted(known))}.")
    try:
        return {name: check_field_value(config_class, name, value)
                for name, value in options.items()}
    except ValueError as error:
        raise UserError(f"Bad option of {where}: {error}.") from None


def image_features(values: Any, width: int, device: torch.device | str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Image features (N, `width`) as a float tensor on `device`: a float torch tensor or
    NumPy array of any float dtype is cast; integer, wrong-shaped or non-finite input is
    refused with a UserError."""
    expected = (f"expected image features of shape (N, {width}) with a floating-point dtype "
                f"(they are cast to {str(dtype).removeprefix('torch.')} on {device}), e.g. "
                "from run.test_features(split) or run.image_features(images)")
    if isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.floating):
            raise UserError(f"Bad image features: a NumPy array of dtype {values.dtype}; "
                            f"{expected}.")
        values = torch.from_numpy(values)
    if not isinstance(values, torch.Tensor):
        raise UserError(f"Bad image features: a {type(values).__name__}; {expected}.")
    if not values.is_floating_point():
        raise UserError(f"Bad image features: a tensor of dtype "
                        f"{str(values.dtype).removeprefix('torch.')}; {expected}.")
    if values.dim() != 2 or values.shape[1] != width or values.shape[0] == 0:
        raise UserError(f"Bad image features: shape {tuple(values.shape)}; {expected}.")
    if not bool(torch.isfinite(values).all()):
        raise UserError(f"Bad image features: they hold NaN or infinite values; {expected}.")
    return values.to(device=device, dtype=dtype)


def class_names(classnames: Sequence[str]) -> list[str]:
    """A non-empty list of class names (text), or a UserError."""
    if isinstance(classnames, str):
        raise UserError(f"set_classes takes a list of class names, not the text {classnames!r}.")
    names = list(classnames)
    if not names:
        raise UserError("set_classes takes at least one class name, got an empty list.")
    bad = [name for name in names if not isinstance(name, str) or not name.strip()]
    if bad:
        raise UserError(f"set_classes takes class names as non-empty text, got {bad!r}.")
    return names


def num_samples(value: int, stochastic: bool, model: str) -> int:
    """Posterior draws S: 1 or more, and 1 for a point-estimate model (its draws would all be
    the same)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise UserError(f"num_samples must be 1 or more (an integer), got {value!r}.")
    if not stochastic and value != 1:
        raise UserError(f"{model} is a point-estimate model: it has one draw of its prompts, "
                        f"so num_samples must be 1 (or None), got {value}.")
    return int(value)
