from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tracer(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
               check: bool = False, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m tracer ARGS` the way a user would, with an explicit timeout."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "tracer", *args], capture_output=True, text=True, timeout=timeout,
        env=full_env, cwd=cwd or REPO, check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tracer {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def _testbed(with_jaeger: bool) -> Iterator[dict[str, Any]]:
    was_running = run_tracer("testbed", "status", "--json", timeout=60).returncode == 0
    args = ["testbed", "up", "--json"] + (["--with-jaeger"] if with_jaeger else [])
    # The first `up` on a fresh machine builds Ollama (and Jaeger) from source: minutes.
    proc = run_tracer(*args, timeout=1800, check=True)
    yield json.loads(proc.stdout)
    if not was_running:
        run_tracer("testbed", "down", timeout=120)


@pytest.fixture(scope="session")
def testbed() -> Iterator[dict[str, Any]]:
    """A real Ollama v0.13.5 with both synthetic models, started once per session."""
    yield from _testbed(with_jaeger=False)


@pytest.fixture(scope="session")
def testbed_jaeger(testbed: dict[str, Any]) -> dict[str, Any]:
    """The same testbed plus a real Jaeger v2 (stopped with the testbed at session end)."""
    proc = run_tracer("testbed", "up", "--json", "--with-jaeger", timeout=1800, check=True)
    description: dict[str, Any] = json.loads(proc.stdout)
    assert description["jaeger"] is not None
    return description
