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
Without --datasets, the offline world's (bayesprompt.data.offline_world.BENCHMARK_DEFAULTS).

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
import csv
import io
import itertools
import math
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm

from bayesprompt.analysis.plots import plot_grouped_bars
from bayesprompt.cli import (
    LIST_SEPARATOR,
    add_common_arguments,
    default_device,
    default_precision,
    parse_field_value,
    parse_options,
    run_main,
)
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.offline_world import BENCHMARK_DEFAULTS
from bayesprompt.errors import RunsFailed, UserError
from bayesprompt.files import make_folder, write_json, write_text
from bayesprompt.runs import RunConfig, harmonic_mean, load_model_class
from bayesprompt.sweep import (
    Outcome,
    SweepOptions,
    add_sweep_arguments,
    failure_report,
    run_sweep,
    sweep_options,
)

PROTOCOLS = ("base2new", "cross_dataset", "domain_generalization", "grid")
DEFAULT_MODELS = ["zeroshot", "coop", "cocoop", "vpt", "vpt_cond", "e2mim", "e2mim_vpt"]
#: RunConfig fields the benchmark chooses itself, and the option that does.
CHOSEN = {"dataset": "--datasets", "model": "--models (or model= in a --variant)",
          "seed": "--seeds", "subsample": "--protocol", "eval_on": "--protocol",
          "out": "--out", "options": "options.KEY=VALUE", "device": "--device",
          "precision": "--precision"}
#: What the benchmark chooses itself under --protocol grid: every other field may be set.
GRID_CHOSEN = {name: CHOSEN[name] for name in ("out", "options", "device", "precision")}
FIELD_NAMES = [item.name for item in fields(RunConfig)]
#: Selective prediction on the new classes (bayesprompt/selective.py): dotted results.json keys.
SELECTIVE_COLUMNS = (("aurc.new.msp", "AURC new", False),
                     ("misclassification_auroc.new.msp", "err AUROC MSP", False),
                     ("misclassification_auroc.new.mi", "err AUROC MI", False))
#: base2new columns read from results.json: (key in results.json, column title, is percent).
BASE2NEW_COLUMNS = (("base_acc", "base", True), ("new_acc", "new", True),
                    ("new_ece", "ECE new", False), ("new_nll", "NLL new", False),
                    ("mi_auroc_new_vs_base", "AUROC MI", False),
                    *SELECTIVE_COLUMNS)
#: Keys of a table entry that hold one value; all others hold mean ± std over seeds.
SCALAR_KEYS = ("dataset", "model", "seeds", "failed", "hm", "train_seconds")


@dataclass(frozen=True)
class Row:
    """One row of the table: a model with the run-configuration settings of its variant."""

    model: str
    variant: str = ""
    settings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        name = Path(self.model).stem
        return f"{name}-{self.variant}" if self.variant else name


def parse_value(name: str, text: str, where: str) -> object:
    """The text of a RunConfig field's value, parsed by the field's type (as svi_train.py's
    flags are; a list's items joined by '+')."""
    try:
        return parse_field_value(RunConfig, name, text)
    except ValueError as error:
        raise UserError(f"{where}: {error} (RunConfig in bayesprompt/runs.py lists the "
                        "fields).") from None


def parse_settings(pairs: list[str], where: str, allow_model: bool = False,
                   chosen: dict[str, str] = CHOSEN) -> tuple[dict, dict]:
    """['key=value', ...] -> (RunConfig fields, model options); `options.KEY` is a model option.

    Values are parsed by the field's type; unknown fields and the fields the benchmark
    chooses (`chosen`; except `model` in a variant) are UserErrors.
    """
    settings: dict = {}
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{where}: expected KEY=VALUE, got '{pair}'.")
        if key.startswith("options."):
            options.update(parse_options([f"{key.removeprefix('options.')}={value}"]))
        elif key == "model" and allow_model:
            settings[key] = value
        elif key in chosen:
            raise UserError(f"{where}: {key} is chosen by {chosen[key]}, not by KEY=VALUE.")
        elif key in FIELD_NAMES:
            settings[key] = parse_value(key, value, where)
        else:
            settable = ", ".join(name for name in FIELD_NAMES if name not in chosen)
            raise UserError(
                f"{where}: '{key}' is not a field of the run configuration (RunConfig in "
                f"bayesprompt/runs.py). Settable fields: {settable}. A model file's own option "
                f"is set as options.KEY=VALUE, e.g. options.mi_weight=0.")
    return settings, options


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """'LABEL:key=value,...' -> (label, RunConfig fields, model options)."""
    label, sep, pairs = text.partition(":")
    where = f"--variant {text}"
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
        raise UserError(f"{where}: expected LABEL:KEY=VALUE[,KEY=VALUE...] with a LABEL of "
                        "letters, digits and _.+- (it names the rows and their run folders).")
    settings, options = parse_settings([p for p in pairs.split(",") if p], where, True)
    if not settings and not options:
        raise UserError(f"{where}: the variant sets nothing; give at least one KEY=VALUE.")
    return label, settings, options


def table_rows(models: list[str], variants: list[tuple[str, dict, dict]]) -> list[Row]:
    """One row per model, then each variant's rows: for its `model=` only, else every model."""
    rows = [Row(model) for model in models]
    for label, settings, options in variants:
        settings = dict(settings)
        chosen = settings.pop("model", None)
        rows += [Row(model, label, settings, options) for model in ([chosen] if chosen
                                                                     else models)]
    seen = set()
    for row in rows:
        if row.label in seen:
            raise UserError(f"The row '{row.label}' is asked for twice (--models and --variant "
                            "labels must give each model and variant once).")
        seen.add(row.label)
    for model in dict.fromkeys(row.model for row in rows):
        load_model_class(model)
    return rows


def mean_std(values: list[float | None]) -> dict | None:
    """{"mean", "std", "n"} over the non-None values (sample std, 0 for one value), or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": spread, "n": len(values)}


def base2new_entries(results: dict[tuple[str, str], list[dict | None]], datasets: list[str],
                     rows: list[Row]) -> list[dict]:
    """Table entries per dataset and row, then the average over datasets per row.

    `results` holds each row's runs in seed order, None for a failed run. The average (of two
    or more datasets) of a metric is taken per seed over the datasets (seeds with a failed run
    left out), then mean ± std over seeds; HM is the harmonic mean of the seed-mean base and
    new accuracies (of the average too). `failed` counts the runs left out.
    """
    entries = []
    for dataset in [*datasets, None] if len(datasets) > 1 else datasets:
        for row in rows:
            if dataset is None:
                per_seed = list(zip(*(results[d, row.label] for d in datasets), strict=True))
                runs = [{key: average([lookup(r, key) for r in seed_runs])
                         for key, _, _ in BASE2NEW_COLUMNS}
                        for seed_runs in per_seed if None not in seed_runs]
                failed = len(per_seed) - len(runs)
            else:
                runs = [r for r in results[dataset, row.label] if r is not None]
                failed = len(results[dataset, row.label]) - len(runs)
            cells = {key: mean_std([lookup(r, key) for r in runs])
                     for key, _, _ in BASE2NEW_COLUMNS}
            base, new = cells["base_acc"], cells["new_acc"]
            hm = harmonic_mean(base["mean"], new["mean"]) if base and new else None
            seconds = mean_std([r.get("train_seconds") for r in runs])
            entries.append({"dataset": dataset or "average", "model": row.label,
                            "seeds": len(runs), "failed": failed, **cells, "hm": hm,
                            "train_seconds": seconds["mean"] if seconds else None})
    return entries


def lookup(results: dict, key: str) -> object:
    """results[key], or for a dotted key "a.b.c" results["a"]["b"]["c"]; None where absent."""
    if key in results:
        return results[key]
    value = results
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def average(values: list[float | None]) -> float | None:
    """Mean of values, None when any is missing."""
    return None if any(v is None for v in values) else statistics.mean(values)


def transfer_entries(results: dict[tuple[str, str], list[dict | None]], source: str,
                     targets: list[str], rows: list[Row]) -> list[dict]:
    """Per row: source accuracy, each target's, and the per-seed average over the targets
    (failed runs, None in `results`, left out and counted as `failed`)."""
    entries = []
    for row in rows:
        runs = [r for r in results[source, row.label] if r is not None]
        per_target = {t: [r["transfer_acc"].get(t) for r in runs] for t in targets}
        target_average = [average([per_target[t][i] for t in targets]) for i in range(len(runs))]
        entries.append({"dataset": source, "model": row.label, "seeds": len(runs),
                        "failed": len(results[source, row.label]) - len(runs),
                        "source": mean_std([r["base_acc"] for r in runs]),
                        "targets": {t: mean_std(v) for t, v in per_target.items()},
                        "average": mean_std(target_average)})
    return entries


def row_name(entry: dict) -> str:
    """The model cell of a table line, marked when runs of it failed."""
    failed = entry.get("failed", 0)
    if not failed:
        return entry["model"]
    return f"{entry['model']} (FAILED: {failed} of {failed + entry['seeds']} runs)"


def show(cell: dict | float | None, percent: bool = True) -> str:
    """A table cell: 'mean ± std' (2 decimals for percent, 3 otherwise), or n/a."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return "n/a"
    digits = 2 if percent else 3
    if isinstance(cell, dict):
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    return f"{cell:.{digits}f}"


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(line) + " |" for line in lines)])


def table_datasets(entries: list[dict]) -> list[str]:
    """The datasets of base2new entries, the average (if any) first, as CoCoOp's table."""
    return sorted(dict.fromkeys(e["dataset"] for e in entries), key=lambda d: d != "average")


def base2new_markdown(entries: list[dict], datasets: list[str]) -> str:
    header = ["model", "base", "new", "HM", *(title for _, title, _ in BASE2NEW_COLUMNS[2:]),
              "train s"]
    sections = []
    for dataset in table_datasets(entries):
        lines = [[row_name(e), *(show(e[k], pct) for k, _, pct in BASE2NEW_COLUMNS[:2]),
                  show(e["hm"]), *(show(e[k], pct) for k, _, pct in BASE2NEW_COLUMNS[2:]),
                  show(e["train_seconds"], True)]
                 for e in entries if e["dataset"] == dataset]
        title = f"Average over {len(datasets)} datasets" if dataset == "average" else dataset
        sections.append(f"## {title}\n\n" + markdown_table(header, lines))
    return "\n\n".join(sections)


def transfer_markdown(entries: list[dict], source: str, targets: list[str]) -> str:
    header = ["model", f"source: {source}", *targets, "average"]
    lines = [[row_name(e), show(e["source"]), *(show(e["targets"][t]) for t in targets),
              show(e["average"])] for e in entries]
    return markdown_table(header, lines)


def flat_record(entry: dict) -> dict:
    """A table entry as one CSV record: each mean ± std cell (a target's too) becomes the
    columns NAME_mean and NAME_std, empty for n/a."""
    record = {}
    for key, value in {**entry, **entry.get("targets", {})}.items():
        if key in SCALAR_KEYS:
            record[key] = value
        elif key != "targets":
            record[f"{key}_mean"] = value["mean"] if value else None
            record[f"{key}_std"] = value["std"] if value else None
    return record


def csv_text(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in records for k in r)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def bar_panels(entries: list[dict], protocol: str, datasets: list[str]) -> dict:
    """Panels of the bar plot: base/new/HM per row and dataset, or source/targets/average."""
    def bar(cell: dict | None) -> tuple[float | None, float | None]:
        return (cell["mean"], cell["std"]) if cell else (None, None)

    if protocol == "base2new":
        return {("average over datasets" if d == "average" else Path(d).name): {
            e["model"]: {"base": bar(e["base_acc"]), "new": bar(e["new_acc"]),
                         "HM": (e["hm"], None)}
            for e in entries if e["dataset"] == d}
            for d in table_datasets(entries)}
    source, targets = datasets[0], datasets[1:]
    return {f"trained on {Path(source).name}": {
        e["model"]: {f"{Path(source).name} (source)": bar(e["source"]),
                     **{Path(t).name: bar(e["targets"][t]) for t in targets},
                     "average over targets": bar(e["average"])}
        for e in entries}}


def protocol_datasets(protocol: str, datasets: list[str] | None) -> list[str]:
    """The datasets of a protocol: given, or the world's defaults (source first)."""
    if datasets is None:
        default = BENCHMARK_DEFAULTS[protocol]
        datasets = list(default) if protocol == "base2new" else [default[0], *default[1]]
    if protocol != "base2new" and len(datasets) < 2:
        raise UserError(f"--protocol {protocol} needs --datasets SOURCE TARGET...: a source to "
                        f"train on and at least one dataset to evaluate on; got {datasets}.")
    if len(set(datasets)) != len(datasets):
        raise UserError(f"--datasets names a dataset twice: {datasets}.")
    return datasets


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
                        "bayesprompt/runs.py: epochs=20, batch_size=1, objective=paper, "
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
    from bayesprompt.ensemble import ensemble_results
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


def grid_axes(texts: list[str]) -> dict[str, list]:
    """['key=v1,v2', ...] -> {key: [values]}, each value parsed by the field's type;
    options.KEY axes vary a model file's option."""
    axes: dict[str, list] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        where = f"--grid {text}"
        if not sep or not key or not values:
            raise UserError(f"{where}: expected KEY=VALUE[,VALUE...], e.g. lr=0.001,0.002.")
        if key in axes:
            raise UserError(f"{where}: {key} is a --grid axis twice; give its values once.")
        if key.startswith("options."):
            axes[key] = [parse_options([f"x={v}"])["x"] for v in values.split(",")]
            continue
        axes[key] = [parse_settings([f"{key}={v}"], where, chosen=GRID_CHOSEN)[0][key]
                     for v in values.split(",")]
        if len(set(map(repr, axes[key]))) != len(axes[key]):
            raise UserError(f"{where}: a value is given twice.")
    if not axes:
        raise UserError("--protocol grid needs at least one --grid KEY=VALUE[,VALUE...] axis, "
                        "e.g. --grid lr=0.001,0.002 --grid seed=1,2.")
    return axes


def value_text(value: object) -> str:
    """A grid value as a table cell and in a folder name: a path by its last component, a
    list's items joined by '+'."""
    if isinstance(value, list):
        return LIST_SEPARATOR.join(value_text(item) for item in value)
    return Path(value).name if isinstance(value, str) and "/" in value else str(value)


def point_label(point: dict) -> str:
    """A grid point's row label and run folder name, e.g. 'lr=0.001,seed=2'."""
    return ",".join(f"{key}={value_text(value)}" for key, value in point.items())


#: Grid table columns read from results.json: (key, title, is percent).
GRID_COLUMNS = (("base_acc", "base", True), ("new_acc", "new", True), ("hm", "HM", True),
                ("new_ece", "ECE new", False), ("new_nll", "NLL new", False),
                ("mi_auroc_new_vs_base", "AUROC MI", False), *SELECTIVE_COLUMNS,
                ("train_seconds", "train s", True))


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
