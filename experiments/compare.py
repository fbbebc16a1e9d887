"""Train several models over several seeds and print one table of base, new and harmonic mean.

    python experiments/compare.py --models zeroshot coop cocoop vpt vpt_cond --seeds 1 2 3
    python experiments/compare.py --models e2mim --variant no-mi:mi_weight=0 --batch-size 16

Every run is an ordinary run folder under --out (existing results are reused, so an
interrupted comparison continues where it stopped). Each --variant NAME:KEY=VALUE,... adds rows
of the same models with those `--set` options. The table (mean and standard deviation over
seeds) is printed and written as Markdown to --out/table.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bayesprompt.cli import add_common_arguments, default_precision, parse_options, run_main
from bayesprompt.runs import RunConfig, train_and_evaluate

DEFAULTS = RunConfig()
METRICS = ("base_acc", "new_acc", "hm")


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, options)."""
    name, _, pairs = text.partition(":")
    return name, parse_options([p for p in pairs.split(",") if p])


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zeroshot", "coop", "vpt_cond"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variant", action="append", default=[], type=parse_variant,
                        metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--dataset", default=DEFAULTS.dataset)
    parser.add_argument("--root", default=DEFAULTS.root)
    parser.add_argument("--backbone", default=DEFAULTS.backbone)
    parser.add_argument("--pretrained", default=DEFAULTS.pretrained)
    parser.add_argument("--shots", type=int, default=DEFAULTS.shots)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-particles", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--cache-dir", default=DEFAULTS.cache_dir)
    parser.add_argument("--out", default="runs/compare")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    precision = args.precision or default_precision(args.device)
    rows = [(model, "", {}) for model in args.models]
    rows += [(model, name, options) for name, options in args.variant for model in args.models]

    table = ["| model | variant | base | new | HM | train s |", "|---|---|---|---|---|---|"]
    for model, variant, options in rows:
        collected: dict[str, list[float]] = {key: [] for key in (*METRICS, "train_seconds")}
        for seed in args.seeds:
            out = Path(args.out) / args.dataset / f"{model}{'-' + variant if variant else ''}"
            out = out / f"seed{seed}"
            if not (out / "results.json").is_file():
                config = RunConfig(
                    dataset=args.dataset, root=args.root, model=model, backbone=args.backbone,
                    pretrained=args.pretrained or None, shots=args.shots, seed=seed,
                    epochs=args.epochs, num_particles=args.num_particles,
                    batch_size=args.batch_size, options=options, device=args.device,
                    precision=precision, cache_dir=args.cache_dir, out=str(out))
                train_and_evaluate(config, resume=True)
            results = json.loads((out / "results.json").read_text())
            for key in collected:
                if results.get(key) is not None:
                    collected[key].append(results[key])
        cells = [mean_std(collected[key]) for key in METRICS]
        seconds = statistics.mean(collected["train_seconds"])
        table.append(f"| {model} | {variant or '-'} | {' | '.join(cells)} | {seconds:.0f} |")
        print(table[-1], flush=True)
    text = (f"{args.dataset}, {args.shots} shots, seeds {args.seeds}, mean ± std (percent)\n\n"
            + "\n".join(table) + "\n")
    Path(args.out, args.dataset).mkdir(parents=True, exist_ok=True)
    Path(args.out, args.dataset, "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_main(main)
