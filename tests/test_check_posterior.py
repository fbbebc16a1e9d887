"""bayesprompt-check-posterior on tiny trained runs: the json's keys, the plot, the Python API
and bad input (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE

import bayesprompt
from bayesprompt.commands.check_posterior import main
from bayesprompt.commands.cli import run_main
from bayesprompt.runs.posterior_check import CHECK_FILE, CHECK_FOLDER, PLOT_FILE, CheckOptions

SMALL = ["--warmup", "15", "--samples", "20", "--images", "2", "--draws", "40",
         "--khat-draws", "20", "--predictive-samples", "3"]


@pytest.fixture(scope="module")
def runs(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, bayesprompt.Run]:
    folder = tmp_path_factory.mktemp("check")
    return {model: bayesprompt.fit(
        dataset="eurosat", root=str(eurosat_root), model=model, backbone=TINY_BACKBONE,
        pretrained="", shots=4, epochs=1, num_particles=2, batch_size=4, views=2,
        device="cpu", residual_scale=1.0, cache_dir=str(folder / "cache"),
        out=str(folder / model)) for model in ("vpt", "vpt_cond", "coop")}


@pytest.mark.parametrize("model", ["vpt", "vpt_cond"])
def test_the_check_writes_its_json_and_plot(runs, model, capsys) -> None:
    run = runs[model]
    main([str(run.folder), *SMALL])
    result = json.loads((run.folder / CHECK_FOLDER / CHECK_FILE).read_text())
    assert (run.folder / CHECK_FOLDER / PLOT_FILE).stat().st_size > 0
    site = result["sites"]["r"]
    for key in ("contraction", "kl_guide_gold", "sd_ratio", "khat", "mean_error"):
        assert key in site
    assert set(result["predictive"]) == {"guide", "gold", "prior", "point"}
    assert set(result["predictive"]["guide"]) == {"base", "new", "nll", "ece", "mi_auroc"}
    if model == "vpt":
        assert result["nuts"]["chains"] == 2 and site["method"] == "nuts"
    else:
        assert result["nuts"] is None and "amortization_gap" in site
        assert result["predictive"]["gold"] == result["predictive"]["prior"]
    assert "predictive" in capsys.readouterr().out


def test_the_python_api_returns_what_the_json_holds(runs, tmp_path) -> None:
    options = CheckOptions(warmup=15, samples=20, khat_draws=20, predictive_samples=3)
    result = runs["vpt"].check_posterior(options, tmp_path / "check", progress=False)
    assert json.loads((tmp_path / "check" / CHECK_FILE).read_text()) == result


def test_bad_input_exits_with_2(runs, tmp_path, capsys) -> None:
    for argv in ([str(tmp_path)], [str(runs["coop"].folder)],
                 [str(runs["vpt"].folder), "--chains", "1"]):
        with pytest.raises(SystemExit) as stop:
            run_main(main, argv)
        assert stop.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")
