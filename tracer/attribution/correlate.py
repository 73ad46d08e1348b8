"""Join what was happening (GPU samples, native and Python stacks) to each phase, by time.

A phase's duration says how long; this says what the machine did meanwhile. Every phase of
every interval gets, when the evidence exists:

* ``gpu``: per-GPU mean and max utilization, memory-bandwidth utilization, the change in memory
  used, and mean power, from the NVML samples inside the phase. A phase shorter than the
  sample period has no sample inside; it then takes the last sample before it (the value in
  effect) and says so with ``samples: 0``.
* ``stacks``: per process role (client, server, runner), the most frequent stacks seen during
  the phase, each as its leaf-most frames with a sample count. Native stacks are eBPF samples
  (one per hit); Python stacks are py-spy stretches, counted as the samples they stand for
  (overlap × rate), so both read as "samples". py-spy samples at exponentially spaced times
  (a Poisson timer), so each stretch's start and end are seen one exponential lag late, with
  mean one period; stretches are moved back by that mean, the unbiased estimate of when the
  code ran. Stacks therefore resolve time to about one sample period (10 ms at 100 Hz), and
  every phase says so (``stack_resolution_ms``): a 1 ms phase's Python stacks are a guess.

The summary aggregates the same per phase name across the measured intervals. Nothing is
inferred: a phase with no sample simply has no ``stacks``.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ollama_tracer.instrument.clock_marker import MARKER_FUNCTION
from ollama_tracer.vocabulary import PROCESS_CLIENT, PROCESS_SERVER

_Counts = defaultdict[tuple[str, ...], float]  # stack (leaf-most frames) -> samples
TOP_STACKS = 3
STACK_FRAMES = 8  # leaf-most frames that identify a stack in a summary
GPU_METRICS = ("gpu_util", "mem_util", "mem_used_bytes", "power_w", "sm_clock_mhz", "proc_sm_util")
# Threads that only wait on behalf of the tracer itself are not the client's work.
_OWN_FRAMES = (MARKER_FUNCTION, "opentelemetry/sdk/trace/export", "opentelemetry/sdk/_shared_internal")


class _GpuSample(Protocol):
    @property
    def time_ns(self) -> int: ...
    @property
    def gpu(self) -> int: ...
    @property
    def metric(self) -> str: ...
    @property
    def value(self) -> float: ...


class _Stack(Protocol):
    """Whose stack (process, thread) and its frames, root to leaf."""

    @property
    def pid(self) -> int: ...
    @property
    def tid(self) -> int: ...
    @property
    def frames(self) -> tuple[str, ...]: ...


class _StackSample(_Stack, Protocol):  # eBPF: one instant
    @property
    def time_ns(self) -> int: ...


class _StackSlice(_Stack, Protocol):  # py-spy: a stretch during which the stack did not change
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...


@dataclass
class Evidence:
    """What a capture recorded besides spans and probe events, on the epoch clock."""

    gpu_samples: Sequence[_GpuSample] = ()
    native_samples: Sequence[_StackSample] = ()
    native_roles: dict[int, str] | None = None  # pid -> server / runner
    native_hz: int = 99
    python_slices: Sequence[_StackSlice] = ()
    python_rate_hz: float = 100.0


class _GpuSeries:
    """One metric of one GPU as sorted (time, value) arrays."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self.values: list[float] = []

    def window(self, start: int, end: int) -> tuple[list[float], float | None]:
        """(values inside [start, end), the last value before start or None)."""
        lo = bisect.bisect_left(self.times, start)
        hi = bisect.bisect_left(self.times, end)
        before = self.values[lo - 1] if lo > 0 else None
        return self.values[lo:hi], before

    def at(self, when: int) -> float | None:
        i = bisect.bisect_right(self.times, when)
        return self.values[i - 1] if i > 0 else None


def _gpu_series(samples: Iterable[_GpuSample]) -> dict[int, dict[str, _GpuSeries]]:
    series: dict[int, dict[str, _GpuSeries]] = {}
    for sample in sorted(samples, key=lambda s: s.time_ns):
        if sample.metric not in GPU_METRICS:
            continue
        one = series.setdefault(sample.gpu, {}).setdefault(sample.metric, _GpuSeries())
        one.times.append(sample.time_ns)
        one.values.append(float(sample.value))
    return series


def gpu_summary(series: dict[int, dict[str, _GpuSeries]], start: int, end: int) -> dict[str, Any]:
    """Per GPU: what NVML saw during [start, end]."""
    out: dict[str, Any] = {}
    for gpu, metrics in sorted(series.items()):
        util = metrics.get("gpu_util")
        if util is None:
            continue
        inside, before = util.window(start, end)
        values = inside or ([before] if before is not None else [])
        if not values:
            continue  # the phase is before the first sample
        entry: dict[str, Any] = {"samples": len(inside), "util_mean": round(sum(values) / len(values), 2),
                                 "util_max": max(values)}
        for metric, key in (("mem_util", "mem_util_mean"), ("power_w", "power_w_mean"),
                            ("proc_sm_util", "ollama_sm_util_mean"), ("sm_clock_mhz", "sm_clock_mhz_mean")):
            if metric in metrics:
                got, prior = metrics[metric].window(start, end)
                vals = got or ([prior] if prior is not None else [])
                if vals:
                    entry[key] = round(sum(vals) / len(vals), 2)
        if "mem_used_bytes" in metrics:
            first, last = metrics["mem_used_bytes"].at(start), metrics["mem_used_bytes"].at(end)
            if first is not None and last is not None:
                entry["mem_delta_bytes"] = int(last - first)
        out[str(gpu)] = entry
    return out


def _is_own(frames: tuple[str, ...]) -> bool:
    return any(marker in frame for frame in frames for marker in _OWN_FRAMES)


# Frames that say how, not what: the runtime, the C library, unresolved addresses.
_PLUMBING = ("runtime.", "internal/", "syscall.", "sync.", "sync/", "encoding/binary.", "libc.so", "0x", "_fini",
             "[unknown]", "<built-in", "wait (threading.py)", "_wait_for_tstate_lock")


def app_frame(frames: Sequence[str]) -> str:
    """The leaf-most frame that is the program's own code (the "what" of a stack)."""
    for frame in reversed(frames):
        if not frame.startswith(_PLUMBING):
            return frame
    return frames[-1] if frames else "?"


def _top_functions(counters: dict[str, _Counts], limit: int = TOP_STACKS) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for role, counter in sorted(counters.items()):
        functions: defaultdict[str, float] = defaultdict(float)
        for frames, count in counter.items():
            functions[app_frame(frames)] += count
        ranked = sorted(functions.items(), key=lambda item: (-item[1], item[0]))[:limit]
        out[role] = [{"function": name, "samples": round(count, 1)} for name, count in ranked if count >= 0.5]
    return out


def _top(counter: _Counts, limit: int = TOP_STACKS) -> list[dict[str, Any]]:
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [{"frames": list(frames), "samples": round(count, 1)} for frames, count in ranked if count >= 0.5]


class _Stacks:
    """Both kinds of stack evidence, indexed by time, counted per role."""

    def __init__(self, evidence: Evidence) -> None:
        roles = evidence.native_roles or {}
        self.native = sorted(evidence.native_samples, key=lambda s: s.time_ns)
        self.native_times = [s.time_ns for s in self.native]
        self.native_roles = roles
        self.native_hz = evidence.native_hz
        self.python = sorted((s for s in evidence.python_slices if not _is_own(s.frames)), key=lambda s: s.start_ns)
        # Slices by length, each group within a factor of 4: a group's slices that overlap a
        # window start after the window's start less the group's longest, so each lookup reads
        # about what overlaps it. (One bound for all would be the program's outermost frame,
        # as long as the capture: every lookup would read every slice.)
        groups: dict[int, list[int]] = {}
        for index, piece in enumerate(self.python):
            groups.setdefault(max(0, piece.end_ns - piece.start_ns).bit_length() // 2, []).append(index)
        self.python_groups = [([self.python[i].start_ns for i in members], members,
                               max(self.python[i].end_ns - self.python[i].start_ns for i in members))
                              for members in groups.values()]
        self.rate = evidence.python_rate_hz
        self.python_lag_ns = int(1e9 / self.rate) if self.rate > 0 else 0  # mean detection lag

    def resolution_ms(self, counters: dict[str, _Counts]) -> dict[str, float]:
        """Per role, the sampling period: how finely its stacks can place code in time."""
        return {role: round(1000 / (self.rate if role == PROCESS_CLIENT else self.native_hz), 1) for role in counters
                if (self.rate if role == PROCESS_CLIENT else self.native_hz) > 0}

    def counters(self, start: int, end: int, client: dict[str, int] | None = None) -> dict[str, _Counts]:
        """Samples per role and stack in [start, end). ``client``: the pid and thread that made
        the request; then only that thread's Python stacks count (a thread pool idling beside it
        is not what the client was doing)."""
        out: dict[str, _Counts] = {}
        lo = bisect.bisect_left(self.native_times, start)
        hi = bisect.bisect_left(self.native_times, end)
        for sample in self.native[lo:hi]:
            role = self.native_roles.get(sample.pid, PROCESS_SERVER)
            out.setdefault(role, defaultdict(float))[sample.frames[-STACK_FRAMES:]] += 1
        lag = self.python_lag_ns
        candidates: list[int] = []
        for starts, members, longest in self.python_groups:
            first = bisect.bisect_left(starts, start + lag - longest)
            last = bisect.bisect_left(starts, end + lag)
            candidates.extend(members[first:last])
        candidates.sort()  # in start order, as one scan would add them
        pid, thread = (client or {}).get("pid"), (client or {}).get("thread")
        for piece in (self.python[i] for i in candidates):
            if (pid is not None and piece.pid != pid) or (thread is not None and piece.tid != thread):
                continue
            overlap = min(piece.end_ns - lag, end) - max(piece.start_ns - lag, start)
            if overlap > 0:
                frames = piece.frames[-STACK_FRAMES:]
                out.setdefault(PROCESS_CLIENT, defaultdict(float))[frames] += overlap * self.rate / 1e9
        return out


def correlate(attribution: dict[str, Any], evidence: Evidence) -> dict[str, Any]:
    """Add ``gpu`` and ``stacks`` to every phase, and per phase name to the summary, in place."""
    series = _gpu_series(evidence.gpu_samples)
    stacks = _Stacks(evidence)
    by_name: dict[str, dict[str, _Counts]] = {}
    gpu_by_name: dict[str, list[dict[str, Any]]] = {}
    for interval in attribution.get("intervals", []):
        for group in ("phases", "off_critical_path"):
            for phase in interval.get(group, []):
                start, end = int(phase["start_ns"]), int(phase["end_ns"])
                if series:
                    gpu = gpu_summary(series, start, end)
                    if gpu:
                        phase["gpu"] = gpu
                        if not interval.get("warmup") and group == "phases":
                            gpu_by_name.setdefault(phase["name"], []).append(gpu)
                counters = stacks.counters(start, end, interval.get("client"))
                if counters:
                    phase["stack_resolution_ms"] = stacks.resolution_ms(counters)
                    phase["stacks"] = {role: _top(counter) for role, counter in sorted(counters.items())}
                    phase["top_functions"] = _top_functions(counters)
                    if not interval.get("warmup") and group == "phases":
                        merged = by_name.setdefault(phase["name"], {})
                        for role, counter in counters.items():
                            into = merged.setdefault(role, defaultdict(float))
                            for frames, count in counter.items():
                                into[frames] += count
    for row in attribution.get("summary", {}).get("phases", []):
        name = row["name"]
        if name in by_name:
            row["stacks"] = {role: _top(counter) for role, counter in sorted(by_name[name].items())}
            row["top_functions"] = _top_functions(by_name[name])
        if name in gpu_by_name:
            row["gpu"] = _merge_gpu(gpu_by_name[name])
    attribution["correlation"] = {
        "gpu_samples": len(evidence.gpu_samples), "native_stack_samples": len(stacks.native),
        "python_stack_slices": len(stacks.python),
    }
    return attribution


def _merge_gpu(per_interval: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary row's GPU figures: mean of the intervals' means, max of their maxima."""
    merged: dict[str, Any] = {}
    for gpu in sorted({key for entry in per_interval for key in entry}):
        rows = [entry[gpu] for entry in per_interval if gpu in entry]
        out: dict[str, Any] = {"intervals": len(rows),
                               "util_mean": round(sum(r["util_mean"] for r in rows) / len(rows), 2),
                               "util_max": max(r["util_max"] for r in rows)}
        for key in ("mem_util_mean", "power_w_mean", "ollama_sm_util_mean"):
            values = [r[key] for r in rows if key in r]
            if values:
                out[key] = round(sum(values) / len(values), 2)
        deltas = [r["mem_delta_bytes"] for r in rows if "mem_delta_bytes" in r]
        if deltas:
            out["mem_delta_bytes_median"] = sorted(deltas)[len(deltas) // 2]
        merged[gpu] = out
    return merged
