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
from typing import Any

from bayesprompt.api import Run
from bayesprompt.commands.cli import run_main
from bayesprompt.runs.posterior_check import CheckOptions


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The console summary of a check."""
    lines = [f"posterior check of {result['run_dir']} ({result['model']}, residual scale "
             f"{result['residual_scale']}, {result['seconds']:.0f} s)"]
    if result["nuts"]:
        n = result["nuts"]
        lines.append(f"NUTS: {n['chains']} chains x ({n['warmup']} + {n['samples']}), r_hat max "
                     f"{n['rhat_max']:.3f}, ESS bulk/tail min {n['ess_bulk_min']:.0f}/"
                     f"{n['ess_tail_min']:.0f}: "
                     f"{'converged' if n['converged'] else 'NOT CONVERGED'}")
        lines.append(f"ELBO of the global sites (nats, same draws): guide {n['elbo_guide']:.2f}, "
                     f"diagonal fit of NUTS {n['elbo_gold_fit']:.2f} (standard error "
                     f"{n['elbo_standard_error']:.2f}); the higher is the closer to the "
                     "posterior in KL")
    for site, r in result["sites"].items():
        sd = r["sd_ratio"]
        lines.append(f"site {site} ({r['method']}): contraction (gold sd / prior sd) median "
                     f"{r['contraction']['median']:.3f}; KL(guide || gold) "
                     f"{r['kl_guide_gold']:.2f} nats; sd ratio {sd['median']:.2f} "
                     f"[{sd['p5']:.2f}, {sd['p95']:.2f}]; mean error {r['mean_error']['rms']:.2f}"
                     f" gold sd; KL(gold || prior) {r['kl_gold_prior']:.2f}; k-hat "
                     f"{r['khat']:.2f}")
        if "amortization_gap" in r:
            lines.append(f"  {r['images']} images: log p(y|x) {r['log_evidence']:.3f}, ELBO "
                         f"guide {r['elbo_guide']:.3f}, gold fit {r['elbo_gold_fit']:.3f}; "
                         f"inference gap {r['inference_gap']:.3f}, amortization gap "
                         f"{r['amortization_gap']:.3f} nats per image")
    lines.append("predictive     base    new     NLL    ECE    MI AUROC")
    for source, m in result["predictive"].items():
        cells = [("n/a" if m.get(key) is None else f"{m[key]:.{digits}f}").rjust(6)
                 for key, digits in (("base", 2), ("new", 2), ("nll", 3), ("ece", 3),
                                     ("mi_auroc", 3))]
        lines.append(f"  {source:<10} {' '.join(cells)}")
    lines += [f"note: {note}" for note in result["notes"]]
    lines += [f"WARNING: {warning}" for warning in result["warnings"]]
    return lines


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
