"""The wheel holds `ollama_tracer` and nothing else, with every file the source tree has.

One top-level name is what keeps an app's own `tracer.py` or `collectors/` from being shadowed by
us (tests/integration/test_shadowing.py); this checks the installed artefact, in a plain venv that
cannot see the editable install, so a package missing from pyproject's `packages`, or an asset
missing from `package-data`, fails here rather than on a user's machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

PACKAGE = "ollama_tracer"
# The source folders and the package each one becomes (pyproject's package-dir).
FOLDERS = {"tracer": PACKAGE, "collectors": f"{PACKAGE}.collectors"}
# Loaded at run time by path, not imported: a wheel without them installs fine and fails later.
RUNTIME_FILES = (
    "autoinstrument/bootstrap/sitecustomize.py",  # `tracer capture`/`run` put its folder on PYTHONPATH
    "exporters/html_report.js",
    "exporters/html_report.css",
    "py.typed",
)
# What a build leaves in a source tree; a stale build/lib would even end up in the wheel.
NOT_SOURCE = shutil.ignore_patterns(".git", ".ci", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                    ".hypothesis", ".*_cache", ".venv", ".whl", "captures")
TIMEOUT_S = 120


def _build_requirements_met() -> bool:
    """Whether this interpreter can build the wheel itself (`--no-build-isolation`, no network)."""
    try:
        import tomllib
        from packaging.requirements import Requirement
    except ImportError:
        return False
    requires = tomllib.loads(Path(REPO, "pyproject.toml").read_text())["build-system"]["requires"]
    for text in requires:
        requirement = Requirement(text)
        try:
            if not requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True):
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def _run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _source_files() -> set[str]:
    """Every file of the two source folders, as its path in the wheel."""
    files: set[str] = set()
    for folder, package in FOLDERS.items():
        root = Path(REPO, folder)
        for path in root.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add("/".join([*package.split("."), *path.relative_to(root).parts]))
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    # Built from a clean copy: setuptools writes build/ and *.egg-info into the tree it builds, and
    # other work in the repository must neither see them nor leak into this wheel.
    source = work / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    if _build_requirements_met():
        isolation = ["--no-build-isolation"]  # no network at all
    else:  # pip fetches [build-system] requires from the package index, as `pip install -e .` did
        isolation = []
        print("NOTE: [build-system] requires are not installed here; pip builds the wheel in isolation",
              file=sys.stderr)
    out = work / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", out, source, cwd=work)
    (built,) = out.glob(f"{PACKAGE}-*.whl")
    return built


def test_the_wheel_has_one_top_level_name_and_every_source_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert archive.read(f"{dist_info}/top_level.txt").decode().split() == [PACKAGE]
        assert "tracer = ollama_tracer.cli:entry" in archive.read(f"{dist_info}/entry_points.txt").decode()
    outside = [n for n in names if n.split("/")[0] not in (PACKAGE, dist_info)]
    assert outside == [], "files outside the package and its dist-info"
    packaged = {n for n in names if n.split("/")[0] == PACKAGE}
    for runtime_file in RUNTIME_FILES:
        assert f"{PACKAGE}/{runtime_file}" in packaged, runtime_file
    source = _source_files()
    missing, extra = sorted(source - packaged), sorted(packaged - source)
    assert not missing, f"in the source tree but not in the wheel (pyproject packages/package-data): {missing}"
    assert not extra, f"in the wheel but not in the source tree: {extra}"


def test_a_plain_venv_has_ollama_tracer_and_no_tracer_or_collectors(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)  # no --system-site-packages: nothing else is there
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path, env=env)
    assert (venv / "bin" / "tracer").exists()
    # cwd is tmp_path, not the repository, whose `tracer/` folder would otherwise be found first.
    for name in ("tracer", "collectors"):
        proc = subprocess.run([python, "-c", f"import {name}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S, check=False)
        assert proc.returncode == 1 and f"ModuleNotFoundError: No module named '{name}'" in proc.stderr, proc.stderr
    # Importing ollama_tracer would need its dependencies (--no-deps): find the files instead. The
    # assets are every non-.py file of the source tree (.bt, .js, .css, py.typed, ...).
    assets = sorted({*RUNTIME_FILES, *(f.split("/", 1)[1] for f in _source_files() if not f.endswith(".py"))})
    check = (
        "import importlib.util, pathlib, sys\n"
        f"spec = importlib.util.find_spec({PACKAGE!r})\n"
        "assert spec is not None and spec.origin is not None\n"
        "root = pathlib.Path(spec.origin).parent\n"
        "assert root.is_relative_to(sys.prefix), (root, sys.prefix)\n"
        f"for path in {assets!r}:\n"
        "    assert (root / path).is_file(), path\n"
        "print(root)\n"
    )
    proc = _run(python, "-c", check, cwd=tmp_path, env=env)
    assert Path(proc.stdout.strip()).is_relative_to(venv)
