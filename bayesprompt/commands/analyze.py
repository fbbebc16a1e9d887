"""Posterior diagnostics of a trained run: samples, metrics and figures into RUN_DIR/analysis/.

    python experiments/analyze.py runs/miniworld/vpt_cond/base_shots16_seed1 --num-samples 50 \
        --domains miniworld_sketch

Writes posterior_<split>.nc (ArviZ InferenceData), metrics.json and PNG figures; see
docs/ANALYSIS.md for what they mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesprompt.analysis.report import summary_lines, write_analysis
from bayesprompt.api import Run
from bayesprompt.cli import run_main
from bayesprompt.run_lock import RunFolderLock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by svi_train.py")
    parser.add_argument("--num-samples", type=int,
                        help="posterior samples S per test image (default: the run's "
                        "eval_samples, so that accuracies equal results.json's)")
    parser.add_argument("--seed", type=int,
                        help="seed of the posterior draws (default: the run's eval_seed)")
    parser.add_argument("--domains", nargs="*", default=[], metavar="DATASET",
                        help="datasets with the run's classes under a domain shift, "
                             "e.g. miniworld_sketch")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the run's)")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/analysis)")
    parser.add_argument("--model", metavar="PATH",
                        help="the model file (.py) of a run trained with one: its code is "
                        "imported (default: a built-in model by the name config.json gives)")
    parser.add_argument("--trust-model-file", action="store_true",
                        help="import the model file that the run's config.json names "
                        "(README, Security)")
    args = parser.parse_args(argv)
    run = Run.load(args.run_dir, args.device, args.model, args.trust_model_file)
    posterior = run.posterior(args.num_samples, domains=args.domains, seed=args.seed)
    with RunFolderLock() as lock:
        if args.out is None:  # RUN_DIR/analysis: a write to the run folder
            lock.hold(args.run_dir)
        metrics = write_analysis(posterior, args.out)
    print("\n".join(summary_lines(metrics)))
    print(f"wrote {args.out or args.run_dir / 'analysis'}")


def cli() -> None:
    """The console script."""
    run_main(main)
