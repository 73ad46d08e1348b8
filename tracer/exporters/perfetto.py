"""Chrome Trace Event Format JSON that opens in Perfetto (ui.perfetto.dev) and chrome://tracing.

Layout: one process per traced process (the real ``process.pid`` when the spans carry one,
otherwise a stable synthetic pid per service), and in each process these thread tracks:

* ``interval`` (client only): one slice per interrupt→first-token interval;
* ``phases``: the critical-path phases that process measured;
* ``off critical path``: phases such as ``server.cancel``, kept apart so they never look serial;
* ``spans``: the process's own OTLP spans, span events as instants.

Perfetto needs the slices of one track to nest strictly, so a slice that partially overlaps
another on its track moves to an overflow track (``spans (overflow 1)``, ...) instead of
being dropped or clipped.

Times are microseconds (floats) relative to the earliest timestamp in the capture, so they stay
small and exact to the nanosecond; ``metadata.epoch_origin_ns`` gives the absolute origin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TextIO

from ollama_tracer import __version__
from ollama_tracer.attribution.analysis import ExportData
from ollama_tracer.attribution.correlate import Evidence
from ollama_tracer.vocabulary import (
    PROCESS_CLIENT,
    PROCESS_PID,
    PROCESS_SERVER,
    SERVICE_CLIENT,
    SERVICE_NAME,
    SERVICE_RUNNER,
    SERVICE_SERVER,
)

SCHEMA = "tracer.perfetto/1"

# Used when spans carry no process.pid (and always for the server and runner, whose evidence
# comes from eBPF and logs, not spans). Kept small and fixed so traces of two captures line up.
SYNTHETIC_PIDS = {SERVICE_CLIENT: 1, SERVICE_SERVER: 2, SERVICE_RUNNER: 3}

INTERVAL_TRACK = "interval"
PHASES_TRACK = "phases"
OFF_CRITICAL_PATH_TRACK = "off critical path"
SPANS_TRACK = "spans"
STACKS_TRACK = "stacks"
GPU_COUNTERS = {"gpu_util": "util %", "mem_util": "memory util %", "mem_used_bytes": "memory used bytes",
                "power_w": "power W", "sm_clock_mhz": "SM clock MHz", "proc_sm_util": "process SM util %"}
_TRACK_ORDER = (INTERVAL_TRACK, PHASES_TRACK, OFF_CRITICAL_PATH_TRACK, SPANS_TRACK)
_PROCESS_ORDER = {SERVICE_CLIENT: 0, SERVICE_SERVER: 1, SERVICE_RUNNER: 2}

Event = dict[str, Any]


@dataclass
class _Slice:
    name: str
    category: str
    start_ns: int
    end_ns: int
    args: dict[str, Any]
    instants: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class _Process:
    pid: int
    name: str
    tracks: dict[str, list[_Slice]] = field(default_factory=dict)


class _Layout:
    """Processes by service name (and real pid when known), and the slices of each track."""

    def __init__(self, real_pids: set[int]) -> None:
        self.processes: dict[tuple[str, int | None], _Process] = {}
        self._used_pids = set(real_pids)  # reserved first, so no synthetic pid takes a real one

    def process(self, service: str, real_pid: int | None) -> _Process:
        key = (service, real_pid)
        if key not in self.processes:
            self.processes[key] = _Process(pid=self._pid_for(service, real_pid), name=service)
        return self.processes[key]

    def _pid_for(self, service: str, real_pid: int | None) -> int:
        if real_pid is not None:
            return real_pid
        pid = SYNTHETIC_PIDS.get(service, max(SYNTHETIC_PIDS.values()) + 1)
        # An unknown service, or a real process that happens to own a synthetic pid, must not merge.
        while pid in self._used_pids:
            pid += 1
        self._used_pids.add(pid)
        return pid

    def add(self, process: _Process, track: str, item: _Slice) -> None:
        process.tracks.setdefault(track, []).append(item)


def render(outfile: TextIO, data: ExportData) -> None:
    """Write ``data`` as one Chrome Trace Event Format JSON object."""
    layout = _Layout({pid for span in data.spans if (pid := _span_process(span)[1]) is not None})
    skipped_spans = 0
    client_by_trace: dict[str, _Process] = {}
    for span in sorted(data.spans, key=_span_sort_key):
        item = _span_slice(span)
        if item is None:
            skipped_spans += 1
            continue
        process = layout.process(*_span_process(span))
        layout.add(process, SPANS_TRACK, item)
        client_by_trace.setdefault(str(span.get("traceId", "")), process)

    intervals = data.attribution.get("intervals", [])
    for interval in intervals:
        trace_id = str(interval.get("trace_id", ""))
        # The interval and client phases belong with the client process that sent the request.
        client = client_by_trace.get(trace_id) or layout.process(SERVICE_CLIENT, None)
        layout.add(client, INTERVAL_TRACK, _interval_slice(interval))
        for track, key in ((PHASES_TRACK, "phases"), (OFF_CRITICAL_PATH_TRACK, "off_critical_path")):
            for phase in interval.get(key, []):
                process_name = str(phase.get("process", PROCESS_CLIENT))
                process = client if process_name == PROCESS_CLIENT else layout.process(f"ollama-{process_name}", None)
                layout.add(process, track, _phase_slice(phase, interval))

    if data.evidence is not None:
        _add_stacks(layout, data.evidence)
    origin_ns = _origin_ns(layout)
    events: list[Event] = []
    for process in sorted(layout.processes.values(), key=lambda p: (_PROCESS_ORDER.get(p.name, 99), p.pid)):
        events.extend(_process_events(process, origin_ns))
    if data.evidence is not None and data.evidence.gpu_samples:
        events.extend(_gpu_counters(layout, data.evidence, origin_ns))

    dropped = data.meta.get("drops", {})
    metadata: dict[str, Any] = {
        "schema": SCHEMA,
        "tracer_version": __version__,
        "capture_tracer_version": data.meta.get("tracer_version"),
        "command": data.meta.get("command", []),
        "exit_code": data.meta.get("exit_code"),
        "clock": data.meta.get("clock"),
        "epoch_origin_ns": origin_ns,
        "epoch_origin_us": origin_ns / 1000,
        "intervals": len(intervals),
        "spans": len(data.spans) - skipped_spans,
        "skipped_spans": skipped_spans,  # rows without usable timestamps
        "dropped": dropped,
        "overflow": any(bool(count) for count in dropped.values()) if isinstance(dropped, dict) else bool(dropped),
    }
    outfile.write(json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "metadata": metadata},
                             separators=(",", ":")))  # one string: the C encoder (json.dump's is Python)
    outfile.write("\n")



def counter_events(name: str, pid: int, samples: list[tuple[int, float]], *, origin_ns: int) -> list[Event]:
    """A counter track (e.g. GPU utilisation) from ``(epoch_ns, value)`` samples, in time order."""
    return [
        {"name": name, "ph": "C", "pid": pid, "ts": _us(epoch_ns, origin_ns), "args": {name: value}}
        for epoch_ns, value in sorted(samples)
    ]


def _gpu_counters(layout: _Layout, evidence: Evidence, origin_ns: int) -> list[Event]:
    """One counter track per GPU metric, under a process of its own ("gpu")."""
    pid = layout.process("gpu", None).pid
    series: dict[str, list[tuple[int, float]]] = {}
    for sample in evidence.gpu_samples:
        if sample.metric in GPU_COUNTERS:
            label = f"GPU {sample.gpu} {GPU_COUNTERS[sample.metric]}"
            if getattr(sample, "pid", None) is not None:
                label += f" pid {sample.pid}"  # type: ignore[attr-defined]
            series.setdefault(label, []).append((sample.time_ns, sample.value))
    events: list[Event] = []
    for label, samples in sorted(series.items()):
        events.extend(counter_events(label, pid, samples, origin_ns=origin_ns))
    return events


def _add_stacks(layout: _Layout, evidence: Evidence) -> None:
    """Stacks as flame-chart slices on thread tracks of their own (``stacks 1``, ``stacks 2``...).

    A run of identical consecutive samples of one thread becomes one slice per frame (root
    outermost), lasting from the first sample to one period after the last. Threads whose
    lifetimes do not overlap share a track (ggml starts short-lived worker threads per graph),
    so the number of tracks is the number of threads alive at once, not ever seen.
    """
    roles = evidence.native_roles or {}
    period = 1_000_000_000 // max(1, int(evidence.native_hz or 99))
    runs: dict[tuple[str, int, int], list[list[Any]]] = {}  # (service, pid, tid) -> [start, end, frames, n]
    for sample in sorted(evidence.native_samples, key=lambda x: x.time_ns):
        key = (f"ollama-{roles.get(sample.pid, PROCESS_SERVER)}", sample.pid, sample.tid)
        thread_runs = runs.setdefault(key, [])
        last = thread_runs[-1] if thread_runs else None
        if last is not None and last[2] == sample.frames and sample.time_ns - last[1] <= period // 2:
            last[1], last[3] = sample.time_ns + period, last[3] + 1
        else:
            if last is not None:
                last[1] = min(last[1], sample.time_ns)  # the thread's next sample ends this run
            thread_runs.append([sample.time_ns, sample.time_ns + period, sample.frames, 1])
    for piece in sorted(evidence.python_slices, key=lambda x: x.start_ns):
        runs.setdefault(("", piece.pid, piece.tid), []).append([piece.start_ns, piece.end_ns, piece.frames, 0])
    slot_ends: dict[str, list[int]] = {}
    for (service, pid, tid), thread_runs in sorted(runs.items(), key=lambda item: item[1][0][0]):
        process = _process_with_pid(layout, pid) if not service else layout.process(service, None)
        ends = slot_ends.setdefault(process.name + str(process.pid), [])
        slot = next((i for i, end in enumerate(ends) if end <= thread_runs[0][0]), len(ends))
        if slot == len(ends):
            ends.append(0)
        ends[slot] = max(run[1] for run in thread_runs)
        category, source = ("stack.native", "ebpf profile") if service else ("stack.python", "py-spy")
        for start, end, frames, count in thread_runs:
            args: dict[str, Any] = {"tid": tid, "source": source, **({"samples": count} if count else {})}
            for frame in frames:
                layout.add(process, f"{STACKS_TRACK} {slot + 1}", _Slice(frame, category, start, end, args))


def _process_with_pid(layout: _Layout, pid: int) -> _Process:
    for (_service, real_pid), process in layout.processes.items():
        if real_pid == pid:
            return process
    return layout.process(SERVICE_CLIENT, pid)


# --------------------------------------------------------------------------------------------
# Slices from the capture's rows
# --------------------------------------------------------------------------------------------


def _span_sort_key(span: dict[str, Any]) -> tuple[int, str]:
    try:
        return int(span.get("startTimeUnixNano", 0)), str(span.get("spanId", ""))
    except (TypeError, ValueError):
        return 0, str(span.get("spanId", ""))


def _span_process(span: dict[str, Any]) -> tuple[str, int | None]:
    resource = span.get("resource", {})
    service = span.get("service") or resource.get(SERVICE_NAME) or "unknown"
    pid = resource.get(PROCESS_PID)
    return str(service), int(pid) if isinstance(pid, int) and not isinstance(pid, bool) else None


def _span_slice(span: dict[str, Any]) -> _Slice | None:
    try:
        start_ns = int(span["startTimeUnixNano"])
        end_ns = int(span["endTimeUnixNano"])
    except (KeyError, TypeError, ValueError):
        return None
    status = span.get("status", {})
    args: dict[str, Any] = {
        "trace_id": span.get("traceId"),
        "span_id": span.get("spanId"),
        "parent_span_id": span.get("parentSpanId") or None,
        "status": status.get("code"),
        **span.get("attributes", {}),
    }
    if status.get("message"):
        args["status_message"] = status["message"]
    instants = []
    for event in span.get("events", []):
        try:
            instants.append((str(event.get("name", "")), int(event["timeUnixNano"]), dict(event.get("attributes", {}))))
        except (KeyError, TypeError, ValueError):
            continue
    return _Slice(str(span.get("name", "")), "span", start_ns, max(start_ns, end_ns), args, instants)


def _phase_slice(phase: dict[str, Any], interval: dict[str, Any]) -> _Slice:
    start_ns = int(phase["start_ns"])
    args: dict[str, Any] = {
        "source": phase.get("source"),
        "interval": interval.get("index"),
        "duration_ms": phase.get("duration_ms"),
        "trace_id": interval.get("trace_id"),
        **phase.get("attributes", {}),
    }
    return _Slice(str(phase["name"]), "phase", start_ns, max(start_ns, int(phase["end_ns"])), args)


def _interval_slice(interval: dict[str, Any]) -> _Slice:
    start_ns = int(interval["start_ns"])
    args = {
        "unattributed_ms": interval.get("unattributed_ms"),
        "coverage": interval.get("coverage"),
        "duration_ms": interval.get("duration_ms"),
        "trace_id": interval.get("trace_id"),
        "iteration": interval.get("iteration"),
        "warmup": interval.get("warmup"),
        "model": interval.get("model"),
    }
    name = f"interval {interval.get('index')} ({interval.get('kind')})"
    return _Slice(name, "interval", start_ns, max(start_ns, int(interval["end_ns"])), args)


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


def _origin_ns(layout: _Layout) -> int:
    starts = [
        min([item.start_ns, *(t for _, t, _ in item.instants)])
        for process in layout.processes.values()
        for slices in process.tracks.values()
        for item in slices
    ]
    return min(starts, default=0)


def _us(epoch_ns: int, origin_ns: int) -> float:
    # Exact to the ns for captures shorter than ~100 days: a double holds 15-16 significant digits.
    return (epoch_ns - origin_ns) / 1000


def _nested_lanes(slices: list[_Slice]) -> list[list[_Slice]]:
    """Split slices into lanes in which every pair is disjoint or strictly nested.

    Greedy in start order (longer first on ties, so a parent precedes its children): a slice
    goes to the first lane whose innermost open slice contains it, or that has none open.
    """
    lanes: list[list[_Slice]] = []
    open_ends: list[list[int]] = []
    for item in sorted(slices, key=lambda s: (s.start_ns, -s.end_ns)):
        for lane, ends in zip(lanes, open_ends, strict=True):
            while ends and ends[-1] <= item.start_ns:
                ends.pop()
            if not ends or item.end_ns <= ends[-1]:
                lane.append(item)
                ends.append(item.end_ns)
                break
        else:
            lanes.append([item])
            open_ends.append([item.end_ns])
    return lanes


def _process_events(process: _Process, origin_ns: int) -> list[Event]:
    pid = process.pid
    events: list[Event] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": process.name}},
        {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
         "args": {"sort_index": _PROCESS_ORDER.get(process.name, 99)}},
    ]
    tid = 0
    extra = sorted(set(process.tracks) - set(_TRACK_ORDER), key=lambda name: (len(name), name))
    for track in (*_TRACK_ORDER, *extra):
        for lane_number, lane in enumerate(_nested_lanes(process.tracks.get(track, []))):
            tid += 1
            thread_name = track if lane_number == 0 else f"{track} (overflow {lane_number})"
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": thread_name}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"sort_index": tid}})
            for item in lane:
                events.append({
                    "name": item.name, "cat": item.category, "ph": "X", "pid": pid, "tid": tid,
                    "ts": _us(item.start_ns, origin_ns), "dur": (item.end_ns - item.start_ns) / 1000,
                    "args": item.args,
                })
                for name, time_ns, attributes in item.instants:
                    events.append({"name": name, "cat": "span.event", "ph": "i", "s": "t", "pid": pid, "tid": tid,
                                   "ts": _us(time_ns, origin_ns), "args": attributes})
    return events
