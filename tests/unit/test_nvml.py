"""The NVML collector against recorded driver answers (tests/nvml_standin.py), and the GPU check script."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from ollama_tracer import capture_files
from ollama_tracer.capture import directory as capture_directory
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.nvml import (
    RAW_META,
    RAW_SAMPLES,
    GpuSample,
    NvmlCollector,
    descendant_pids,
    detect_clock_domain,
    load_gpu_samples,
)

from tests.nvml_standin import NvmlStandIn

REPO = Path(__file__).resolve().parents[2]
S = 1_000_000_000
MS = 1_000_000


def _session(tmp_path: Path, **kwargs: Any) -> SessionInfo:
    directory = capture_directory.create(tmp_path / "capture", force=False)
    return SessionInfo(directory=directory, clock=ClockModel.measure(), **kwargs)


def _run(tmp_path: Path, standin: NvmlStandIn, seconds: float = 0.3, **kwargs: Any) -> dict[str, Any]:
    collector = NvmlCollector(100.0, nvml=standin, **kwargs)
    ok, reason = collector.available()
    assert ok, reason
    session = _session(tmp_path)
    before = time.time_ns()
    collector.start(session)
    time.sleep(seconds)
    alive = collector._thread is not None and collector._thread.is_alive()
    stats = collector.stop()
    after = time.time_ns()
    samples, meta, bad = load_gpu_samples(session.directory)
    return {"stats": stats, "samples": samples, "meta": meta, "bad": bad, "before": before, "after": after,
            "alive": alive, "directory": session.directory, "collector": collector}


def _of(samples: list[GpuSample], metric: str, source: str | None = None) -> list[GpuSample]:
    return [s for s in samples if s.metric == metric and (source is None or s.source == source)]


# ----------------------------------------------------------------------------------- sampling


def test_busy_gpu_ring_samples_on_the_epoch_clock(tmp_path: Path) -> None:
    standin = NvmlStandIn.load("h100_busy")
    result = _run(tmp_path, standin, pids=lambda: {4242})
    samples, meta, stats = result["samples"], result["meta"], result["stats"]
    assert result["alive"] and result["bad"] == 0
    # Every row is on the epoch clock, inside the run: boottime ring stamps were converted.
    assert samples and all(result["before"] - 20 * MS <= s.time_ns <= result["after"] for s in samples)
    assert [s.time_ns for s in samples] == sorted(s.time_ns for s in samples)
    gpu_util = _of(samples, "gpu_util")
    assert len(gpu_util) >= 10 and {s.source for s in gpu_util} == {"samples"}
    assert {s.value for s in gpu_util} <= {96.0, 98.0, 99.0}
    assert {s.value for s in _of(samples, "mem_util")} == {42.0}
    assert {s.value for s in _of(samples, "sm_clock_mhz")} == {1980.0}
    assert {s.value for s in _of(samples, "mem_clock_mhz")} == {2619.0}
    assert {s.value for s in _of(samples, "power_w")} <= {312.458, 318.021}
    assert {s.value for s in _of(samples, "mem_used_bytes")} <= {23663230976.0, 23665328128.0}
    # The slow metrics come every 10th tick, not every tick.
    assert 2 <= len(_of(samples, "power_w")) <= stats["ticks"] // 10 + 1
    # Per-process rows only for the pids of interest.
    process = [s for s in samples if s.source == "process"]
    assert process and {s.pid for s in process} == {4242}
    assert {s.value for s in _of(process, "proc_sm_util")} == {95.0}
    assert {s.value for s in _of(process, "proc_mem_util")} == {40.0}
    assert meta["clock_domain"] == {"samples": "boottime", "process": "epoch"}
    assert meta["clock_evidence"]["samples"]["first"]["nearest_within_tolerance"] == "boottime"
    assert meta["process_utilization_supported"] is True
    assert meta["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                             "uuid": "GPU-5f3c9a4e-1d2b-4c8e-9a7f-0b6e2d1c3a48", "memory_total_bytes": 85520809984,
                             "ring_period_ns": meta["gpus"][0]["ring_period_ns"], "unsupported": []}]
    assert meta["gpus"][0]["ring_period_ns"]["gpu_util"] > 0
    assert meta["driver_version"] == "580.159.04" and meta["rate_hz"] == 100.0 and meta["period_ns"] == 10 * MS
    assert 0 < meta["alignment_error_ns"] < 10 * MS
    assert stats["samples"] == len(samples) == meta["samples"]
    assert 10 <= stats["ticks"] <= 40 and stats["ticks"] == meta["ticks"]
    assert stats["errors"] == {} and stats["dropped"] == 0 and stats["gpus"] == 1
    assert stats["clock_domain"] == {"samples": "boottime", "process": "epoch"}


def test_nvml_init_and_shutdown_exactly_once(tmp_path: Path) -> None:
    standin = NvmlStandIn.load("h100_busy")
    collector = NvmlCollector(100.0, nvml=standin)
    assert collector.available() == (True, "")
    assert collector.available() == (True, "")
    collector.start(_session(tmp_path))
    time.sleep(0.05)
    collector.stop()
    assert standin.calls["nvmlInit"] == 1
    assert standin.calls["nvmlShutdown"] == 1


def test_empty_ring_falls_back_to_the_point_query(tmp_path: Path) -> None:
    result = _run(tmp_path, NvmlStandIn.load("h100_idle_empty_ring"))
    samples = result["samples"]
    gpu_util = _of(samples, "gpu_util")
    assert len(gpu_util) >= 20 and {s.source for s in gpu_util} == {"query"}
    assert {s.value for s in gpu_util} <= {0.0, 3.0}
    assert {s.source for s in _of(samples, "mem_util")} == {"query"}
    # Empty buffers are not errors, and the idle-clock point queries still run.
    assert result["stats"]["errors"] == {}
    assert {s.value for s in _of(samples, "sm_clock_mhz")} == {345.0}
    assert {s.value for s in _of(samples, "power_w")} == {69.312}
    assert result["meta"]["clock_domain"]["samples"] is None  # never saw a stamp, so never guessed
    assert all(result["before"] <= s.time_ns <= result["after"] for s in gpu_util)


def test_driver_errors_are_counted_and_the_thread_survives(tmp_path: Path) -> None:
    result = _run(tmp_path, NvmlStandIn.load("h100_flaky"), seconds=0.4, pids=lambda: {4242})
    errors, samples, meta = result["stats"]["errors"], result["samples"], result["meta"]
    assert result["alive"]
    assert errors["nvmlDeviceGetPowerUsage"] >= 2
    assert errors["nvmlDeviceGetClockInfo"] >= 1
    assert errors["nvmlDeviceGetSamples"] >= 1
    assert errors["tick:TypeError"] >= 1  # the malformed answer broke a tick, not the thread
    assert errors["nvmlDeviceGetUtilizationRates"] >= 1  # a non-NVML exception is counted the same way
    assert {s.source for s in _of(samples, "mem_util")} == {"query"}
    assert meta["errors"] == errors
    # Sampling went on after the errors: power rows from the last third of the run.
    last_third = result["after"] - (result["after"] - result["before"]) // 3
    assert any(s.time_ns >= last_third for s in _of(samples, "gpu_util"))
    assert result["stats"]["ticks"] >= 20
    # The garbage utilization value was rejected, not written.
    assert meta["rejected_values"] >= 1
    assert all(0 <= s.value <= 100 for s in _of(samples, "gpu_util"))


def test_process_utilization_not_supported_is_asked_once(tmp_path: Path) -> None:
    standin = NvmlStandIn.load("h100_no_process_util")
    result = _run(tmp_path, standin, pids=lambda: {4242})
    assert standin.calls["nvmlDeviceGetProcessUtilization"] == 1
    assert result["meta"]["process_utilization_supported"] is False
    assert result["meta"]["gpus"][0]["unsupported"] == ["nvmlDeviceGetProcessUtilization"]
    assert not [s for s in result["samples"] if s.source == "process"]
    assert result["stats"]["errors"] == {}
    assert _of(result["samples"], "gpu_util")


def test_without_known_pids_every_process_is_kept(tmp_path: Path) -> None:
    result = _run(tmp_path, NvmlStandIn.load("h100_busy"))
    assert {s.pid for s in result["samples"] if s.source == "process"} == {4242, 999}


def test_pids_default_to_the_started_command_and_its_descendants(tmp_path: Path) -> None:
    collector = NvmlCollector(100.0, nvml=NvmlStandIn.load("h100_busy"))
    assert collector.available()[0]
    session = _session(tmp_path)
    collector.start(session)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        collector.child_started(os.getpid())
        time.sleep(1.3)  # the pid set is refreshed once a second
        collector.stop()
    finally:
        child.kill()
        child.wait()
    samples, meta, _ = load_gpu_samples(session.directory)
    assert {os.getpid(), child.pid} <= set(meta["pids"])
    # Once pids are known, the fixture's processes (4242, 999) are not among them.
    first_refresh = meta["started_ns"] + 1_100 * MS
    assert not [s for s in samples if s.source == "process" and s.time_ns > first_refresh]


def test_write_failures_are_counted_as_dropped(tmp_path: Path) -> None:
    collector = NvmlCollector(100.0, nvml=NvmlStandIn.load("h100_busy"))
    assert collector.available()[0]
    collector.start(_session(tmp_path))
    assert collector._out is not None

    def disk_full(rows: Any) -> None:
        raise OSError(28, "No space left on device")

    collector._out.append = disk_full  # type: ignore[method-assign]
    time.sleep(0.2)
    stats = collector.stop()
    assert stats["dropped"] > 0 and stats["errors"]["write"] >= 1 and stats["samples"] == 0


def test_unplaceable_ring_stamps_are_counted_and_the_query_fills_in(tmp_path: Path) -> None:
    standin = NvmlStandIn.load("h100_busy")
    stamp = 12_345_678
    for kind in ("GPU", "MEMORY"):
        for answer in standin.fixture["devices"][0][f"nvmlDeviceGetSamples/NVML_{kind}_UTILIZATION_SAMPLES"]:
            for sample in answer.get("samples", []):
                sample["timeStamp"] = stamp  # a clock that matches none of ours
                stamp += 10_000
    result = _run(tmp_path, standin)
    assert result["meta"]["clock_domain"]["samples"] == "unknown"
    assert result["meta"]["clock_evidence"]["samples"]["undecided"]["stamp_us"] >= 12_345_678
    assert result["stats"]["unplaced"] >= 3
    gpu_util = _of(result["samples"], "gpu_util")
    assert gpu_util and {s.source for s in gpu_util} == {"query"}


def test_library_not_found_is_one_sentence(tmp_path: Path) -> None:
    standin = NvmlStandIn.load("no_driver")
    collector = NvmlCollector(nvml=standin)
    assert collector.available() == (False, "no NVIDIA driver (NVML Shared Library Not Found); GPU sampling skipped")
    assert collector.available()[0] is False
    assert standin.calls["nvmlInit"] == 1 and standin.calls["nvmlShutdown"] == 0
    assert collector.stop()["samples"] == 0  # stop without start is harmless


def test_zero_gpus_is_unavailable_and_shuts_nvml_down() -> None:
    standin = NvmlStandIn.load("zero_gpus")
    ok, reason = NvmlCollector(nvml=standin).available()
    assert (ok, reason) == (False, "NVML found no GPU on this machine; GPU sampling skipped")
    assert standin.calls["nvmlInit"] == 1 and standin.calls["nvmlShutdown"] == 1


def test_real_pynvml_never_raises() -> None:
    collector = NvmlCollector()
    ok, reason = collector.available()
    if ok:  # a GPU machine: nothing to assert about the failure path
        collector.stop()
        pytest.skip("NVML works on this machine")
    assert reason.endswith("GPU sampling skipped") and reason.count(";") == 1 and "\n" not in reason


def test_unavailable_start_writes_the_reason(tmp_path: Path) -> None:
    collector = NvmlCollector(nvml=NvmlStandIn.load("no_driver"))
    session = _session(tmp_path)
    collector.start(session)
    collector.stop()
    samples, meta, bad = load_gpu_samples(session.directory)
    assert (samples, bad) == ([], 0)
    assert meta["available"] is False and meta["reason"].startswith("no NVIDIA driver")


def test_capture_files_are_private(tmp_path: Path) -> None:
    result = _run(tmp_path, NvmlStandIn.load("h100_busy"), seconds=0.05)
    directory = result["directory"]
    for name in (RAW_SAMPLES, RAW_META):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((directory / "raw").stat().st_mode) == 0o700


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        NvmlCollector(0)


# ----------------------------------------------------------------------------------- clocks


def test_detect_clock_domain() -> None:
    epoch, boot, mono = 1_764_000_000 * S, 86_400 * S, 86_000 * S  # 400 s spent suspended
    assert detect_clock_domain(epoch // 1000 - 16_000, epoch, boot, mono) == "epoch"
    assert detect_clock_domain(boot // 1000 - 900_000, epoch, boot, mono) == "boottime"
    assert detect_clock_domain(mono // 1000 - 2_000_000, epoch, boot, mono) == "monotonic"
    assert detect_clock_domain(12_345, epoch, boot, mono) == "unknown"
    assert detect_clock_domain(boot // 1000 - 6_000_000, epoch, boot, mono) == "unknown"  # older than 5 s
    assert detect_clock_domain(boot // 1000 - 6_000_000, epoch, boot, mono, tolerance_ns=7 * S) == "boottime"


# ----------------------------------------------------------------------------------- pids


def test_descendants_of_a_live_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {os.getpid(), child.pid} <= descendant_pids({os.getpid()})
    finally:
        child.kill()
        child.wait()


def test_descendants_without_children_files(tmp_path: Path) -> None:
    # A kernel without CONFIG_PROC_CHILDREN: the ppid field of every stat, comm with ") " inside.
    for pid, ppid, comm in ((100, 1, "ollama"), (200, 100, "run) ner"), (300, 200, "x"), (400, 1, "other")):
        (tmp_path / str(pid) / "task" / str(pid)).mkdir(parents=True)
        line = f"{pid} ({comm}) S {ppid} 1 1 0 -1\n"
        (tmp_path / str(pid) / "stat").write_text(line)
        (tmp_path / str(pid) / "task" / str(pid) / "stat").write_text(line)
    assert descendant_pids({100}, proc=tmp_path) == {100, 200, 300}


# ----------------------------------------------------------------------------------- loading


def test_loader_round_trip_and_corrupt_rows(tmp_path: Path) -> None:
    result = _run(tmp_path, NvmlStandIn.load("h100_busy"), seconds=0.1)
    directory = result["directory"]
    good = result["samples"]
    with (directory / RAW_SAMPLES).open("a") as out:
        out.write("not json\n")
        out.write("[1, 2]\n")
        out.write(json.dumps({"t_ns": "1", "gpu": 0, "metric": "gpu_util", "value": 1, "source": "query"}) + "\n")
        out.write(json.dumps({"t_ns": 1, "gpu": 0, "metric": "gpu_util", "value": "1", "source": "query"}) + "\n")
        out.write(json.dumps({"t_ns": 1, "gpu": 0, "metric": "gpu_util", "value": 1, "source": "guess"}) + "\n")
        out.write(json.dumps({"t_ns": 1, "gpu": 0, "metric": "x", "value": 1, "source": "process", "pid": "7"}) + "\n")
        out.write(json.dumps({"t_ns": 5, "gpu": 0, "metric": "gpu_util", "value": 7, "source": "query"}) + "\n")
        out.write('{"t_ns": 6, "gpu": 0, "metr')  # torn last line of a killed capture
    samples, meta, bad = load_gpu_samples(directory)
    assert bad == 7
    assert samples[0] == GpuSample(time_ns=5, gpu=0, metric="gpu_util", value=7.0, source="query")
    assert samples[1:] == good
    assert meta["schema"] == "tracer.gpu/1"


def test_loader_on_a_capture_without_gpu_files(tmp_path: Path) -> None:
    assert load_gpu_samples(tmp_path) == ([], {}, 0)
    (tmp_path / "raw").mkdir()
    (tmp_path / RAW_META).write_text("{torn")
    assert load_gpu_samples(tmp_path) == ([], {}, 0)


# ----------------------------------------------------------------------------------- GPU check


def _check_module() -> ModuleType:
    path = REPO / "scripts" / "gpu_check" / "check_capture.py"
    spec = importlib.util.spec_from_file_location("gpu_check_capture", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _fake_capture(directory: Path, shift_ns: int = 0, busy: float = 100.0, idle_queries: bool = False) -> Path:
    """5 s at 100 Hz: idle, a 2 s ``gpu.phase`` from 1.5 s with the GPU busy, idle again.

    ``idle_queries``: as on a driver whose ring runs dry when idle, the idle rows are point queries,
    and for 300 ms after the span they still read high (their trailing average holds busy time)."""
    (directory / "raw").mkdir(parents=True)
    t0 = 1_764_000_000 * S
    span_start, span_end = t0 + 1_500 * MS, t0 + 3_500 * MS
    rows = []
    for i in range(500):
        t = t0 + i * 10 * MS
        inside = span_start + shift_ns < t <= span_end + shift_ns
        trailing = idle_queries and span_end < t <= span_end + 300 * MS
        rows.append({"t_ns": t, "gpu": 0, "metric": "gpu_util", "value": busy if inside else 80.0 if trailing else 0.0,
                     "source": "samples" if inside or not idle_queries else "query"})
        if i % 10 == 0:
            rows.append({"t_ns": t, "gpu": 0, "metric": "power_w", "value": 300.0, "source": "query"})
    (directory / RAW_SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"schema": "tracer.gpu/1", "rate_hz": 100.0, "clock_domain": {"samples": "boottime", "process": None},
            "gpus": [{"index": 0, "ring_period_ns": {"gpu_util": 10 * MS, "mem_util": 10 * MS}}]}
    (directory / RAW_META).write_text(json.dumps(meta))
    span = {"name": "gpu.phase", "startTimeUnixNano": str(span_start), "endTimeUnixNano": str(span_end)}
    other = {"name": "setup", "startTimeUnixNano": str(t0), "endTimeUnixNano": str(t0 + MS)}
    (directory / capture_files.CLIENT_SPANS).write_text(json.dumps(other) + "\n" + json.dumps(span) + "\n")
    return directory


def test_gpu_check_passes_on_an_aligned_capture(tmp_path: Path) -> None:
    check = _check_module()
    result = check.check(_fake_capture(tmp_path / "ok"))
    assert result.passed, result.lines
    assert result.inside_util == pytest.approx(100.0) and result.outside_util == pytest.approx(0.0)
    assert result.sample_rate_hz == pytest.approx(100.0, rel=0.01)
    # Each ring entry covers the 10 ms before its stamp: centred, a perfect capture reads +5 / -5 ms.
    assert (result.start_edge_ns, result.end_edge_ns, result.tolerance_ns) == (5 * MS, -5 * MS, 10 * MS)
    assert result.clock_domain == {"samples": "boottime", "process": None}
    assert check.main([str(tmp_path / "ok")]) == 0


def test_gpu_check_fails_on_a_shifted_timeline(tmp_path: Path) -> None:
    check = _check_module()
    result = check.check(_fake_capture(tmp_path / "shifted", shift_ns=300 * MS))
    assert not result.passed
    assert result.start_edge_ns == 305 * MS  # 310 ms late, minus half a 10 ms window
    assert [name for name, ok in result.checks if not ok] == ["start edge", "end edge"]
    flat = check.check(_fake_capture(tmp_path / "flat", busy=20.0))
    assert next(name for name, ok in flat.checks if not ok) == "util inside > outside + 30"
    assert check.main([str(tmp_path / "missing")]) == 2


def test_gpu_check_takes_edges_from_the_ring_when_idle_rows_are_queries(tmp_path: Path) -> None:
    result = _check_module().check(_fake_capture(tmp_path / "mixed", idle_queries=True))
    assert result.passed, result.lines
    assert (result.start_edge_ns, result.end_edge_ns) == (5 * MS, -5 * MS)
    # The trailing query rows (80%) are not clean outside samples: their window overlaps the span.
    assert result.outside_util == pytest.approx(0.0)
