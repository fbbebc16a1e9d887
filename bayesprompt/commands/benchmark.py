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
Without --datasets, the offline world's (bayesprompt.data.offline_world.BENCHMARK_DEFAULTS).

Runs are ordinary run folders, DIR/DATASET/MODEL[-VARIANT]/seedS. A finished run is reused only
when its config.json equals the requested configuration (but for its folder); an interrupted
one resumes from its checkpoint; a folder holding a run with other options is an error.
Writes DIR/table.md, DIR/table.csv, DIR/table.json and the bar plot DIR/table.png (mean ± sample
std over seeds).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import shlex
import statistics
import sys
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import get_args, get_type_hints

from tqdm.auto import tqdm

from bayesprompt.analysis.plots import plot_grouped_bars
from bayesprompt.cli import add_common_arguments, default_precision, parse_options, run_main
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.offline_world import BENCHMARK_DEFAULTS
from bayesprompt.errors import UserError
from bayesprompt.files import make_folder, write_json, write_text
from bayesprompt.runs import (
    RunConfig,
    harmonic_mean,
    load_model_class,
    train_and_evaluate,
)

PROTOCOLS = ("base2new", "cross_dataset", "domain_generalization")
DEFAULT_MODELS = ["zeroshot", "coop", "cocoop", "vpt", "vpt_cond", "e2mim", "e2mim_vpt"]
#: RunConfig fields the benchmark chooses itself, and the option that does.
CHOSEN = {"dataset": "--datasets", "model": "--models (or model= in a --variant)",
          "seed": "--seeds", "subsample": "--protocol", "eval_on": "--protocol",
          "out": "--out", "options": "options.KEY=VALUE", "device": "--device",
          "precision": "--precision"}
FIELD_TYPES = get_type_hints(RunConfig)
#: base2new columns read from results.json: (key in results.json, column title, is percent).
BASE2NEW_COLUMNS = (("base_acc", "base", True), ("new_acc", "new", True),
                    ("new_ece", "ECE new", False), ("new_nll", "NLL new", False),
                    ("mi_auroc_new_vs_base", "AUROC MI", False))
#: Keys of a table entry that hold one value; all others hold mean ± std over seeds.
SCALAR_KEYS = ("dataset", "model", "seeds", "hm", "train_seconds")


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
    """The text of a RunConfig field's value, parsed by the field's type."""
    annotation = FIELD_TYPES[name]
    kinds = get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in kinds and text.lower() in ("", "none", "null"):
        return None
    kind = next(k for k in kinds if k is not type(None))
    described = {str: "text", int: "an integer", float: "a number"}
    if kind not in described:
        raise UserError(f"{where}: {name} ({kind}) cannot be set from the command line.")
    try:
        return kind(text)
    except ValueError:
        optional = " (or none, for the default)" if type(None) in kinds else ""
        raise UserError(f"{where}: {name} takes {described[kind]}{optional}, not '{text}' "
                        "(RunConfig in bayesprompt/runs.py lists the fields).") from None


def parse_settings(pairs: list[str], where: str, allow_model: bool = False
                   ) -> tuple[dict, dict]:
    """['key=value', ...] -> (RunConfig fields, model options); `options.KEY` is a model option.

    Values are parsed by the field's type; unknown fields and the fields the benchmark
    chooses (except `model` in a variant) are UserErrors.
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
        elif key in CHOSEN:
            raise UserError(f"{where}: {key} is chosen by {CHOSEN[key]}, not by KEY=VALUE.")
        elif key in FIELD_TYPES:
            settings[key] = parse_value(key, value, where)
        else:
            settable = ", ".join(f.name for f in fields(RunConfig) if f.name not in CHOSEN)
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


def read_json(path: Path) -> dict:
    """A run folder's JSON record, or a UserError saying how to recover from a corrupt one."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} is not valid JSON ({error}); the run folder {path.parent} is damaged. "
            "Delete that folder to run it again; the other runs are kept.") from None


def run_or_reuse(config: RunConfig, say) -> dict:
    """The results of a resolved run: reused when its config.json equals `config` (every
    option but `out`, so a moved benchmark folder is reused), else trained (resumed from its
    checkpoint when interrupted). A run with other options in the folder is an error."""
    out = Path(config.out)
    requested = json.loads(json.dumps(asdict(config)))
    if (out / "config.json").is_file():
        saved = read_json(out / "config.json")
        changed = sorted(k for k in saved.keys() | requested.keys()
                         if k != "out" and saved.get(k) != requested.get(k))
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} there, {requested.get(k)!r} now"
                                for k in changed)
            raise UserError(
                f"{out} holds a run with other options ({details}). It is neither reused nor "
                "overwritten: delete that folder to re-run it, or pass another --out.")
        if (out / "results.json").is_file():
            say(f"reused {out} (its config.json equals the requested one)")
            return read_json(out / "results.json")
        say(f"resuming {out}")
    elif (out / "checkpoint.pt").exists():
        raise UserError(f"{out} holds a checkpoint but no config.json, so it cannot be "
                        "checked against the requested options. Delete that folder to re-run.")
    return train_and_evaluate(config, resume=True)


def mean_std(values: list[float | None]) -> dict | None:
    """{"mean", "std", "n"} over the non-None values (sample std, 0 for one value), or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": spread, "n": len(values)}


def base2new_entries(results: dict[tuple[str, str], list[dict]], datasets: list[str],
                     rows: list[Row]) -> list[dict]:
    """Table entries per dataset and row, then the average over datasets per row.

    The average (of two or more datasets) of a metric is taken per seed over the datasets,
    then mean ± std over seeds; HM is the harmonic mean of the seed-mean base and new
    accuracies (of the average too).
    """
    entries = []
    for dataset in [*datasets, None] if len(datasets) > 1 else datasets:
        for row in rows:
            if dataset is None:
                per_seed = zip(*(results[d, row.label] for d in datasets), strict=True)
                runs = [{key: average([r.get(key) for r in seed_runs])
                         for key, _, _ in BASE2NEW_COLUMNS} for seed_runs in per_seed]
            else:
                runs = results[dataset, row.label]
            cells = {key: mean_std([r.get(key) for r in runs]) for key, _, _ in BASE2NEW_COLUMNS}
            base, new = cells["base_acc"], cells["new_acc"]
            hm = harmonic_mean(base["mean"], new["mean"]) if base and new else None
            seconds = mean_std([r.get("train_seconds") for r in runs])
            entries.append({"dataset": dataset or "average", "model": row.label,
                            "seeds": len(runs), **cells, "hm": hm,
                            "train_seconds": seconds["mean"] if seconds else None})
    return entries


def average(values: list[float | None]) -> float | None:
    """Mean of values, None when any is missing."""
    return None if any(v is None for v in values) else statistics.mean(values)


def transfer_entries(results: dict[tuple[str, str], list[dict]], source: str,
                     targets: list[str], rows: list[Row]) -> list[dict]:
    """Per row: source accuracy, each target's, and the per-seed average over the targets."""
    entries = []
    for row in rows:
        runs = results[source, row.label]
        per_target = {t: [r["transfer_acc"].get(t) for r in runs] for t in targets}
        target_average = [average([per_target[t][i] for t in targets]) for i in range(len(runs))]
        entries.append({"dataset": source, "model": row.label, "seeds": len(runs),
                        "source": mean_std([r["base_acc"] for r in runs]),
                        "targets": {t: mean_std(v) for t, v in per_target.items()},
                        "average": mean_std(target_average)})
    return entries


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
    header = ["model", "base", "new", "HM", "ECE new", "NLL new", "AUROC MI", "train s"]
    sections = []
    for dataset in table_datasets(entries):
        lines = [[e["model"], *(show(e[k], pct) for k, _, pct in BASE2NEW_COLUMNS[:2]),
                  show(e["hm"]), *(show(e[k], pct) for k, _, pct in BASE2NEW_COLUMNS[2:]),
                  show(e["train_seconds"], True)]
                 for e in entries if e["dataset"] == dataset]
        title = f"Average over {len(datasets)} datasets" if dataset == "average" else dataset
        sections.append(f"## {title}\n\n" + markdown_table(header, lines))
    return "\n\n".join(sections)


def transfer_markdown(entries: list[dict], source: str, targets: list[str]) -> str:
    header = ["model", f"source: {source}", *targets, "average"]
    lines = [[e["model"], show(e["source"]), *(show(e["targets"][t]) for t in targets),
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
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="MODEL",
                        help=f"model names or files (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a run-configuration field for every run (RunConfig in "
                        "bayesprompt/runs.py: epochs=20, batch_size=1, objective=paper, "
                        "residual_scale=1, root=..., backbone=..., pretrained=none, ...; "
                        "parsed by the field's type, none for an optional field's default); "
                        "options.KEY=VALUE sets a model file's own option (what svi_train.py's "
                        "--set sets), e.g. options.mi_weight=0. Repeatable")
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        metavar="LABEL:KEY=VALUE[,KEY=VALUE...]",
                        help="extra rows with these settings (same keys as --set), labelled "
                        "MODEL-LABEL: for every model, or only for the one named by model=NAME")
    parser.add_argument("--out", help="benchmark folder (default: runs/benchmark/PROTOCOL)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings, options = parse_settings(args.settings, "--set")
    rows = table_rows(args.models, [parse_variant(v) for v in args.variants])
    datasets = protocol_datasets(args.protocol, args.datasets)
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds names a seed twice: {args.seeds}.")
    out = Path(args.out or Path("runs") / "benchmark" / args.protocol)
    precision = args.precision or default_precision(args.device)
    base2new = args.protocol == "base2new"
    trained_on = datasets if base2new else datasets[:1]
    root = Path(settings.get("root", RunConfig.root)).expanduser()
    for dataset in datasets:  # a missing dataset fails before any training
        load_dataset(dataset, root)

    def say(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    runs = [(dataset, row, seed) for dataset in trained_on for row in rows for seed in args.seeds]
    results: dict[tuple[str, str], list[dict]] = {}
    progress = tqdm(runs, desc=f"benchmark {args.protocol}", unit="run", dynamic_ncols=True)
    for dataset, row, seed in progress:
        progress.set_postfix_str(f"{Path(dataset).name} {row.label} seed {seed}")
        config = RunConfig(**{**settings, **row.settings}, dataset=dataset, model=row.model,
                           seed=seed, subsample="base" if base2new else "all",
                           eval_on=[] if base2new else datasets[1:],
                           options={**options, **row.options}, device=args.device,
                           precision=precision,
                           out=str(out / Path(dataset).name / row.label / f"seed{seed}"))
        results.setdefault((dataset, row.label), []).append(
            run_or_reuse(config.resolved(), say))
    progress.close()

    if base2new:
        entries = base2new_entries(results, datasets, rows)
        body = base2new_markdown(entries, datasets)
        about = ("Base-to-new generalisation; accuracy in percent, mean ± sample std over "
                 "seeds; HM from the seed-mean base and new accuracies; ECE (fraction) and NLL "
                 "(nats) of the predictive mean on new classes; AUROC of the mutual "
                 "information for new vs base test images (n/a: point-estimate model).")
    else:
        entries = transfer_entries(results, datasets[0], datasets[1:], rows)
        body = transfer_markdown(entries, datasets[0], datasets[1:])
        kind = {"cross_dataset": "Cross-dataset transfer",
                "domain_generalization": "Domain generalisation"}[args.protocol]
        about = (f"{kind}: trained on all classes of {datasets[0]}, tested on each target; "
                 "accuracy in percent, mean ± sample std over seeds; the average over targets "
                 "is taken per seed.")
    command = "python experiments/benchmark.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    header = (f"# {args.protocol}\n\n{about}\n\nSeeds {', '.join(map(str, args.seeds))}; "
              f"run folders under {out}. Command:\n\n    {command}\n\n")
    make_folder(out)
    write_text(out / "table.md", header + body + "\n")
    write_text(out / "table.csv", csv_text([flat_record(e) for e in entries]))
    write_json(out / "table.json", {"protocol": args.protocol, "datasets": datasets,
                                    "seeds": args.seeds, "rows": [row.label for row in rows],
                                    "command": command, "entries": entries})
    plot_grouped_bars(bar_panels(entries, args.protocol, datasets), out / "table.png")
    print(header + body)


def cli() -> None:
    """The console script."""
    run_main(main)
