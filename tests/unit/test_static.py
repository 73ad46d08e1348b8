"""The static checks the README's test command runs: the import contracts (import-linter), ruff and
mypy --strict. The folders `tracer/` and `collectors/` are installed as one package, `ollama_tracer`
(setuptools package-dir), which static tools cannot map; they read a link tree of that package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def _package_tree(into: Path, copy: bool = False) -> Path:
    """``into/ollama_tracer`` laid out as the wheel installs it (symlinks, or copies to edit)."""
    copy_function = shutil.copy2 if copy else os.symlink
    shutil.copytree(REPO / "tracer", into / "ollama_tracer", copy_function=copy_function, ignore=IGNORED)
    shutil.copytree(REPO / "collectors", into / "ollama_tracer" / "collectors", copy_function=copy_function,
                    ignore=IGNORED)
    return into


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold(tmp_path: Path) -> None:
    result = _lint_imports(_package_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_import_contracts_catch_a_collector_that_imports_an_exporter(tmp_path: Path) -> None:
    tree = _package_tree(tmp_path, copy=True)
    victim = tree / "ollama_tracer" / "collectors" / "ollama_log.py"
    victim.write_text(victim.read_text(encoding="utf-8") + "\nfrom ollama_tracer.exporters import table  # noqa\n",
                      encoding="utf-8")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "Collectors import no command, exporter or attribution module BROKEN" in result.stdout
    assert "ollama_tracer.collectors.ollama_log -> ollama_tracer.exporters.table" in result.stdout


def test_ruff_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "tracer", "collectors", "tests", "benchmarks",
                             "scripts"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists(),
                    reason="mypy is not installed (scripts/bootstrap.sh installs the dev extras)")
def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    tree = _package_tree(tmp_path)
    env = dict(os.environ, MYPYPATH=str(tree))
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                             "--cache-dir", str(tmp_path / "cache"), "-p", "ollama_tracer"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
