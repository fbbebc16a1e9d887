"""Command-line plumbing shared by the scripts in experiments/."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

from bayesprompt.errors import RunInterrupted, UserError

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
    """Run `main`; a UserError (or bad arguments) prints one paragraph and exits with 2, Ctrl-C
    prints one line and exits with 130."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
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
