"""The seed papers' tables from one command: base-to-new, cross-dataset, domain generalisation.

    python experiments/benchmark.py --protocol base2new
    python experiments/benchmark.py --protocol cross_dataset
    python experiments/benchmark.py --protocol domain_generalization
    python experiments/benchmark.py --protocol base2new --models coop vpt_cond --seeds 1 2 3 \\
        --set epochs=20 --variant paper:model=vpt_cond,objective=paper,residual_scale=1 \\
        --variant no-mi:model=e2mim,options.mi_weight=0

Protocols (the layouts of CoOp, CoCoOp and Bayesian Prompt Learning):
  base2new               train on the base half of the classes, test base and new classes:
                         base, new, HM per dataset and their average over the datasets; HM is
                         the harmonic mean of the seed-averaged base and new accuracies. Also
                         ECE and NLL on the new classes and the AUROC of the mutual information
                         for new vs base images (n/a for point-estimate models).
  cross_dataset          --datasets SOURCE TARGET...: train on all classes of the source, test
                         on each target: source, targets and the average over the targets.
  domain_generalization  --datasets SOURCE VARIANT...: the same on the source's domain variants.
  grid                   --grid KEY=V1,V2... (repeatable): every combination of the axes, the
                         other fields from --set (dataset, model, seed too); one table line
                         per run with its axis values and its results.json metrics.
    python experiments/benchmark.py --protocol grid --grid lr=0.001,0.002 --grid seed=1,2 \\
        --set dataset=eurosat --set root=~/data
Without --datasets, the offline world's (bayesprompt.world.downstream.BENCHMARK_DEFAULTS).

Runs are ordinary run folders, DIR/DATASET/MODEL[-VARIANT]/seedS (grid: DIR/KEY=VALUE,...). A
finished run is reused only when its config.json equals the requested configuration (but for
its folder); an interrupted one resumes from its checkpoint; a folder holding a run with other
options is an error. Writes DIR/table.md, DIR/table.csv, DIR/table.json and the bar plot
DIR/table.png (mean ± sample std over seeds).

Sweeps (bayesprompt/sweep.py, on submitit): --executor local (default) runs at most --workers
runs at once on this machine (default: one per visible GPU, each pinned to its GPU; 1 on the
CPU); --executor slurm --partition P submits one SLURM job array and returns: run the same
command again when the jobs have finished to write the table; --executor none runs them here,
one after another. Logs of the jobs: DIR/submitit/. A failed run is reported with its log, the
table marks it, the command exits with 1; running it again resumes the sweep.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
from pathlib import Path

from tqdm.auto import tqdm

from bayesprompt.analysis.plots import plot_grouped_bars
from bayesprompt.commands.cli import add_common_arguments, run_main
from bayesprompt.data.datasets import load_dataset
from bayesprompt.errors import RunsFailed, UserError
from bayesprompt.files import make_folder, write_json, write_text
from bayesprompt.runs.config import RunConfig, default_device, default_precision
from bayesprompt.runs.model_files import load_model_class
from bayesprompt.runs.protocols import (
    DEFAULT_MODELS,
    GRID_CHOSEN,
    PROTOCOLS,
    Row,
    grid_axes,
    parse_settings,
    parse_variant,
    point_label,
    protocol_datasets,
    table_rows,
    value_text,
)
from bayesprompt.runs.sweep import (
    Outcome,
    SweepOptions,
    add_sweep_arguments,
    failure_report,
    run_sweep,
    sweep_options,
)
from bayesprompt.runs.tables import (
    GRID_COLUMNS,
    bar_panels,
    base2new_entries,
    base2new_markdown,
    csv_text,
    flat_record,
    lookup,
    markdown_table,
    show,
    transfer_entries,
    transfer_markdown,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
    parser.add_argument("--datasets", nargs="+", metavar="DATASET",
                        help="base2new: the datasets; otherwise SOURCE TARGET... (default: "
                        "the offline world's, BENCHMARK_DEFAULTS)")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help=f"model names or files (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 1 2 3")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a run-configuration field for every run (RunConfig in "
                        "bayesprompt/runs/config.py: epochs=20, batch_size=1, objective=paper, "
                        "residual_scale=1, root=..., backbone=..., pretrained=none, "
                        "grad_checkpointing=true, ...; parsed by the field's type as "
                        "svi_train.py's flags: none for an optional field's default, "
                        "true/false for a flag, items joined by '+' for a list, e.g. "
                        "eval_on=dtd+eurosat); options.KEY=VALUE sets a model file's own "
                        "option (what svi_train.py's --set sets), e.g. options.mi_weight=0. "
                        "Repeatable")
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        metavar="LABEL:KEY=VALUE[,KEY=VALUE...]",
                        help="extra rows with these settings (same keys as --set), labelled "
                        "MODEL-LABEL: for every model, or only for the one named by model=NAME")
    parser.add_argument("--grid", dest="axes", action="append", default=[],
                        metavar="KEY=VALUE[,VALUE...]",
                        help="--protocol grid: a field and its values; the runs are every "
                        "combination of the --grid axes, with the --set fields (any field, "
                        "dataset, model and seed too). Repeatable")
    parser.add_argument("--ensemble", type=int, metavar="M",
                        help="add a row MODEL-ensM per --ensemble-models model: the deep "
                        "ensemble of M runs of that model with different seeds (for seed s: s, "
                        "s + K, ..., s + (M - 1) K, K = max(seeds) - min(seeds) + 1), one "
                        "predictive with S = M")
    parser.add_argument("--ensemble-models", nargs="+", default=["coop"], metavar="MODEL",
                        help="models of the --ensemble rows, among --models (default: coop)")
    parser.add_argument("--out", help="benchmark folder (default: runs/benchmark/PROTOCOL)")
    add_common_arguments(parser)
    add_sweep_arguments(parser)
    parser.set_defaults(device=None)
    arguments = parser.parse_args(argv)
    if arguments.device is None:  # a SLURM job's GPU is not visible where it is submitted
        on_gpus = arguments.executor == "slurm" and arguments.gpus_per_job > 0
        arguments.device = "cuda" if on_gpus else default_device()
    return arguments


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def command_line(argv: list[str] | None) -> str:
    return "python experiments/benchmark.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sweep = sweep_options(args)
    if args.protocol == "grid":
        if args.ensemble is not None:
            raise UserError("--ensemble adds rows to the papers' tables; --protocol grid has "
                            "one line per run (put the members' seeds on a --grid axis).")
        grid_main(args, sweep, command_line(argv))
        return
    if args.axes:
        raise UserError("--grid sets the axes of --protocol grid; with the other protocols, "
                        "add rows with --variant LABEL:KEY=VALUE.")
    settings, options = parse_settings(args.settings, "--set")
    rows = table_rows(args.models or DEFAULT_MODELS, [parse_variant(v) for v in args.variants])
    datasets = protocol_datasets(args.protocol, args.datasets)
    seeds = args.seeds or [1, 2, 3]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds names a seed twice: {seeds}.")
    out = Path(args.out or Path("runs") / "benchmark" / args.protocol)
    precision = args.precision or default_precision(args.device)
    base2new = args.protocol == "base2new"
    trained_on = datasets if base2new else datasets[:1]
    root = Path(settings.get("root", RunConfig.root)).expanduser()
    for dataset in datasets:  # a missing dataset fails before any training
        load_dataset(dataset, root)

    runs = [(dataset, row, seed) for dataset in trained_on for row in rows for seed in seeds]
    ensembles = ensemble_plan(args.ensemble, args.ensemble_models, rows, seeds)
    extra = [(dataset, Row(model), member) for dataset in trained_on
             for model, members in ensembles.items() for seed in seeds
             for member in members[seed] if member not in seeds]
    configs = [RunConfig(**{**settings, **row.settings}, dataset=dataset, model=row.model,
                         seed=seed, subsample="base" if base2new else "all",
                         eval_on=[] if base2new else datasets[1:],
                         options={**options, **row.options}, device=args.device,
                         precision=precision,
                         out=str(out / Path(dataset).name / row.label / f"seed{seed}")
                         ).resolved() for dataset, row, seed in runs + extra]
    outcomes = run_sweep(configs, out, sweep, say)
    if outcomes is None:  # submitted to SLURM
        return
    results: dict[tuple[str, str], list[dict | None]] = {}
    for (dataset, row, _), outcome in zip(runs, outcomes[:len(runs)], strict=True):
        results.setdefault((dataset, row.label), []).append(outcome.results)
    finished = {config.out for config, outcome in zip(configs, outcomes, strict=True)
                if not outcome.failed}
    for model, members in ensembles.items():
        row = Row(model, f"ens{args.ensemble}")
        rows = [*rows, row]
        for dataset in trained_on:
            results[dataset, row.label] = [
                ensemble_run(out, dataset, row, seed, members[seed], finished, args.device)
                for seed in seeds]

    if base2new:
        entries = base2new_entries(results, datasets, rows)
        body = base2new_markdown(entries, datasets)
        about = ("Base-to-new generalisation; accuracy in percent, mean ± sample std over "
                 "seeds; HM from the seed-mean base and new accuracies; ECE (fraction) and NLL "
                 "(nats) of the predictive mean on new classes; AUROC of the mutual "
                 "information for new vs base test images (n/a: point-estimate model); on "
                 "new classes, AURC (area under the risk-coverage curve, max-softmax score, "
                 "lower is better) and the AUROC of telling misclassified from correct "
                 "images by max softmax probability and by mutual information (n/a: S = 1). "
                 "train s: training seconds (an ensemble: summed over its members).")
    else:
        entries = transfer_entries(results, datasets[0], datasets[1:], rows)
        body = transfer_markdown(entries, datasets[0], datasets[1:])
        kind = {"cross_dataset": "Cross-dataset transfer",
                "domain_generalization": "Domain generalisation"}[args.protocol]
        about = (f"{kind}: trained on all classes of {datasets[0]}, tested on each target; "
                 "accuracy in percent, mean ± sample std over seeds; the average over targets "
                 "is taken per seed.")
    command = command_line(argv)
    header = (f"# {args.protocol}\n\n{about}\n\nSeeds {', '.join(map(str, seeds))}; "
              f"run folders under {out}. Command:\n\n    {command}\n\n")
    make_folder(out)
    write_text(out / "table.md", header + body + "\n")
    write_text(out / "table.csv", csv_text([flat_record(e) for e in entries]))
    write_json(out / "table.json", {"protocol": args.protocol, "datasets": datasets,
                                    "seeds": seeds, "rows": [row.label for row in rows],
                                    "command": command, "entries": entries})
    plot_grouped_bars(bar_panels(entries, args.protocol, datasets), out / "table.png")
    if base2new:
        plot_new_class_risk_coverage(results, datasets, rows, out / "risk_coverage_new.png")
    print(header + body)
    raise_failures(outcomes)


def plot_new_class_risk_coverage(results: dict[tuple[str, str], list[dict | None]],
                                 datasets: list[str], rows: list[Row], path: Path) -> None:
    """Risk-coverage on new classes (max-softmax score), mean over the finished seeds, one
    panel per dataset and one line per row (bayesprompt.selective's coverage grid)."""
    from bayesprompt.analysis.compare import plot_risk_coverage
    panels = {}
    for dataset in datasets:
        curves = {}
        for row in rows:
            found = [lookup(r, "risk_coverage.new") for r in results[dataset, row.label] if r]
            found = [curve for curve in found if curve]
            if found:
                curves[row.label] = (found[0]["coverage"],
                                     [statistics.mean(values) for values in
                                      zip(*(curve["msp"] for curve in found), strict=True)])
        if curves:
            panels[f"{Path(dataset).name}, new classes (mean over seeds)"] = curves
    if panels:
        plot_risk_coverage(panels, path)


def ensemble_plan(size: int | None, models: list[str], rows: list[Row], seeds: list[int]
                  ) -> dict[str, dict[int, list[int]]]:
    """--ensemble: model -> seed -> the seeds of its M members (disjoint across seeds), or {}."""
    if size is None:
        return {}
    if size < 2:
        raise UserError(f"--ensemble must be 2 or more (members per ensemble), got {size}.")
    plain = [row.model for row in rows if not row.variant]
    missing = [model for model in models if model not in plain]
    if missing:
        raise UserError(f"--ensemble-models {' '.join(missing)}: not among --models "
                        f"({' '.join(plain)}); an ensemble row needs its model's own row.")
    stride = max(seeds) - min(seeds) + 1
    return {model: {seed: [seed + j * stride for j in range(size)] for seed in seeds}
            for model in dict.fromkeys(models)}


def ensemble_run(out: Path, dataset: str, row: Row, seed: int, members: list[int],
                 finished: set[str], device: str) -> dict | None:
    """The ensemble of a row's member runs (folders DIR/DATASET/MODEL/seedS): its results,
    also written to DIR/DATASET/MODEL-ensM/seedS/results.json; None if a member failed."""
    from bayesprompt.runs.ensemble import ensemble_results
    folders = [out / Path(dataset).name / Path(row.model).stem / f"seed{member}"
               for member in members]
    if any(str(folder.resolve()) not in finished for folder in folders):
        return None
    results = ensemble_results(folders, device)
    folder = out / Path(dataset).name / row.label / f"seed{seed}"
    make_folder(folder)
    write_json(folder / "results.json", results)
    return results


def raise_failures(outcomes: list[Outcome]) -> None:
    """RunsFailed (exit code 1) listing the failed runs, if any."""
    if any(outcome.failed for outcome in outcomes):
        raise RunsFailed(failure_report(outcomes))


def grid_runs(args: argparse.Namespace, out: Path) -> tuple[dict[str, list], list[dict],
                                                            list[RunConfig]]:
    """The axes of --protocol grid, its points (axis -> value) and their resolved configs."""
    given = [name for name in ("datasets", "models", "seeds") if getattr(args, name)]
    if given or args.variants:
        raise UserError(
            f"--protocol grid takes its runs from --grid and --set, not from "
            f"{', '.join('--' + n for n in given) or '--variant'}: write e.g. --grid "
            "model=coop,vpt --grid seed=1,2 --set dataset=eurosat.")
    axes = grid_axes(args.axes)
    settings, options = parse_settings(args.settings, "--set", chosen=GRID_CHOSEN)
    overlap = sorted(set(settings) & set(axes))
    if overlap:
        raise UserError(f"{', '.join(overlap)} is both set (--set) and varied (--grid); "
                        "drop one of them.")
    precision = args.precision or default_precision(args.device)
    points = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    labels = [point_label(point) for point in points]
    if len(set(labels)) != len(labels):
        raise UserError(f"Two grid points have the same folder name ({labels}); give path "
                        "values that differ in their last component.")
    configs = []
    for point, label in zip(points, labels, strict=True):
        point_fields = {k: v for k, v in point.items() if not k.startswith("options.")}
        point_options = {k.removeprefix("options."): v for k, v in point.items()
                         if k.startswith("options.")}
        config = RunConfig(**{**settings, **point_fields},
                           options={**options, **point_options}, device=args.device,
                           precision=precision, out=str(out / label))
        load_model_class(config.model)
        configs.append(config.resolved())
    return axes, points, configs


def grid_main(args: argparse.Namespace, sweep: SweepOptions, command: str) -> None:
    """--protocol grid: one run per combination of the --grid axes; the table has one line
    per run: its axis values, then results.json's metrics and transfer accuracies."""
    out = Path(args.out or Path("runs") / "benchmark" / "grid")
    axes, points, configs = grid_runs(args, out)
    outcomes = run_sweep(configs, out, sweep, say)
    if outcomes is None:  # submitted to SLURM
        return
    entries = [{"run": point_label(point), **point, "failed": outcome.failed,
                **{key: lookup(outcome.results or {}, key) for key, _, _ in GRID_COLUMNS},
                "transfer_acc": (outcome.results or {}).get("transfer_acc", {})}
               for point, outcome in zip(points, outcomes, strict=True)]
    write_grid_table(out, axes, entries, command)
    raise_failures(outcomes)


def write_grid_table(out: Path, axes: dict[str, list], entries: list[dict], command: str
                     ) -> None:
    """table.md/csv/json and the bar plot of a grid: one line per run (failed: FAILED)."""
    targets = list(dict.fromkeys(t for e in entries for t in e["transfer_acc"]))
    header_cells = [*axes, *(title for _, title, _ in GRID_COLUMNS), *targets]
    lines = [[*(value_text(e[k]) for k in axes),
              *(("FAILED" if e["failed"] else show(e[key], percent))
                for key, _, percent in GRID_COLUMNS),
              *(show(e["transfer_acc"].get(t)) for t in targets)] for e in entries]
    body = markdown_table(header_cells, lines)
    header = (f"# grid\n\nOne run per line; accuracy in percent, ECE (fraction) and NLL (nats) "
              f"on the new classes, AUROC of the mutual information (n/a: point-estimate "
              f"model or no new classes). Run folders under {out}. Command:\n\n"
              f"    {command}\n\n")
    make_folder(out)
    write_text(out / "table.md", header + body + "\n")
    records = [{**{k: value_text(v) if k in axes else v for k, v in e.items()
                   if k != "transfer_acc"},
                **{f"{t}_acc": e["transfer_acc"].get(t) for t in targets}} for e in entries]
    write_text(out / "table.csv", csv_text(records))
    write_json(out / "table.json", {"protocol": "grid", "axes": axes, "command": command,
                                    "entries": entries})
    bars = {e["run"]: {"base": (e["base_acc"], None), "new": (e["new_acc"], None),
                       "HM": (e["hm"], None)} for e in entries}
    plot_grouped_bars({"accuracy of each run of the grid": bars}, out / "table.png")
    print(header + body)


def cli() -> None:
    """The console script."""
    run_main(main)
