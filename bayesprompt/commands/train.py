"""Train a prompt model by SVI on the base classes and evaluate base and new classes.

    python experiments/svi_train.py --dataset eurosat --root ~/data --model vpt_cond

Data-parallel on N GPUs (--batch-size is the global batch, split across the processes):

    torchrun --nproc_per_node N experiments/svi_train.py --dataset eurosat --batch-size 16 ...
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from bayesprompt.cli import add_common_arguments, default_precision, parse_options, run_main
from bayesprompt.data.datasets import known_datasets
from bayesprompt.data.splits import SUBSAMPLES
from bayesprompt.distributed import process_group
from bayesprompt.infer import OBJECTIVES
from bayesprompt.runs import RunConfig, known_models, summary_line, train_and_evaluate

DEFAULTS = RunConfig()


def parse_args(argv: list[str] | None) -> tuple[RunConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=DEFAULTS.dataset,
                        help=f"one of {', '.join(known_datasets())}, or a dataset folder")
    parser.add_argument("--root", default=DEFAULTS.root, help="folder holding the datasets")
    parser.add_argument("--model", default=DEFAULTS.model,
                        help=f"one of {', '.join(known_models())}, or a model file path")
    parser.add_argument("--backbone", default=DEFAULTS.backbone,
                        help="open_clip model name or model-config JSON file")
    parser.add_argument("--pretrained", default=DEFAULTS.pretrained,
                        help="open_clip pretrained tag or checkpoint file ('' for random init; "
                        "default: MiniCLIP's own weights, none for other backbones)")
    parser.add_argument("--shots", type=int, default=DEFAULTS.shots,
                        help="images per class (0: all)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--subsample", default=DEFAULTS.subsample, choices=SUBSAMPLES[:2],
                        help="train on the base half of the classes, or on all")
    parser.add_argument("--epochs", type=int, help="default: the dataset's reference value")
    parser.add_argument("--num-particles", type=int,
                        help="Monte Carlo samples L (default: the dataset's reference value)")
    parser.add_argument("--batch-size", type=int,
                        help="images per SVI step (default: the dataset's; reference: 1)")
    parser.add_argument("--objective", default=DEFAULTS.objective, choices=OBJECTIVES)
    parser.add_argument("--lr", type=float,
                        help="SGD learning rate (default: the dataset's; reference: 0.002)")
    parser.add_argument("--views", type=int, default=DEFAULTS.views,
                        help="cached augmented views per training image (0: no augmentation)")
    parser.add_argument("--crop-min-scale", type=float,
                        help="smallest random crop, fraction of the area (reference: 0.08)")
    parser.add_argument("--n-ctx", type=int, default=DEFAULTS.n_ctx)
    parser.add_argument("--ctx-init", default=DEFAULTS.ctx_init,
                        help="words that initialise the context ('' for N(0, 0.02))")
    parser.add_argument("--kl-weight", type=float, default=DEFAULTS.kl_weight)
    parser.add_argument("--prior-scale", type=float, default=DEFAULTS.prior_scale,
                        help="scale of the N(0, s^2 I) prior of point-estimate contexts")
    parser.add_argument("--residual-scale", type=float,
                        help="residual = s * r, r ~ N(0, I), in vpt models (default 0.02, a token "
                        "embedding's scale; the reference: 1 with --objective paper)")
    parser.add_argument("--set", dest="options", action="append", default=[],
                        metavar="KEY=VALUE", help="a model file's own option (repeatable)")
    parser.add_argument("--eval-on", nargs="+", default=[], metavar="DATASET",
                        help="also evaluate on these datasets, all their classes (cross-dataset "
                        "transfer, domain generalisation; use with --subsample all)")
    parser.add_argument("--eval-batch-size", type=int, default=DEFAULTS.eval_batch_size,
                        help="most test images per forward pass, fewer when their S x C prompts "
                        "exceed the text memory budget (does not change the accuracy)")
    parser.add_argument("--eval-samples", type=int,
                        help="posterior draws S of the evaluation (default: --num-particles)")
    parser.add_argument("--eval-seed", type=int,
                        help="seed of the evaluation's posterior draws (default: --seed)")
    parser.add_argument("--prompt-chunk", type=int,
                        help="prompts the text tower encodes at once (default: as many as fit "
                        "--text-memory-gb); with gradients, chunks are recomputed in backward")
    parser.add_argument("--text-memory-gb", type=float,
                        help="memory budget of prompt encoding (default: a quarter of the free "
                        "RAM on the CPU, half the free GPU memory on CUDA)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute each text-tower layer in the backward pass (less memory, "
                        "more time)")
    parser.add_argument("--loader-workers", type=int,
                        help="processes that decode images for the feature cache (default: "
                        "min(4, CPU cores); 0: this process); features do not depend on it")
    parser.add_argument("--cache-dir", default=DEFAULTS.cache_dir,
                        help="feature and few-shot cache")
    parser.add_argument("--out", help="run folder (default: runs/DATASET/MODEL/...)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint")
    add_common_arguments(parser)
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    args["options"] = parse_options(args["options"])
    if args["precision"] is None:
        args["precision"] = default_precision(args["device"])
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in args.items() if k in known}), resume


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
