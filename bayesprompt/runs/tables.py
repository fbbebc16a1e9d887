"""Benchmark tables from the results.json of a sweep's runs: entries with mean ± std over
seeds, the markdown and CSV text and the panels of the bar plot."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from bayesprompt.metrics import harmonic_mean
from bayesprompt.runs.protocols import Row

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


#: Grid table columns read from results.json: (key, title, is percent).
GRID_COLUMNS = (("base_acc", "base", True), ("new_acc", "new", True), ("hm", "HM", True),
                ("new_ece", "ECE new", False), ("new_nll", "NLL new", False),
                ("mi_auroc_new_vs_base", "AUROC MI", False), *SELECTIVE_COLUMNS,
                ("train_seconds", "train s", True))
