"""The benchmark's protocols (the layouts of CoOp, CoCoOp and Bayesian Prompt Learning) and
what a benchmark command chooses: the table rows (models and their variants), the datasets of
a protocol, the KEY=VALUE settings and a grid's axes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from bayesprompt.errors import UserError
from bayesprompt.options import LIST_SEPARATOR, parse_field_value, parse_options
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.model_files import load_model_class
from bayesprompt.world.downstream import BENCHMARK_DEFAULTS

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
        raise UserError(f"{where}: {error} (RunConfig in bayesprompt/runs/config.py lists the "
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
                f"bayesprompt/runs/config.py). Settable fields: {settable}. A model file's own "
                "option is set as options.KEY=VALUE, e.g. options.mi_weight=0.")
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
