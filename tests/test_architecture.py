"""The package's shape: the import rule between layers, one name per module, module sizes."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bayesprompt

REPO = Path(__file__).resolve().parent.parent
#: The most lines a module of bayesprompt/ may have (docs/ARCHITECTURE.md).
MAX_MODULE_LINES = 450


def installed_layout(target: Path) -> Path:
    """A copy of the package as `pip install .` lays it out (models/ and analysis/ inside
    bayesprompt/), under `target`; the folder to put on PYTHONPATH."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "bayesprompt", target / "bayesprompt", ignore=ignore)
    for name in bayesprompt.TOP_LEVEL_SUBPACKAGES:
        shutil.copytree(REPO / name, target / "bayesprompt" / name, ignore=ignore)
    return target


def lint_imports(source: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts of pyproject.toml, checked on the package under `source`."""
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
               "lint_imports_command()", str(REPO / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, capture_output=True, text=True, cwd=source,
                          env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"})


def test_every_layer_imports_only_the_layers_below_it(tmp_path: Path) -> None:
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, imported", [
    ("metrics.py", "bayesprompt.analysis.plots"),       # the core into analysis
    ("clip/miniclip.py", "bayesprompt.data.datasets"),   # a layer up
    ("inference/svi.py", "bayesprompt.dual_view"),      # an independent sibling
])
def test_an_import_against_the_layers_breaks_the_contract(tmp_path: Path, module: str,
                                                          imported: str) -> None:
    """A function-local import counts too: the contract has teeth."""
    source = installed_layout(tmp_path)
    with open(source / "bayesprompt" / module, "a") as file:
        file.write(f"\n\ndef _late_import():\n    import {imported}  # noqa\n")
    result = lint_imports(source)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout.upper() and imported in result.stdout


def all_modules() -> list[str]:
    """Every module of the package, models/ and analysis/ included."""
    names = ["bayesprompt"]
    packages = [*(f"bayesprompt.{name}" for name in bayesprompt.TOP_LEVEL_SUBPACKAGES)]
    names += packages
    for info in pkgutil.walk_packages(bayesprompt.__path__, "bayesprompt."):
        names.append(info.name)
        if info.ispkg:
            packages.append(info.name)
    for package in packages:
        path = importlib.import_module(package).__path__
        names += [f"{package}.{info.name}" for info in pkgutil.iter_modules(path)]
    return sorted(set(names))


def test_every_module_loads_under_one_name_only() -> None:
    for name in all_modules():
        importlib.import_module(name)
    files: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("bayesprompt") and path:
            other = files.setdefault(str(Path(path).resolve()), name)
            assert other == name, f"{path} is loaded as {other} and as {name}"
    assert "bayesprompt.models.vpt" in sys.modules and "bayesprompt.analysis.report" in sys.modules


@pytest.mark.parametrize("name", ["bayesprompt.bayesprompt", "bayesprompt.tests",
                                  "bayesprompt.experiments", "bayesprompt.docs"])
def test_only_the_package_is_importable_under_its_name(name: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_no_module_is_longer_than_the_limit() -> None:
    sources = [*REPO.glob("bayesprompt/**/*.py"), *REPO.glob("analysis/*.py")]
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in sources}
    assert {p: n for p, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_model_files_import_only_the_program_and_the_dual_view() -> None:
    """A model file is readable against two packages, `bayesprompt.program` (PromptModel,
    priors, guides) and `bayesprompt.dual_view` (E2MIM), and the foundation's errors and
    option checks."""
    for path in (REPO / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("bayesprompt"):
                assert node.module.split(".")[1] in ("program", "dual_view", "errors", "options"), \
                    (path, node.module)
