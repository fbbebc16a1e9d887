"""Is a run's guide a posterior? Check it against a gold standard.

    bayesprompt-check-posterior runs/miniworld/vpt/base_shots16_seed1

Global latents (vpt's r): NUTS on the exact log density the training objective approximates
(every cached training view, the training's plate scaling, fp32), given the learned prompts.
Per-image latents (vpt_cond's r_i): exact posteriors of random training images by importance
sampling, and the amortization gap. Writes RUN/posterior_check/posterior_check.json and
posterior_check.png and prints a summary; see README, "Is the posterior a posterior?".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesprompt.api import Run
from bayesprompt.commands.cli import run_main
from bayesprompt.runs.posterior_check import CheckOptions, summary_lines


def main(argv: list[str] | None = None) -> None:
    defaults = CheckOptions()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder written by svi_train.py")
    parser.add_argument("--chains", type=int, default=defaults.chains,
                        help="NUTS chains (2 or more; default %(default)s)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup,
                        help="NUTS warm-up iterations per chain (default %(default)s)")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help="NUTS draws per chain (default %(default)s)")
    parser.add_argument("--images", type=int, default=defaults.images,
                        help="training images whose per-image posterior is computed "
                        "(per-image latents; default %(default)s)")
    parser.add_argument("--draws", type=int, default=defaults.draws,
                        help="importance draws per image (default %(default)s)")
    parser.add_argument("--khat-draws", type=int, default=defaults.khat_draws,
                        help="guide draws for the global Pareto k-hat (default %(default)s)")
    parser.add_argument("--predictive-samples", type=int, default=defaults.predictive_samples,
                        help="draws S of each predictive (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of every random choice (default %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the run's)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: RUN_DIR/posterior_check)")
    args = parser.parse_args(argv)
    options = CheckOptions(args.chains, args.warmup, args.samples, args.images, args.draws,
                           args.khat_draws, args.predictive_samples, args.seed)
    options.check()
    run = Run.load(args.run_dir, args.device)
    result = run.check_posterior(options, args.out)
    print("\n".join(summary_lines(result)))
    print(f"wrote {args.out or args.run_dir / 'posterior_check'}")


def cli() -> None:
    """The console script."""
    run_main(main)
