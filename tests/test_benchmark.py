"""experiments/benchmark.py: tables from run folders, reuse and refusal, the three protocols."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE

import bayesprompt.commands.benchmark
import bayesprompt.runs.sweep
from bayesprompt.commands.cli import run_main
from bayesprompt.errors import UserError
from bayesprompt.metrics import harmonic_mean
from bayesprompt.runs import protocols, tables
from bayesprompt.world.downstream import BENCHMARK_DEFAULTS

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "benchmark.py"
benchmark = vars(bayesprompt.commands.benchmark)


def run_cli(args: list[str]) -> None:
    run_main(benchmark["main"], args)


@pytest.fixture(scope="module")
def data(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny EuroSAT tree and two user-folder datasets of the same images."""
    folders = {"root": str(eurosat_root)}
    for name in ("second", "third"):
        folder = tmp_path_factory.mktemp(name) / name
        shutil.copytree(eurosat_root / "eurosat/2750", folder / "images")
        folders[name] = str(folder)
    return folders


@pytest.fixture(scope="module")
def tiny(data: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """--set options of fast runs on the tiny backbone."""
    cache = tmp_path_factory.mktemp("cache")
    return [arg for pair in [f"root={data['root']}", f"backbone={TINY_BACKBONE}",
                             "pretrained=none", "shots=4", "epochs=1", "num_particles=2",
                             "batch_size=4", "views=2", f"cache_dir={cache}"]
            for arg in ("--set", pair)] + ["--device", "cpu", "--executor", "none"]


@pytest.fixture(scope="module")
def base2new(data: dict[str, str], tiny: list[str], tmp_path_factory: pytest.TempPathFactory
             ) -> Path:
    """A finished base-to-new benchmark on two datasets, two seeds, three rows."""
    out = tmp_path_factory.mktemp("bench") / "b2n"
    run_cli(["--protocol", "base2new", "--datasets", "eurosat", data["second"],
             "--models", "zeroshot", "vpt", "--seeds", "1", "2", *tiny,
             "--variant", "more:model=vpt,num_particles=3", "--out", str(out)])
    return out


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_base2new_table_equals_the_runs(base2new: Path, data: dict[str, str]) -> None:
    table = read(base2new / "table.json")
    assert table["rows"] == ["zeroshot", "vpt", "vpt-more"]
    entries = {(e["dataset"], e["model"]): e for e in table["entries"]}
    datasets = ["eurosat", data["second"]]
    for row in table["rows"]:
        runs = {d: [read(base2new / Path(d).name / row / f"seed{s}" / "results.json")
                    for s in (1, 2)] for d in datasets}
        for dataset in datasets:
            entry = entries[dataset, row]
            for key in ("base_acc", "new_acc", "new_ece", "new_nll"):
                values = [r[key] for r in runs[dataset]]
                assert entry[key]["mean"] == pytest.approx(statistics.mean(values))
                assert entry[key]["std"] == pytest.approx(statistics.stdev(values))
            assert entry["hm"] == pytest.approx(harmonic_mean(entry["base_acc"]["mean"],
                                                              entry["new_acc"]["mean"]))
            assert (entry["mi_auroc_new_vs_base"] is None) == (row == "zeroshot")
        average = entries["average", row]
        for key in ("base_acc", "new_acc"):
            per_seed = [statistics.mean(runs[d][s][key] for d in datasets) for s in (0, 1)]
            assert average[key]["mean"] == pytest.approx(statistics.mean(per_seed))
            assert average[key]["std"] == pytest.approx(statistics.stdev(per_seed))
        assert average["hm"] == pytest.approx(harmonic_mean(average["base_acc"]["mean"],
                                                            average["new_acc"]["mean"]))
    config = read(base2new / "eurosat" / "vpt-more" / "seed2" / "config.json")
    assert config["num_particles"] == 3 and config["seed"] == 2
    assert read(base2new / "eurosat" / "vpt" / "seed2" / "config.json")["num_particles"] == 2

    with open(base2new / "table.csv") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 9  # (2 datasets + average) x 3 rows
    first = entries["eurosat", "zeroshot"]
    assert float(records[0]["base_acc_mean"]) == pytest.approx(first["base_acc"]["mean"])
    assert records[0]["mi_auroc_new_vs_base_mean"] == ""
    markdown = (base2new / "table.md").read_text()
    assert "## Average over 2 datasets" in markdown and "## eurosat" in markdown
    assert f"| zeroshot | {first['base_acc']['mean']:.2f} ± 0.00 |" in markdown
    assert (base2new / "table.png").stat().st_size > 0


def test_hm_is_taken_from_the_seed_means() -> None:
    # per-seed HMs 68.57 and 68.57; the papers' HM of the means (70, 70) is 70
    results = {("d", "m"): [{"base_acc": 60.0, "new_acc": 80.0},
                            {"base_acc": 80.0, "new_acc": 60.0}]}
    rows = [protocols.Row("m")]
    (entry,) = tables.base2new_entries(results, ["d"], rows)  # no average of one
    assert entry["hm"] == pytest.approx(70.0)
    assert entry["base_acc"] == {"mean": 70.0, "std": pytest.approx(14.142, abs=1e-3), "n": 2}
    assert entry["mi_auroc_new_vs_base"] is None


def test_a_finished_run_is_reused_only_with_the_same_config(
        base2new: Path, data: dict[str, str], tiny: list[str], tmp_path: Path,
        monkeypatch, capsys) -> None:
    out = tmp_path / "b2n"
    shutil.copytree(base2new, out)
    before = (out / "table.json").read_text()
    args = ["--protocol", "base2new", "--datasets", "eurosat", data["second"], "--models",
            "zeroshot", "vpt", "--seeds", "1", "2", *tiny,
            "--variant", "more:model=vpt,num_particles=3", "--out", str(out)]

    def no_training(*_, **__):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bayesprompt.runs.sweep, "train_and_evaluate", no_training)
    run_cli(args)
    captured = capsys.readouterr()
    assert captured.err.count("reused ") == 12
    assert read(out / "table.json")["entries"] == json.loads(before)["entries"]

    run_cli([*args, "--set", "loader_workers=1", "--set", "log_every=7"])  # execution options
    assert capsys.readouterr().err.count("reused ") == 12
    config = out / "eurosat" / "vpt" / "seed1" / "config.json"
    older = json.loads(config.read_text())
    del older["kl_weight"], older["tensorboard"]  # options a run of an older version lacks
    config.write_text(json.dumps(older))
    run_cli(args)
    assert capsys.readouterr().err.count("reused ") == 12

    with pytest.raises(SystemExit) as exit_info:  # another option: refused, names the key
        run_cli([*args, "--set", "epochs=2"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "holds a run with other options (epochs: 1 there, 2 now)" in message
    assert "Traceback" not in message


def test_an_interrupted_run_resumes_and_corrupt_records_are_reported(
        tiny: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "b2n"
    args = ["--protocol", "base2new", "--datasets", "eurosat", "--models", "vpt",
            "--seeds", "1", *tiny, "--out", str(out)]
    run_cli(args)
    run = out / "eurosat" / "vpt" / "seed1"
    finished = read(run / "results.json")
    (run / "results.json").unlink()       # stopped after its last checkpoint
    run_cli(args)
    assert f"resuming {run}" in capsys.readouterr().err
    resumed = read(run / "results.json")
    for key in ("base_acc", "new_acc", "loss_history"):
        assert resumed[key] == pytest.approx(finished[key])

    for name in ("results.json", "config.json"):
        (run / name).write_text('{"base_acc": 7')
        with pytest.raises(SystemExit) as exit_info:
            run_cli(args)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert f"{run / name} is not valid JSON" in message and "Delete that folder" in message


def test_cross_dataset_table(data: dict[str, str], tiny: list[str], tmp_path: Path) -> None:
    out = tmp_path / "cross"
    run_cli(["--protocol", "cross_dataset", "--datasets", "eurosat", data["second"],
             "--models", "coop", "--seeds", "1", "2", *tiny, "--out", str(out)])
    runs = [read(out / "eurosat" / "coop" / f"seed{s}" / "results.json") for s in (1, 2)]
    config = read(out / "eurosat" / "coop" / "seed1" / "config.json")
    assert config["subsample"] == "all" and config["eval_on"] == [data["second"]]
    (entry,) = read(out / "table.json")["entries"]
    assert entry["source"]["mean"] == pytest.approx(statistics.mean(r["base_acc"] for r in runs))
    target = [r["transfer_acc"][data["second"]] for r in runs]
    assert entry["targets"][data["second"]]["mean"] == pytest.approx(statistics.mean(target))
    assert entry["average"]["mean"] == pytest.approx(statistics.mean(target))
    assert f"| model | source: eurosat | {data['second']} | average |" in \
        (out / "table.md").read_text()


def test_domain_generalization_averages_the_targets_per_seed(
        data: dict[str, str], tiny: list[str], tmp_path: Path) -> None:
    out = tmp_path / "dg"
    targets = [data["second"], data["third"]]
    run_cli(["--protocol", "domain_generalization", "--datasets", "eurosat", *targets,
             "--models", "e2mim", "--seeds", "1", "2", *tiny, "--set", "options.mi_weight=0",
             "--out", str(out)])
    runs = [read(out / "eurosat" / "e2mim" / f"seed{s}" / "results.json") for s in (1, 2)]
    assert read(out / "eurosat" / "e2mim" / "seed1" / "config.json")["options"] == {
        "mi_weight": 0}
    per_seed = [statistics.mean(r["transfer_acc"][t] for t in targets) for r in runs]
    (entry,) = read(out / "table.json")["entries"]
    assert entry["average"]["mean"] == pytest.approx(statistics.mean(per_seed))
    assert entry["average"]["std"] == pytest.approx(statistics.stdev(per_seed))
    with open(out / "table.csv") as handle:
        (record,) = csv.DictReader(handle)
    assert float(record[f"{data['third']}_mean"]) == pytest.approx(
        entry["targets"][data["third"]]["mean"])


def test_default_datasets_come_from_the_world_declaration() -> None:
    protocol_datasets = protocols.protocol_datasets
    assert protocol_datasets("base2new", None) == BENCHMARK_DEFAULTS["base2new"]
    source, targets = BENCHMARK_DEFAULTS["domain_generalization"]
    assert protocol_datasets("domain_generalization", None) == [source, *targets]


def test_variants_add_rows_for_every_model_or_the_named_one() -> None:
    variant = protocols.parse_variant
    rows = protocols.table_rows(["coop", "vpt"], [
        variant("paper:objective=paper,residual_scale=1"),
        variant("no-mi:model=e2mim,options.mi_weight=0")])
    assert [r.label for r in rows] == ["coop", "vpt", "coop-paper", "vpt-paper", "e2mim-no-mi"]
    assert rows[3].settings == {"objective": "paper", "residual_scale": 1.0}
    assert rows[4].settings == {} and rows[4].options == {"mi_weight": 0}
    with pytest.raises(UserError, match="asked for twice"):
        protocols.table_rows(["coop"], [variant("x:lr=1"), variant("x:model=coop,lr=2")])


@pytest.mark.parametrize("args, message", [
    (["--set", "epochs=many"], "epochs takes an integer (or none, for the default), not 'many'"),
    (["--set", "lr=fast"], "lr takes a number"),
    (["--set", "epoch=3"], "'epoch' is not a field of the run configuration"),
    (["--set", "seed=3"], "seed is chosen by --seeds"),
    (["--set", "epochs"], "expected KEY=VALUE"),
    (["--variant", "paper"], "expected LABEL:KEY=VALUE"),
    (["--variant", "empty:"], "the variant sets nothing"),
    (["--models", "nope"], "Unknown model 'nope'"),
    (["--seeds", "1", "1"], "names a seed twice"),
])
def test_bad_arguments_exit_2_with_a_message(args: list[str], message: str, tmp_path: Path,
                                            capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--protocol", "base2new", "--datasets", "eurosat", *args,
                 "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_real_process_exit_code_and_no_traceback() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--protocol", "cross_dataset",
                           "--set", "batch_size=large"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert "batch_size takes an integer" in done.stderr and "Traceback" not in done.stderr
