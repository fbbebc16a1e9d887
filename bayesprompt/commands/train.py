"""Train a prompt model by SVI on the base classes and evaluate base and new classes.

    python experiments/svi_train.py --dataset eurosat --root ~/data --model vpt_cond

Data-parallel on N GPUs (--batch-size is the global batch, split across the processes):

    torchrun --nproc_per_node N experiments/svi_train.py --dataset eurosat --batch-size 16 ...

Re-run a saved run, with some options changed:

    python experiments/svi_train.py --config runs/eurosat/vpt_cond/base_shots16_seed1/config.json \\
        --seed 2

Every field of RunConfig (bayesprompt/runs/config.py) is an option: --field-name VALUE
(`none` for an optional field's default), --flag/--no-flag, --list-field A B ..., --set
KEY=VALUE for a model file's own options.
"""

from __future__ import annotations

import argparse

from bayesprompt.commands.cli import (
    add_config_arguments,
    config_from_arguments,
    read_config_file,
    run_main,
)
from bayesprompt.data.datasets import known_datasets
from bayesprompt.distributed import process_group
from bayesprompt.runs.config import RunConfig, default_device, default_precision
from bayesprompt.runs.evaluate import summary_line
from bayesprompt.runs.model_files import known_models
from bayesprompt.runs.train import train_and_evaluate
from bayesprompt.runs.trust import config_folder, model_to_load


def parse_args(argv: list[str] | None) -> tuple[RunConfig, bool]:
    """The run configuration and --resume. Every RunConfig field is an option
    (`bayesprompt.cli.add_config_arguments`); `--config FILE` makes a saved run's options the
    defaults, which the other flags override."""
    config_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("--config")
    config_parser.add_argument("--model")
    config_parser.add_argument("--trust-model-file", action="store_true")
    early = config_parser.parse_known_args(argv)[0]
    config_file = early.config
    saved = read_config_file(config_file, RunConfig) if config_file else {}
    if "model" in saved and early.model is None:  # the file's model file runs only if trusted
        saved["model"] = model_to_load(config_folder(config_file), saved["model"], None,
                                       early.trust_model_file)
    defaults = {"device": default_device(), "precision": None, **saved}

    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="CONFIG_JSON",
                        help="re-run a saved run: its config.json (or run folder) gives the "
                        "defaults of every option, the flags given here override them "
                        "(options equal to their default there, e.g. --eval-seed = --seed or "
                        "the default --out, follow the flags again)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint")
    parser.add_argument("--trust-model-file", action="store_true",
                        help="with --config: import the model file (.py) that the config "
                        "names; without it, only a built-in model or an explicit --model PATH "
                        "is imported (README, Security)")
    add_config_arguments(parser, RunConfig, defaults,
                         {"datasets": ", ".join(known_datasets()),
                          "models": ", ".join(known_models())})
    arguments = parser.parse_args(argv)
    config = config_from_arguments(arguments, RunConfig, defaults)
    if config.precision is None:
        config.precision = default_precision(config.device)
    return config, arguments.resume


def main(argv: list[str] | None = None) -> None:
    config, resume = parse_args(argv)
    with process_group(config.device):
        results = train_and_evaluate(config, resume=resume)
    if results is None:  # a rank other than 0 of a torchrun job
        return
    for name, accuracy in results["transfer_acc"].items():
        print(f"{name}: {accuracy:.2f}%")
    print(summary_line(results))


def cli() -> None:
    """The console script."""
    run_main(main)
