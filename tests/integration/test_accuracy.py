"""The accuracy harness's cases that no other test covers (benchmarks/accuracy.py), on both
Ollama versions: a reload forced by an options change is named as one, and a longer prompt grows
runner.prefill by what the runner itself says the extra tokens cost."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO, retry_after_stall

pytestmark = pytest.mark.integration


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("accuracy", Path(REPO) / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", ["0.13.5", "0.34.4"])
def test_a_reload_by_options_is_named(testbed_v034: dict[str, Any], tmp_path: Path, version: str) -> None:
    server = next(s for s in testbed_v034["servers"] if s["version"] == version)
    row = retry_after_stall(server, lambda: _harness().load_case(server, tmp_path, "reload"))
    assert row["ok"], row  # server.model_load, reason "reload", in every interval, and the diagnosis


@pytest.mark.parametrize("version", ["0.13.5", "0.34.4"])
def test_a_longer_prompt_grows_the_prefill_by_what_the_runner_says(testbed_v034: dict[str, Any], tmp_path: Path,
                                                                   version: str) -> None:
    server = next(s for s in testbed_v034["servers"] if s["version"] == version)
    row = retry_after_stall(server, lambda: _harness().prefill_case(server, tmp_path))
    assert row["injected_ms"] > 5, row  # the extra tokens cost something measurable
    assert row["ok"], row
