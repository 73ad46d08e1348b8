"""The accuracy harness's cases (benchmarks/accuracy.py) as tests, on both Ollama versions: each
injects something it controls into one place and checks the phase that grew, against its own
ground truth. The bounds are the harness's (1 ms or 5 %, or three times the phase's own noise on
a loaded machine); on top of them every test checks that the phase the injection went into grew
by at least half of what was injected, so a wide bound alone cannot make a wrong attribution
pass, and for model loads (hundreds of ms) that no other phase grew more. The request and
response paths are in test_ebpf.py and test_ebpf_v034.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO, retry_after_stall

pytestmark = pytest.mark.integration
VERSIONS = ["0.13.5", "0.34.4"]


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("accuracy", Path(REPO) / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _server(testbed_v034: dict[str, Any], version: str) -> dict[str, Any]:
    return dict(next(s for s in testbed_v034["servers"] if s["version"] == version))


def _landed(row: dict[str, Any], *phases: str, most: bool = False) -> None:
    """In the right phase, within the bound, and at least half of it there; with ``most``
    (a load: hundreds of ms, far above any phase's noise) no other phase grew more."""
    assert row["ok"], row
    assert row["grew_ms"] >= 0.5 * row["injected_ms"], row
    if most:
        assert row["grew_most"].split("+")[0] in phases, row


@pytest.mark.parametrize("version", VERSIONS)
def test_a_reload_by_options_is_named(testbed_v034: dict[str, Any], tmp_path: Path, version: str) -> None:
    server = _server(testbed_v034, version)
    row = retry_after_stall(server, lambda: _harness().reload_case(server, tmp_path))
    _landed(row, "server.model_load", most=True)  # reason "reload" in every interval, the diagnosis names it


@pytest.mark.parametrize("version", VERSIONS)
def test_a_longer_prompt_grows_the_prefill_by_what_the_runner_says(testbed_v034: dict[str, Any], tmp_path: Path,
                                                                   version: str) -> None:
    server = _server(testbed_v034, version)
    row = retry_after_stall(server, lambda: _harness().prefill_case(server, tmp_path))
    assert row["injected_ms"] > 5, row  # the extra tokens cost something measurable
    _landed(row, "runner.prefill")


@pytest.mark.parametrize("version", VERSIONS)
def test_a_delay_inside_the_client_is_the_clients(testbed_v034: dict[str, Any], tmp_path: Path,
                                                  version: str) -> None:
    """The user's own httpx transport holds the first chunk: client.first_token, not the server."""
    server = _server(testbed_v034, version)
    row = retry_after_stall(server, lambda: _harness().client_case(server, tmp_path))
    _landed(row, "client.first_token")


@pytest.mark.parametrize("version", VERSIONS)
def test_waiting_for_the_cancelled_requests_slot(testbed_v034: dict[str, Any], tmp_path: Path, version: str) -> None:
    """One slot, the interrupt reaches the server 40 ms late: the wait is the semaphore's."""
    row = _harness().slot_case(_server(testbed_v034, version), tmp_path)
    _landed(row, "server.runner_wait", "runner.admit")
    assert row["close_held_ms"] >= 40, row


@pytest.mark.parametrize("version", VERSIONS)
def test_a_load_after_keep_alive_0_is_named_expired(testbed_v034: dict[str, Any], tmp_path: Path,
                                                    version: str) -> None:
    server = _server(testbed_v034, version)
    row = retry_after_stall(server, lambda: _harness().expired_case(server, tmp_path))
    _landed(row, "server.model_load", most=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_loads_that_evict_and_overlap_the_teardown_are_named(testbed_v034: dict[str, Any], tmp_path: Path,
                                                             version: str) -> None:
    """OLLAMA_MAX_LOADED_MODELS=1 and the second request on the other model: its load waits for
    the interrupted request's teardown and evicts its runner; the first is cold, the rest are
    loads of a model evicted a round before."""
    server = _server(testbed_v034, version)
    rows = retry_after_stall(server, lambda: _harness().evicted_cases(server, tmp_path))
    assert [r["case"].split(":")[0] for r in rows] == ["model load (cold", "model load (evicted", "model load (evicted"]
    for row in rows:
        _landed(row, "server.model_load", "server.schedule", most=True)
    assert sum(r["overlapping_teardown"] for r in rows) >= 1, rows


@pytest.mark.parametrize("version", VERSIONS)
def test_several_clients_at_once_keep_their_own_delays(testbed_v034: dict[str, Any], tmp_path: Path,
                                                       version: str) -> None:
    """Two clients at once, one through a relay holding its requests: its server.receive grows,
    the other's does not (a request whose connection is unknown is never given another's events)."""
    delayed, other = _harness().clients_cases(_server(testbed_v034, version), tmp_path)
    _landed(delayed, "server.receive")
    assert other["ok"] and abs(other["grew_ms"]) < 0.5 * delayed["injected_ms"], (delayed, other)
