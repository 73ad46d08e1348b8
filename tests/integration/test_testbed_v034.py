"""`tracer testbed up --ollama 0.34.4`: a real Ollama v0.34.4 (llama.cpp's llama-server) beside
v0.13.5, both synthetic models streaming on it, symbols kept or stripped on request."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from elftools.elf.elffile import ELFFile

from tests.conftest import run_tracer

pytestmark = pytest.mark.integration

PROMPT = "Tell me a long story about the river and the mountain city"
MODELS = ["tracer-gemma3:test", "tracer-llama:test"]


def _server(description: dict[str, Any], version: str) -> dict[str, Any]:
    server = next((s for s in description["servers"] if s["version"] == version), None)
    assert server is not None, description
    return server


def stream_generate(host: str, model: str, num_predict: int = 8) -> tuple[list[dict[str, Any]], float]:
    """The chunks of one streamed generate, and the seconds to the first token."""
    # Greedy and seeded: a sampled synthetic model may end its answer after one token (CI saw
    # it on tracer-llama), and a test of streaming must not depend on that chance.
    body = {"model": model, "prompt": PROMPT, "stream": True,
            "options": {"num_predict": num_predict, "temperature": 0, "seed": 7}}
    started = time.perf_counter()
    ttft = float("nan")
    chunks = []
    with requests.post(f"{host}/api/generate", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line:
                continue
            chunk = json.loads(line)
            if ttft != ttft and chunk.get("response"):
                ttft = time.perf_counter() - started
            chunks.append(chunk)
    return chunks, ttft


def _has_symtab(path: str) -> bool:
    with open(path, "rb") as handle:
        return ELFFile(handle).get_section_by_name(".symtab") is not None


def test_version_is_0_34_4(testbed_v034: dict[str, Any]) -> None:
    assert testbed_v034["ollama_version"] == "0.34.4"
    server = _server(testbed_v034, "0.34.4")
    assert requests.get(f"{server['host']}/api/version", timeout=5).json()["version"] == "0.34.4"
    assert server["host"].startswith("http://127.0.0.1:")
    assert set(server["models"]) == set(MODELS)


def test_installed_like_a_release(testbed_v034: dict[str, Any]) -> None:
    binary = Path(_server(testbed_v034, "0.34.4")["binary"])
    assert binary.name == "ollama" and binary.parent.name == "bin"
    libs = binary.parent.parent / "lib" / "ollama"
    assert (libs / "llama-server").is_file()
    assert list(libs.glob("libggml*.so*")) and list(libs.glob("libllama*.so*"))


@pytest.mark.parametrize("model", MODELS)
def test_streams_tokens(testbed_v034: dict[str, Any], model: str) -> None:
    host = _server(testbed_v034, "0.34.4")["host"]
    stream_generate(host, model, num_predict=2)  # warm: the model is loaded
    chunks, ttft = stream_generate(host, model)
    tokens = [c for c in chunks if not c["done"] and c["response"]]
    assert len(tokens) >= 2, chunks
    final = chunks[-1]
    assert final["done"] is True
    assert final["eval_count"] > 0
    print(f"\n{model} on 0.34.4: warm TTFT {ttft * 1000:.1f} ms, {len(tokens)} tokens")


def test_state_lists_both_servers(testbed: dict[str, Any], testbed_v034: dict[str, Any]) -> None:
    status = json.loads(run_tracer("testbed", "status", "--json", timeout=60, check=True).stdout)
    versions = {s["version"]: s for s in status["servers"]}
    assert {"0.13.5", "0.34.4"} <= set(versions)
    assert versions["0.13.5"]["host"] != versions["0.34.4"]["host"]
    # The top level still describes the default server, as older callers expect.
    assert status["ollama_version"] == "0.13.5"
    assert status["ollama_host"] == testbed["ollama_host"] == versions["0.13.5"]["host"]
    for server in versions.values():
        assert set(server["models"]) == set(MODELS)
        assert server["reported_version"] == server["version"]
        names = {m["name"] for m in requests.get(f"{server['host']}/api/tags", timeout=5).json()["models"]}
        assert set(MODELS) <= names
    env = run_tracer("testbed", "env", "--ollama", "0.34.4", timeout=60, check=True).stdout.strip()
    assert env == f"export OLLAMA_HOST={versions['0.34.4']['host']}"
    default_env = run_tracer("testbed", "env", timeout=60, check=True).stdout.strip()
    assert default_env == f"export OLLAMA_HOST={versions['0.13.5']['host']}"


def test_symbols_kept_and_stripped(testbed_v034: dict[str, Any]) -> None:
    binary = Path(_server(testbed_v034, "0.34.4")["binary"])
    assert _has_symtab(str(binary)), f"{binary} should keep its symbols"
    assert not _has_symtab(str(binary.with_name("ollama-stripped"))), "the release form should be stripped"


def test_second_up_is_fast(testbed_v034: dict[str, Any]) -> None:
    started = time.monotonic()
    proc = run_tracer("testbed", "up", "--ollama", "0.34.4", "--json", timeout=120, check=True)
    elapsed = time.monotonic() - started
    again = _server(json.loads(proc.stdout), "0.34.4")
    assert again["host"] == _server(testbed_v034, "0.34.4")["host"]
    assert elapsed < 30, f"a cached `testbed up --ollama 0.34.4` took {elapsed:.1f} s"


def test_restart_starts_an_answering_server_afresh_on_its_port(testbed_v034: dict[str, Any]) -> None:
    """`testbed up --restart`: a new process on the same port, even though the old one answered
    (the suite's heal after a v0.34 stall that cleared); both models stream on it."""
    # as it is now (another test may have restarted it since the session's fixture)
    before = _server(json.loads(run_tracer("testbed", "status", "--json", timeout=60, check=True).stdout), "0.34.4")
    assert before["host"] == _server(testbed_v034, "0.34.4")["host"]
    proc = run_tracer("testbed", "up", "--ollama", "0.34.4", "--restart", "--json", timeout=300, check=True)
    after = _server(json.loads(proc.stdout), "0.34.4")
    assert after["host"] == before["host"] and after["pid"] != before["pid"], (before, after)
    assert "as asked" in proc.stderr
    for model in MODELS:
        chunks, _ = stream_generate(after["host"], model, num_predict=4)
        assert chunks[-1]["done"] is True


def test_stripped_binary_runs_and_is_recorded(testbed_v034: dict[str, Any]) -> None:
    host = _server(testbed_v034, "0.34.4")["host"]
    try:
        proc = run_tracer("testbed", "up", "--ollama", "0.34.4", "--stripped", "--json", timeout=300, check=True)
        server = _server(json.loads(proc.stdout), "0.34.4")
        assert server["stripped"] is True and server["binary"].endswith("/bin/ollama-stripped")
        assert server["host"] == host  # restarted on the same port
        chunks, _ = stream_generate(host, "tracer-llama:test", num_predict=4)
        assert chunks[-1]["done"] is True
    finally:
        proc = run_tracer("testbed", "up", "--ollama", "0.34.4", "--json", timeout=300, check=True)
    server = _server(json.loads(proc.stdout), "0.34.4")
    assert server["stripped"] is False and server["binary"].endswith("/bin/ollama")


def test_a_version_that_is_not_served(testbed: dict[str, Any], testbed_v034: dict[str, Any]) -> None:
    before = json.loads(run_tracer("testbed", "status", "--json", timeout=60, check=True).stdout)
    proc = run_tracer("testbed", "up", "--ollama", "0.99.0", "--json", timeout=300)
    assert proc.returncode == 14, proc.stderr  # ExitCode.VERSION_NOT_SERVED
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tracer: error:")]
    assert len(errors) == 1, proc.stderr
    assert "0.99.0" in errors[0] and "go mod download" in errors[0] and "not served" in errors[0]
    assert proc.stdout == ""
    after = json.loads(run_tracer("testbed", "status", "--json", timeout=60, check=True).stdout)
    pids = {s["version"]: s["pid"] for s in before["servers"]}
    assert {s["version"]: s["pid"] for s in after["servers"]} == pids
    for server in after["servers"]:
        assert requests.get(f"{server['host']}/api/version", timeout=5).json()["version"] == server["version"]
