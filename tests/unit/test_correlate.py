"""Correlation of GPU samples and stacks with phases, and the eBPF profile's parsing and symbols."""

from __future__ import annotations

import ctypes
import io
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from ollama_tracer.attribution.correlate import Evidence, app_frame, correlate
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.ebpf_profile import (
    BUCKET_NS,
    FLUSH_ENTRIES,
    MapReader,
    Symbolizer,
    flush_ms,
    parse_samples,
    probe,
    read_maps,
)
from ollama_tracer.exporters import table

from tests.unit.test_perfetto import T0, _data, _render, _thread_names, assert_properly_nested

MS = 1_000_000


@dataclass(frozen=True)
class Gpu:
    time_ns: int
    gpu: int
    metric: str
    value: float
    source: str = "query"
    pid: int | None = None


@dataclass(frozen=True)
class Native:
    time_ns: int
    pid: int
    tid: int
    frames: tuple[str, ...]


@dataclass(frozen=True)
class Py:
    start_ns: int
    end_ns: int
    pid: int
    tid: int
    frames: tuple[str, ...]


def _attribution() -> dict[str, Any]:
    def phase(name: str, start: int, end: int, process: str) -> dict[str, Any]:
        return {"name": name, "start_ns": T0 + start * MS, "end_ns": T0 + end * MS, "process": process,
                "source": "ebpf", "duration_ms": float(end - start)}

    intervals = []
    for index, at in enumerate((0, 1000, 2000)):
        intervals.append({"index": index, "warmup": index == 0, "phases": [
            phase("client.gap", at, at + 100, "client"),
            phase("server.model_lookup", at + 100, at + 200, "server"),
            phase("runner.prefill", at + 203, at + 208, "runner"),
        ], "off_critical_path": []})
    return {"intervals": intervals, "summary": {"phases": [{"name": "client.gap"}, {"name": "server.model_lookup"},
                                                           {"name": "runner.prefill"}]}}


def _evidence() -> Evidence:
    gpu = []
    for t in range(0, 3000, 10):  # 100 Hz; busy only inside the model lookups
        busy = (t % 1000) in range(100, 200)
        gpu.append(Gpu(T0 + t * MS, 0, "gpu_util", 90.0 if busy else 5.0))
        gpu.append(Gpu(T0 + t * MS, 0, "mem_used_bytes", 1e9 + (1e6 if (t % 1000) >= 150 else 0)))
        gpu.append(Gpu(T0 + t * MS, 0, "power_w", 300.0 if busy else 60.0))
    native = [Native(T0 + (at + 100 + k * 10) * MS, 10, 11, ("main", "server.GetModel", "gguf.readString",
                                                             "runtime.mallocgc"))
              for at in (0, 1000, 2000) for k in range(10)]
    native += [Native(T0 + (at + 150) * MS, 20, 21, ("ggml_vec_dot_f32",)) for at in (1000, 2000)]
    python = [Py(T0 + (at + 10) * MS, T0 + (at + 60) * MS, 30, 31, ("<module> (t.py)", "busy_spin (t.py)"))
              for at in (0, 1000, 2000)]
    python.append(Py(T0, T0 + 3000 * MS, 30, 99, ("_bootstrap (threading.py)", "_tracer_clock_marker (a.py)")))
    return Evidence(gpu_samples=gpu, native_samples=native, native_roles={10: "server", 20: "runner"},
                    python_slices=python, python_rate_hz=100)


def test_each_phase_gets_its_gpu_window_and_its_stacks_per_process() -> None:
    attribution = correlate(_attribution(), _evidence())
    lookup = attribution["intervals"][1]["phases"][1]
    gpu = lookup["gpu"]["0"]
    assert gpu["samples"] == 10 and gpu["util_mean"] == 90.0 and gpu["util_max"] == 90.0
    assert gpu["mem_delta_bytes"] == 1_000_000 and gpu["power_w_mean"] == 300.0
    assert lookup["stacks"]["server"][0]["samples"] == 10
    assert lookup["top_functions"]["server"][0] == {"function": "gguf.readString", "samples": 10}
    assert lookup["top_functions"]["runner"][0]["function"] == "ggml_vec_dot_f32"
    gap = attribution["intervals"][1]["phases"][0]
    assert gap["gpu"]["0"]["util_max"] == 5.0
    # 50 ms of busy_spin at 100 Hz are 5 samples; the tracer's own marker thread is not the client's work.
    assert gap["top_functions"] == {"client": [{"function": "busy_spin (t.py)", "samples": 5.0}]}
    # A 5 ms phase has no GPU sample inside: it takes the value in effect, and says so.
    prefill = attribution["intervals"][1]["phases"][2]
    assert prefill["gpu"]["0"]["samples"] == 0 and prefill["gpu"]["0"]["util_mean"] == 5.0
    assert "stacks" not in prefill


def test_python_stretches_move_back_by_the_mean_sampling_lag() -> None:
    # py-spy saw busy_spin from +10 to +60 ms; its Poisson timer sees each change one period
    # (10 ms) late on average, so the code ran over about [0, 50) ms: nothing of it lands in a
    # phase starting at +52 ms, while a phase over [0, 50) gets all five samples.
    def phase(name: str, start: int, end: int) -> dict[str, Any]:
        return {"name": name, "start_ns": T0 + start * MS, "end_ns": T0 + end * MS, "process": "client",
                "source": "client", "duration_ms": float(end - start)}

    attribution = {"intervals": [{"index": 0, "phases": [phase("client.gap", 0, 50), phase("client.request", 52, 60)],
                                  "off_critical_path": []}], "summary": {"phases": []}}
    slices = [Py(T0 + 10 * MS, T0 + 60 * MS, 1, 2, ("<module> (t.py)", "busy_spin (t.py)"))]
    correlate(attribution, Evidence(python_slices=slices, python_rate_hz=100))
    gap, request = attribution["intervals"][0]["phases"]
    assert gap["top_functions"]["client"] == [{"function": "busy_spin (t.py)", "samples": 5.0}]
    assert gap["stack_resolution_ms"] == {"client": 10.0}
    assert "stacks" not in request


def test_client_stacks_come_from_the_thread_that_made_the_request() -> None:
    attribution = {"intervals": [{"index": 0, "client": {"pid": 1, "thread": 2}, "off_critical_path": [], "phases": [
        {"name": "client.gap", "start_ns": T0, "end_ns": T0 + 100 * MS, "process": "client", "source": "client",
         "duration_ms": 100.0}]}], "summary": {"phases": []}}
    slices = [Py(T0, T0 + 110 * MS, 1, 2, ("main (t.py)", "busy_spin (t.py)")),
              Py(T0, T0 + 110 * MS, 1, 3, ("Thread.run (threading.py)", "_worker (thread.py)")),  # an idle pool
              Py(T0, T0 + 110 * MS, 4, 2, ("other (o.py)",))]  # another process, same pthread id
    correlate(attribution, Evidence(python_slices=slices, python_rate_hz=100))
    phase = attribution["intervals"][0]["phases"][0]
    assert phase["top_functions"] == {"client": [{"function": "busy_spin (t.py)", "samples": 10.0}]}


def test_summary_merges_measured_intervals_only() -> None:
    attribution = correlate(_attribution(), _evidence())
    rows = {row["name"]: row for row in attribution["summary"]["phases"]}
    assert rows["server.model_lookup"]["top_functions"]["server"][0]["samples"] == 20  # intervals 1 and 2
    assert rows["server.model_lookup"]["gpu"]["0"]["intervals"] == 2
    assert attribution["correlation"]["native_stack_samples"] == 32


def test_no_evidence_adds_nothing() -> None:
    attribution = correlate(_attribution(), Evidence())
    assert all("gpu" not in p and "stacks" not in p for iv in attribution["intervals"] for p in iv["phases"])


def test_app_frame_skips_runtime_plumbing() -> None:
    assert app_frame(("main", "gguf.readString", "runtime.mallocgc", "runtime.memmove")) == "gguf.readString"
    assert app_frame(("runtime.goexit", "runtime.gcDrain")) == "runtime.gcDrain"
    assert app_frame(()) == "?"


RAW = """R 100 5 6 7 200 POST
P 1000000 5 6

\t4b78a0 0x4b78a0 ([unknown])
\t10920c7 0x10920c7 ([unknown])

U 1000100 5 6 3
P 2000000 7 8

\t0x1 0x1 ([unknown])

P notanumber 1 2

P 3000000 7 9

\t7f00 0x7f00 ([unknown])
"""


def test_profile_blocks_are_parsed_between_other_events() -> None:
    clock = ClockModel.measure()
    blocks = list(parse_samples(io.StringIO(RAW), clock))
    good = [b for b in blocks if b is not None]
    assert [(b[1], b[2], b[3]) for b in good] == [(5, 6, (0x4b78a0, 0x10920c7)), (7, 8, (0x1,)), (7, 9, (0x7f00,))]
    assert good[0][0] == clock.to_epoch("boottime", 1000000)
    assert blocks.count(None) == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(["P 1 2 3", "\t", "\tzz", "", "P x", "\tff a"])),
                max_size=40))
def test_profile_parser_never_crashes(lines: list[str]) -> None:
    for block in parse_samples([line + "\n" for line in lines], ClockModel.measure()):
        assert block is None or isinstance(block[3], tuple)


def test_symbolizer_resolves_a_libc_function_through_this_process_maps() -> None:
    libc = ctypes.CDLL(None)
    address = ctypes.cast(libc.getpid, ctypes.c_void_p).value
    assert address is not None
    symbolizer = Symbolizer({os.getpid(): read_maps(os.getpid())})
    assert symbolizer.name(os.getpid(), address) in ("getpid", "__getpid")
    assert symbolizer.name(os.getpid(), 0x10) == "0x10"  # unmapped: the address, never a guess


def test_probe_is_filtered_like_the_syscall_layer() -> None:
    clause = probe(99, 'comm == "ollama"')
    assert clause.startswith('profile:hz:99 /comm == "ollama"/') and "ustack(perf, " in clause
    assert "printf" not in clause  # counted in the kernel, printed per flush, not per sample


def test_flushes_keep_a_map_under_bpftraces_key_limit() -> None:
    for hz, cpus in ((99, 1), (99, 2), (99, 16), (99, 256), (999, 64), (1, 1)):
        every = flush_ms(hz, cpus)
        assert 100 <= every <= 5000
        assert hz * cpus * every / 1000 <= FLUSH_ENTRIES or every == 100
    assert f"interval:ms:{flush_ms(99, 2)} " in probe(99, "1", cpus=2)


# What bpftrace 0.17 prints for print(@P0) of a (ms, pid, tid, ustack(perf)) key, and a damaged entry.
PRINTED = "".join(line + "\n" for line in [
    "@P0[10462085, 1363, 1364, ",  # the key's stack starts on the next line, after ", "
    "\t7f9821faee2b 0x7f9821faee2b ([unknown])",
    "\t7f9821bba9c0 0x7f9821bba9c0 ([unknown])",
    "]: 2",
    "R 5 6 7 8 9 POST /api",
    "@P1[10462086, 7, 7, ",
    "\t1 0x1 ([unknown])",
    "@P1[10462090, 7, 8, ",
    "\t7f00 0x7f00 ([unknown])",
    "]: 1",
])


def test_printed_maps_become_the_raw_files_blocks() -> None:
    reader, raw, other = MapReader(), [], []
    for line in io.StringIO(PRINTED):
        blocks = reader.feed(line)
        if blocks is None:
            other.append(line)
        else:
            raw.extend(blocks)
    assert other == ["R 5 6 7 8 9 POST /api\n"]  # not an entry: the caller's to read
    clock = ClockModel.measure()
    samples = [b for b in parse_samples(io.StringIO("".join(raw)), clock) if b is not None]
    middle = BUCKET_NS // 2
    assert [(b[1], b[2], b[3]) for b in samples] == [(1363, 1364, (0x7f9821faee2b, 0x7f9821bba9c0))] * 2 + [
        (7, 8, (0x7f00,))]  # the damaged entry (no count line) is dropped, the next one kept
    assert samples[0][0] == clock.to_epoch("boottime", 10462085 * BUCKET_NS + middle)


def test_perfetto_draws_gpu_counters_and_stack_tracks_that_nest() -> None:
    data = _data()
    data.evidence = _evidence()
    trace = _render(data)
    counters = {e["name"] for e in trace["traceEvents"] if e["ph"] == "C"}
    assert {"GPU 0 util %", "GPU 0 memory used bytes", "GPU 0 power W"} <= counters
    names = set(_thread_names(trace).values())
    assert "stacks 1" in names
    stacks = [e for e in trace["traceEvents"] if e.get("cat") in ("stack.native", "stack.python")]
    assert {e["name"] for e in stacks} >= {"gguf.readString", "busy_spin (t.py)", "ggml_vec_dot_f32"}
    assert_properly_nested(trace["traceEvents"])


def test_table_shows_gpu_and_stacks_columns_on_request() -> None:
    data = _data()
    attribution = correlate(_attribution(), _evidence())
    attribution["summary"].update({"intervals": 2, "interval": {"median_ms": 205.0, "p95_ms": 205.0},
                                   "coverage": 1.0, "unattributed": {"median_ms": 0, "p95_ms": 0, "share": 0}})
    for row in attribution["summary"]["phases"]:
        row.update({"process": "server", "source": "ebpf", "median_ms": 1.0, "p95_ms": 1.0, "share": 0.1})
    for interval in attribution["intervals"]:
        interval["kind"] = "interrupt"
    data.attribution = attribution
    out = io.StringIO()
    table.render(out, data, show=("gpu", "stacks"))
    text = out.getvalue()
    assert "90/90 %" in text and "server: gguf.readString (20)" in text
    plain = io.StringIO()
    table.render(plain, data)
    assert "gguf.readString" not in plain.getvalue()
