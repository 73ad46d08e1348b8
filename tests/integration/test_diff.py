"""`tracer diff` on real captures: the same config twice shows no change; a num_ctx change that
makes Ollama reload the runner in every interval shows the interval grow and a model-load phase."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_tracer, run_tracer_healing

pytestmark = pytest.mark.integration

MODEL = "tracer-llama:test"  # the small model: an interval is tens of ms, a capture ~20 s


def _capture(testbed: dict[str, Any], out: Path, *bench_options: str) -> None:
    host = testbed["ollama_host"]
    proc = run_tracer_healing(
        testbed, "capture", "-o", str(out), "--force", "--ollama-host", host, "--",
        sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--host", host, "--model", MODEL,
        "--iterations", "6", "--request-timeout", "15", *bench_options,
        timeout=240, env={"OLLAMA_HOST": host},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _diff(a: Path, b: Path) -> dict[str, Any]:
    proc = run_tracer("diff", str(a), str(b), "--format", "json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    document: dict[str, Any] = json.loads(proc.stdout)
    assert document["schema"] == "tracer.diff/1"
    return document


def _noise_margin(*captures: Path) -> float:
    """Three times the larger interquartile range of the captures' measured intervals, and never
    under half the smaller median: how far two equal configurations may drift apart on a busy machine."""
    spreads, medians = [], []
    for capture in captures:
        values = [iv["duration_ms"] for iv in json.loads((capture / "attribution.json").read_text())["intervals"]
                  if not iv["warmup"]]
        quartiles = statistics.quantiles(values, n=4)
        spreads.append(quartiles[2] - quartiles[0])
        medians.append(statistics.median(values))
    return max(3 * max(spreads), 0.5 * min(medians))


def _row(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(row for row in document["rows"] if row["name"] == name)


def test_diff_sees_no_change_between_equal_configs_and_a_reload_per_interval(testbed: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    _capture(testbed, a)
    _capture(testbed, b)
    _capture(testbed, c, "--second-num-ctx", "1024", "--json", str(tmp_path / "c.json"))
    assert json.loads((tmp_path / "c.json").read_text())["options"]["second_num_ctx"] == 1024

    same = _diff(a, b)
    print("\n$ tracer diff A B\n" + run_tracer("diff", str(a), str(b), timeout=120).stdout)
    assert same["a"]["intervals"] == same["b"]["intervals"] == 6
    assert same["notes"] == []
    interval = _row(same, "interval")
    # A and B run one after the other, and a busy machine's load can change between them: a 95 %
    # bootstrap of 6 intervals would then call a real (but environmental) shift "significant" now
    # and then. What must hold is that equal configs differ by no more than their own noise, while
    # a reload per interval (below) is far beyond it.
    margin = _noise_margin(a, b)
    assert abs(interval["change_ms"]) <= margin, (interval, margin)
    assert not any("model_load" in row["name"] and row["significant"] for row in same["rows"])

    table = run_tracer("diff", str(a), str(c), timeout=120)
    assert table.returncode == 0, table.stderr
    print("\n$ tracer diff A C\n" + table.stdout)
    changed = _diff(a, c)
    interval = _row(changed, "interval")
    loads = [row for row in changed["rows"] if "model_load" in row["name"]]
    assert loads, [row["name"] for row in changed["rows"]]
    assert "model_load" in table.stdout
    # The reload itself, per interval of C: what the phases that name a model load took.
    reload_ms = statistics.median(
        sum(p["duration_ms"] for p in iv["phases"] if "model_load" in p["name"])
        for iv in json.loads((c / "attribution.json").read_text())["intervals"] if not iv["warmup"])
    assert reload_ms >= 100, reload_ms  # a runner restart: hundreds of ms for this model
    if margin < reload_ms / 3:
        # The usual case: the reload stands far above the captures' own noise, and the diff says so.
        assert interval["significant"] and interval["verdict"] == "slower", interval
        assert interval["change_ms"] > 0 and interval["ci95_ms"][0] > 0
        load = loads[0]
        assert load["only_in"] == "B" and load["n_b"] == 6 and load["significant"], load
        assert "new in B" in table.stdout
    else:
        # A loaded machine: here the interrupted sequence's teardown alone varied by more than a
        # reload (runner.admit 0.9 s in one capture, 0.2 s in the next, with `stress-ng --cpu 2`).
        print(f"\nNOTE: the captures' own noise ({margin:.0f} ms) exceeds the reload ({reload_ms:.0f} ms); "
              "the interval's verdict is not asserted", file=sys.stderr)
    # The diagnosis names the cause, with the reload the eBPF probes saw (Scheduler.load after needsReload).
    diagnosis = {f["cause"]: f for f in json.loads((c / "attribution.json").read_text())["diagnosis"]}
    assert "model_reload" in diagnosis and "num_ctx" in diagnosis["model_reload"]["remedy"], diagnosis
