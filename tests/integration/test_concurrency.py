"""Overlapping requests (OLLAMA_NUM_PARALLEL=2, three clients, two models): each request's server
and runner events are its own, matched by connection and goroutine, never by time order."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.testbed.runtime import start_ollama

from tests.conftest import REPO, run_tracer

pytestmark = pytest.mark.integration
LLAMA, GEMMA = "tracer-llama:test", "tracer-gemma3:test"


@pytest.fixture
def parallel_ollama(testbed: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A second server on the testbed's models, with two slots per runner."""
    binary = Path(testbed["ollama_binary"])
    directory = Path(testbed["ollama_log"]).parent
    managed, host = start_ollama(binary, directory, lambda _m: None, log=tmp_path / "ollama-parallel.log",
                                 settings={"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_MAX_LOADED_MODELS": "2"})
    try:
        yield {"host": host, "pid": managed.pid, "models_dir": directory / "ollama-models"}
    finally:
        managed.stop()


def _model_blob(models_dir: Path, name: str) -> str:
    """The blob a model's runner is started with, from its manifest."""
    repo, tag = name.split(":")
    manifest = json.loads((models_dir / "manifests" / "registry.ollama.ai" / "library" / repo / tag).read_text())
    digest = next(layer["digest"] for layer in manifest["layers"]
                  if layer["mediaType"] == "application/vnd.ollama.image.model")
    return digest.replace(":", "-")


def _runner_blob(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return Path(argv[argv.index("--model") + 1]).name


def test_overlapping_requests_are_matched_by_connection_and_goroutine(parallel_ollama: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "cap"
    target = str(Path(REPO) / "tests" / "targets" / "concurrent_interrupts.py")
    proc = run_tracer("capture", "-o", str(out), "--ollama-host", parallel_ollama["host"], "--profile-hz", "0",
                      "--pyspy-rate", "0", "--", sys.executable, target, f"{LLAMA},{LLAMA},{GEMMA}",
                      env={"TARGET_ROUNDS": "3", "TARGET_TIMEOUT_S": "30"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "raw" / "ebpf_meta.json").read_text())
    assert meta["plan"]["goroutines"]["on"], meta["plan"]["goroutines"]
    attribution = json.loads((out / "attribution.json").read_text())
    interrupts = [iv for iv in attribution["intervals"] if iv["kind"] == "interrupt"]
    assert len(interrupts) == 9, [(iv["kind"], iv["model"]) for iv in attribution["intervals"]]
    matching = attribution["ebpf_matching"]
    # The barrier makes requests overlap: the chain did the matching, and nothing was guessed.
    assert matching["matched_by_chain"] >= 3, matching
    for entry in matching["unmatched"]:
        assert entry["reason"], entry
    blobs = {model: _model_blob(parallel_ollama["models_dir"], model) for model in (LLAMA, GEMMA)}
    chained = overlapped = 0
    for interval in interrupts:
        lookup = next((p for p in interval["phases"] if p["name"] == "server.model_lookup"), None)
        if lookup is None or lookup.get("attributes", {}).get("matched_by") != "chain":
            continue
        chained += 1
        evidence = lookup["attributes"]
        overlapped += int(evidence["concurrent_requests"] > 0)
        if "gguf_scan_ms" not in evidence:  # overlapping file opens: this goroutine's gguf.Open calls
            assert evidence["concurrent_requests"] > 0
        # The runner that served it runs this request's model: a time-order match across the two
        # models' runners would not hold this for every request.
        assert _runner_blob(evidence["runner_pid"]) == blobs[interval["model"]], (interval["model"], evidence)
        names = set(p["name"] for p in interval["phases"])
        assert {"server.receive", "server.decode", "server.model_lookup", "runner.admit"} <= names, names
        # The batch loop samples for every sequence: under overlap, prefill and sample merge.
        runner_rest = {"runner.prefill+sample"} if evidence["concurrent_sequences"] else {"runner.prefill",
                                                                                          "runner.sample"}
        assert runner_rest <= names, names
        assert evidence["gguf_scans"] == 3, evidence  # this handler goroutine's own gguf.Open calls
        assert interval["coverage"] > 0.9, interval
    assert chained == matching["matched_by_chain"] and overlapped >= 3
