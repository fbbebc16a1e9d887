"""Posterior diagnostics of a trained run: samples, metrics and figures into RUN_DIR/analysis/.

    python experiments/analyze.py runs/miniworld/vpt_cond/base_shots16_seed1 --num-samples 50 \
        --domains miniworld_sketch

Writes posterior_<split>.nc (ArviZ InferenceData of each test split, and of the training
images: posterior_train.nc, for az.loo), metrics.json and PNG figures; see docs/ANALYSIS.md for
what they mean.

Several runs side by side (run folders, or ensemble folders of benchmark.py --ensemble):

    python experiments/analyze.py RUN_A RUN_B ENSEMBLE_C --out DIR [--splits base new]

writes DIR/risk_coverage_<split>.png and DIR/reliability_<split>.png (analysis/compare.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesprompt.analysis.report import summary_lines, write_analysis
from bayesprompt.api import Run
from bayesprompt.commands.cli import run_main
from bayesprompt.errors import UserError
from bayesprompt.files import write_json
from bayesprompt.runs.lock import RunFolderLock
from bayesprompt.runs.posterior_check import guide_khat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="+",
                        help="a run folder written by svi_train.py; several (or ensemble "
                        "folders) to compare them (needs --out)")
    parser.add_argument("--splits", nargs="+", default=["base", "new"],
                        help="splits of the comparison (default: base new)")
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
    if len(args.run_dir) > 1:
        compare(args)
        return
    run_dir = args.run_dir[0]
    run = Run.load(run_dir, args.device, args.model, args.trust_model_file)
    posterior = run.posterior(args.num_samples, domains=args.domains, seed=args.seed)
    with RunFolderLock() as lock:
        if args.out is None:  # RUN_DIR/analysis: a write to the run folder
            lock.hold(run_dir)
        metrics = write_analysis(posterior, args.out)
        metrics["khat"] = guide_khat(run)  # the guide as importance proposal (Yao et al., 2018)
        write_json(Path(args.out or run_dir / "analysis") / "metrics.json", metrics)
    print("\n".join(summary_lines(metrics)))
    if metrics["khat"] is not None:
        print("Pareto k-hat of the guide (> 0.7: not a usable importance proposal): "
              + "  ".join(f"{site} {value:.2f}" for site, value in metrics["khat"].items()))
    print(f"wrote {args.out or run_dir / 'analysis'}")


def compare(args: argparse.Namespace) -> None:
    """Several runs (or ensembles) side by side: analysis/compare.py."""
    from bayesprompt.analysis.compare import compare_runs
    from bayesprompt.runs.ensemble import Ensemble
    if args.out is None:
        raise UserError("Comparing several runs needs --out DIR for the figures.")
    if args.num_samples is not None or args.seed is not None or args.domains:
        raise UserError("--num-samples, --seed and --domains are options of one run's "
                        "analysis; a comparison uses each run's own draws (results.json's).")
    runs = {}
    for folder in args.run_dir:
        label = f"{folder.resolve().parent.name}/{folder.resolve().name}"
        is_run = (folder / "config.json").is_file()
        runs[label] = Run.load(folder, args.device, args.model, args.trust_model_file) \
            if is_run else \
            Ensemble.load_folder(folder, args.device)
    summary = compare_runs(runs, args.splits, args.out)
    for split, rows in summary.items():
        for label, row in rows.items():
            aurcs = "  ".join(f"AURC {k} {v:.3f}" for k, v in row["aurc"].items())
            print(f"{split:>6} {label}: accuracy {100 * row['accuracy']:.1f}%  "
                  f"ECE {row['ece']:.3f}  {aurcs}")
    print(f"wrote {args.out}")


def cli() -> None:
    """The console script."""
    run_main(main)
