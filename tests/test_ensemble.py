"""Deep ensembles: bayesprompt.Ensemble, benchmark.py --ensemble, and analyze.py comparing runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE

import bayesprompt
import bayesprompt.commands.analyze
import bayesprompt.commands.benchmark
from bayesprompt.commands.cli import run_main
from bayesprompt.selective import split_metrics


@pytest.fixture(scope="module")
def bench(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base2new on the EuroSAT fixture: coop, seed 1, and its ensemble of 2 (seeds 1 and 2)."""
    out = tmp_path_factory.mktemp("ens") / "b2n"
    cache = tmp_path_factory.mktemp("cache")
    settings = [f"root={eurosat_root}", f"backbone={TINY_BACKBONE}", "pretrained=none",
                "shots=4", "epochs=1", "batch_size=4", "views=2", f"cache_dir={cache}"]
    run_main(vars(bayesprompt.commands.benchmark)["main"],
             ["--protocol", "base2new", "--datasets", "eurosat", "--models", "coop",
              "--seeds", "1", "--ensemble", "2", *[a for s in settings for a in ("--set", s)],
              "--device", "cpu", "--executor", "none", "--out", str(out)])
    return out


def test_the_ensemble_row_is_the_mixture_of_its_members(bench: Path) -> None:
    table = json.loads((bench / "table.json").read_text())
    assert table["rows"] == ["coop", "coop-ens2"]
    results = json.loads((bench / "eurosat/coop-ens2/seed1/results.json").read_text())
    members = [bench / "eurosat/coop" / f"seed{s}" for s in (1, 2)]
    assert results["members"] == [str(m.resolve()) for m in members]
    runs = [bayesprompt.Run.load(m) for m in members]
    ensemble = bayesprompt.Ensemble(runs)
    features, labels = ensemble.test_features("new")
    ensemble.set_classes(ensemble.new.classnames)
    probs = ensemble.predict(features)                                        # (2, N, C)
    for run in runs:
        run.set_classes(run.new.classnames)
    torch.testing.assert_close(probs, torch.cat([run.predict(features) for run in runs]))
    assert probs.shape[0] == 2 and not torch.equal(probs[0], probs[1])
    expected = split_metrics(probs, labels)
    assert results["new_acc"] == pytest.approx(100 * expected["accuracy"])
    assert results["aurc"]["new"] == pytest.approx(expected["aurc"])
    assert set(results["misclassification_auroc"]["new"]) == {"msp", "entropy", "mi"}
    assert results["mi_auroc_new_vs_base"] is not None
    assert results["train_seconds"] == pytest.approx(
        sum(run.results["train_seconds"] for run in runs), abs=0.02)
    entry = {e["model"]: e for e in table["entries"]}["coop-ens2"]
    assert entry["aurc.new.msp"]["mean"] == pytest.approx(expected["aurc"]["msp"])
    assert "err AUROC MI" in (bench / "table.md").read_text()
    assert (bench / "risk_coverage_new.png").stat().st_size > 0


def test_analyze_draws_runs_and_ensembles_side_by_side(bench: Path, tmp_path: Path,
                                                        capsys) -> None:
    out = tmp_path / "compare"
    run_main(vars(bayesprompt.commands.analyze)["main"],
             [str(bench / "eurosat/coop/seed1"), str(bench / "eurosat/coop-ens2/seed1"),
              "--out", str(out)])
    for name in ("risk_coverage_base.png", "risk_coverage_new.png", "reliability_base.png",
                 "reliability_new.png"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    ensemble = json.loads((bench / "eurosat/coop-ens2/seed1/results.json").read_text())
    assert f"AURC msp {ensemble['aurc']['new']['msp']:.3f}" in printed


@pytest.mark.parametrize("args, message", [
    (["--ensemble", "1"], "2 or more"),
    (["--ensemble", "3", "--ensemble-models", "cocoop"], "not among --models"),
])
def test_bad_ensemble_options_exit_2(args: list[str], message: str, tmp_path: Path,
                                     capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        run_main(vars(bayesprompt.commands.benchmark)["main"],
                 ["--protocol", "base2new", "--models", "coop", "--executor", "none",
                  "--out", str(tmp_path), *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_ensemble_of_other_settings_is_refused(bench: Path, tmp_path: Path) -> None:
    with pytest.raises(bayesprompt.UserError, match="at least one run"):
        bayesprompt.Ensemble([])
    with pytest.raises(bayesprompt.UserError, match="lists no members"):
        bayesprompt.Ensemble.load_folder(bench / "eurosat/coop/seed1")
