"""The testbed is a real Ollama v0.13.5 that streams from both synthetic models."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests

from tests.conftest import run_tracer

pytestmark = pytest.mark.integration

PROMPT = "Tell me a long story about the river and the mountain city"


def stream_generate(host: str, model: str, num_predict: int = 8) -> list[dict[str, Any]]:
    # Greedy and seeded: a sampled synthetic model may end its answer after one token (CI saw
    # it on tracer-llama), and a test of streaming must not depend on that chance.
    body = {"model": model, "prompt": PROMPT, "stream": True,
            "options": {"num_predict": num_predict, "temperature": 0, "seed": 7}}
    with requests.post(f"{host}/api/generate", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        return [json.loads(line) for line in response.iter_lines() if line]


def test_version_is_0_13_5(testbed: dict[str, Any]) -> None:
    assert testbed["ollama_version"] == "0.13.5"
    assert requests.get(f"{testbed['ollama_host']}/api/version", timeout=5).json()["version"] == "0.13.5"


def test_both_models_are_registered(testbed: dict[str, Any]) -> None:
    tags = requests.get(f"{testbed['ollama_host']}/api/tags", timeout=5).json()
    names = {m["name"] for m in tags["models"]}
    assert {"tracer-gemma3:test", "tracer-llama:test"} <= names
    assert set(testbed["models"]) == {"tracer-gemma3:test", "tracer-llama:test"}


@pytest.mark.parametrize("model", ["tracer-gemma3:test", "tracer-llama:test"])
def test_streams_tokens_with_timing_fields(testbed: dict[str, Any], model: str) -> None:
    chunks = stream_generate(testbed["ollama_host"], model)
    tokens = [c for c in chunks if not c["done"] and c["response"]]
    assert len(tokens) >= 2, chunks
    final = chunks[-1]
    assert final["done"] is True
    assert final["load_duration"] > 0
    assert final["prompt_eval_duration"] > 0
    assert final["eval_count"] > 0


def test_second_up_reuses_everything(testbed: dict[str, Any]) -> None:
    # The session fixture's pid may be stale: a heal after Ollama's interrupt deadlock restarts
    # the server (same port). So compare two `up`s made here.
    first = json.loads(run_tracer("testbed", "up", "--json", timeout=600, check=True).stdout)
    started = time.monotonic()
    proc = run_tracer("testbed", "up", "--json", timeout=120, check=True)
    elapsed = time.monotonic() - started
    again = json.loads(proc.stdout)
    assert again["ollama_pid"] == first["ollama_pid"]
    assert again["ollama_host"] == first["ollama_host"] == testbed["ollama_host"]
    assert elapsed < 30, f"a cached `testbed up` took {elapsed:.1f} s"


def test_server_logs_at_debug(testbed: dict[str, Any]) -> None:
    stream_generate(testbed["ollama_host"], "tracer-llama:test", num_predict=2)
    with open(testbed["ollama_log"], encoding="utf-8", errors="replace") as handle:
        log = handle.read()
    assert "level=DEBUG" in log
    assert "completion request" in log
