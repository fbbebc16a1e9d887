"""Loading a received run folder runs no code (`bayesprompt/runs/trust.py`): a model file that the
folder's config.json names is imported only when the caller passes it or trusts it, and a
model file whose content changed since the run recorded its SHA-256 is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_BACKBONE

import bayesprompt
from bayesprompt.commands import analyze, train
from bayesprompt.commands.cli import run_main
from bayesprompt.errors import UserError

#: A model file (CoOp) that leaves a marker file when it is imported.
EVIL_MODEL = '''
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("this code ran")
from bayesprompt.models.coop import Model
'''
GOOD_MODEL = "from bayesprompt.models.coop import Model\n"


def exit_code(main, argv: list[str]) -> int:
    try:
        run_main(main, argv)
    except SystemExit as exit_info:
        return exit_info.code
    return 0


@pytest.fixture(scope="module")
def trained(eurosat_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of the model file good_model.py (a copy of CoOp)."""
    folder = tmp_path_factory.mktemp("trust")
    (folder / "good_model.py").write_text(GOOD_MODEL)
    bayesprompt.fit(dataset="eurosat", root=str(eurosat_root), backbone=TINY_BACKBONE,
                    pretrained="", model=str(folder / "good_model.py"), shots=4, epochs=1,
                    batch_size=4, views=1, cache_dir=str(folder / "cache"),
                    out=str(folder / "run"), device="cpu", precision="fp32")
    return folder


@pytest.fixture
def received(trained: Path, tmp_path: Path) -> Path:
    """A copy of the run whose config.json names evil_model.py, lying beside it."""
    folder = tmp_path / "received"
    shutil.copytree(trained / "run", folder)
    (tmp_path / "evil_model.py").write_text(EVIL_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config["model"] = str(tmp_path / "evil_model.py")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_run_load_and_analyze_and_config_import_no_model_file_of_the_folder(
        received: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    with pytest.raises(UserError, match="trust_model_file=True"):
        bayesprompt.Run.load(received)
    assert exit_code(analyze.main, [str(received)]) == 2
    assert "--trust-model-file" in capsys.readouterr().err
    assert exit_code(train.main, ["--config", str(received / "config.json"),
                                  "--out", str(tmp_path / "again")]) == 2
    assert "--trust-model-file" in capsys.readouterr().err
    # trusted, the file is still checked against the SHA-256 the run recorded: not imported
    with pytest.raises(UserError, match="SHA-256"):
        bayesprompt.Run.load(received, trust_model_file=True)
    assert not marker.exists()
    # a relative path in config.json means a file beside the folder, never the cwd's
    config = json.loads((received / "config.json").read_text())
    (received / "config.json").write_text(json.dumps({**config, "model": "evil_model.py"}))
    with pytest.raises(UserError, match="trust_model_file=True"):
        bayesprompt.Run.load(received)
    assert not marker.exists() and not (tmp_path / "again").exists()


def test_a_model_file_runs_when_passed_or_trusted(trained: Path, received: Path,
                                                  tmp_path: Path) -> None:
    run = bayesprompt.Run.load(received, model=str(trained / "good_model.py"))
    assert run.config.model == str(trained / "good_model.py")
    run = bayesprompt.Run.load(trained / "run", trust_model_file=True)
    assert run.config.model == str(trained / "good_model.py")
    (received / "model_file.json").unlink()  # a run folder that recorded no SHA-256
    with pytest.raises(UserError, match="belongs to another run"):  # its checkpoint's model
        bayesprompt.Run.load(received, trust_model_file=True)
    assert (tmp_path / "MARKER").exists()  # trusted means imported


def test_a_changed_model_file_is_refused_before_it_runs(trained: Path, tmp_path: Path,
                                                        capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "results.json").unlink()
    model = trained / "good_model.py"
    original = model.read_text()
    try:
        model.write_text(EVIL_MODEL)
        with pytest.raises(UserError, match="SHA-256"):
            bayesprompt.Run.load(run, model=str(model))
        config = json.loads((run / "config.json").read_text())
        argv = ["--config", str(run / "config.json"), "--model", str(model), "--resume",
                "--out", str(run), "--device", "cpu", "--precision", "fp32"]
        assert exit_code(train.main, argv) == 2
        assert "SHA-256" in capsys.readouterr().err
        assert not (trained / "MARKER").exists()
        assert config == json.loads((run / "config.json").read_text())
    finally:
        model.write_text(original)
