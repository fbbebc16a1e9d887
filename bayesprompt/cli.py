"""Command-line plumbing shared by the scripts in experiments/."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

from bayesprompt.errors import UserError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    """Run `main`; a UserError (or bad arguments) prints one paragraph and exits with 2."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Device and precision options of every script."""
    parser.add_argument("--device", default=default_device(),
                        help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="autocast precision: fp16 or bf16 on CUDA, bf16 on CPUs with bf16 "
                        "matrix units (default: bf16 on CUDA, fp32 on CPU)")
