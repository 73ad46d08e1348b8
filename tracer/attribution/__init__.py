"""The attribution engine: capture records → phases per interval → summary across intervals.

Reconciliation rule: every moment of an interval belongs to the phase of the finest source
(lowest ``rank``) that covers it. A coarser phase keeps only the parts no finer phase claimed
(marked ``clipped``), so nothing is counted twice, and ``unattributed`` is the exact remainder:
``sum(phase durations) + unattributed == interval`` for every interval, to the nanosecond.
Phases marked ``off_critical_path`` (``server.cancel``) are reported beside the interval and
never counted in it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ollama_tracer.attribution.ebpf_source import EbpfSource
from ollama_tracer.attribution.intervals import Interval, find_intervals, seen_from_server
from ollama_tracer.attribution.log_source import LogSource
from ollama_tracer.attribution.sources import ClientSource, PhaseSource, ResponseSource
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import (
    GEN_AI_REQUEST_MODEL,
    PROCESS_PID,
    SEEN_FROM_CLIENT,
    SEEN_FROM_SERVER,
    THREAD_ID,
)

SCHEMA = "tracer.attribution/1"

# Finer sources first. New sources plug in here (and nowhere else).
SOURCES: list[PhaseSource] = [EbpfSource(), LogSource(), ResponseSource(), ClientSource()]


@dataclass
class AttributedInterval:
    interval: Interval
    phases: list[Phase]
    off_path: list[Phase]
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)  # source name -> Found.outcome

    @property
    def attributed_ns(self) -> int:
        return sum(p.duration_ns for p in self.phases)

    @property
    def unattributed_ns(self) -> int:
        return self.interval.duration_ns - self.attributed_ns

    def to_json(self) -> dict[str, Any]:
        iv = self.interval
        duration = iv.duration_ns
        return {
            "index": iv.index,
            "kind": iv.kind,
            "trace_id": iv.trace_id,
            "iteration": iv.iteration,
            "warmup": iv.warmup,
            "model": iv.request.get("attributes", {}).get(GEN_AI_REQUEST_MODEL),
            "client": _client_of(iv.request),
            # "client": the client's own spans (its phases measured); "server": only the server saw
            # this request (an uninstrumented client), so the client's phases are absent, not zero.
            "seen_from": SEEN_FROM_SERVER if seen_from_server(iv.request) else SEEN_FROM_CLIENT,
            "start_ns": iv.start_ns,
            "end_ns": iv.end_ns,
            "duration_ms": duration / 1e6,
            "phases": [p.to_json() for p in self.phases],
            "off_critical_path": [p.to_json() for p in self.off_path],
            "unattributed_ms": self.unattributed_ns / 1e6,
            "coverage": self.attributed_ns / duration if duration > 0 else 1.0,
        }


def _client_of(request: dict[str, Any]) -> dict[str, int]:
    """The process and thread that made the request, where the instrumentation recorded them."""
    out = {}
    pid = (request.get("resource") or {}).get(PROCESS_PID)
    thread = (request.get("attributes") or {}).get(THREAD_ID)
    if isinstance(pid, int):
        out["pid"] = pid
    if isinstance(thread, int):
        out["thread"] = thread
    return out


def _subtract(start: int, end: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    pieces = [(start, end)]
    for c_start, c_end in covered:
        next_pieces = []
        for p_start, p_end in pieces:
            if c_end <= p_start or c_start >= p_end:
                next_pieces.append((p_start, p_end))
                continue
            if p_start < c_start:
                next_pieces.append((p_start, c_start))
            if c_end < p_end:
                next_pieces.append((c_end, p_end))
        pieces = next_pieces
    return [(s, e) for s, e in pieces if e > s]


def reconcile(interval: Interval, by_source: list[tuple[int, list[Phase]]]) -> tuple[list[Phase], list[Phase]]:
    """Apply the precedence rule; returns (critical-path phases in time order, off-path phases)."""
    covered: list[tuple[int, int]] = []
    kept: list[Phase] = []
    off_path: list[Phase] = []
    for _, phases in sorted(by_source, key=lambda item: item[0]):
        for phase in phases:
            if phase.attributes.get("off_critical_path"):
                off_path.append(phase)
                continue
            start = max(phase.start_ns, interval.start_ns)
            end = min(phase.end_ns, interval.end_ns)
            if end <= start:
                continue
            # Within a source too, the first phase to claim a moment keeps it.
            for p_start, p_end in _subtract(start, end, covered):
                clipped = (p_start, p_end) != (phase.start_ns, phase.end_ns)
                attributes = dict(phase.attributes, clipped=True) if clipped else phase.attributes
                kept.append(Phase(phase.name, p_start, p_end, phase.source, phase.process, attributes))
                covered.append((p_start, p_end))
    kept.sort(key=lambda p: (p.start_ns, p.end_ns))
    return kept, off_path


def attribute_interval(interval: Interval, records: CaptureRecords,
                       sources: list[PhaseSource] | None = None) -> AttributedInterval:
    found = [(source, source.find(interval, records)) for source in (sources or SOURCES)]
    phases, off_path = reconcile(interval, [(source.rank, result.phases) for source, result in found])
    return AttributedInterval(interval=interval, phases=phases, off_path=off_path,
                              outcomes={source.name: result.outcome for source, result in found if result.outcome})


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), defined for a single value too."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean_ms": statistics.fmean(values),
        "median_ms": statistics.median(values),
        "p95_ms": percentile(values, 95),
        "min_ms": min(values),
        "max_ms": max(values),
    }


def summarize(attributed: list[AttributedInterval]) -> dict[str, Any]:
    measured = [a for a in attributed if not a.interval.warmup] or attributed
    if not measured:
        return {"intervals": 0, "coverage": None, "phases": [], "interval": None, "unattributed": None}
    total_ns = sum(a.interval.duration_ns for a in measured)
    names: dict[str, dict[str, Any]] = {}
    offsets: dict[str, list[int]] = {}
    for a in measured:
        per_name: dict[str, int] = {}
        first_start: dict[str, int] = {}  # order by each phase's first piece, not its clipped remainders
        for phase in a.phases:
            per_name[phase.name] = per_name.get(phase.name, 0) + phase.duration_ns
            entry = names.setdefault(phase.name, {"sources": set(), "process": phase.process, "values": []})
            entry["sources"].add(phase.source)
            if phase.name not in first_start or phase.start_ns < first_start[phase.name]:
                first_start[phase.name] = phase.start_ns
        for name, duration in per_name.items():
            names[name]["values"].append(duration / 1e6)
            offsets.setdefault(name, []).append(first_start[name] - a.interval.start_ns)
    for entry in names.values():
        # A phase can vanish from an interval when its length is zero (or a finer source took
        # all of it): that interval contributes 0, so medians stay comparable across phases.
        entry["present"] = len(entry["values"])
        entry["values"] += [0.0] * (len(measured) - len(entry["values"]))
    phases = []
    for name, entry in sorted(names.items(), key=lambda item: statistics.median(offsets[item[0]])):
        values = entry["values"]
        phases.append({
            "name": name,
            "source": "+".join(sorted(entry["sources"])),
            "process": entry["process"],
            "count": entry["present"],
            **_stats(values),
            "share": sum(values) * 1e6 / total_ns if total_ns else 0.0,
        })
    unattributed = [a.unattributed_ns / 1e6 for a in measured]
    return {
        "intervals": len(measured),
        "warmup_intervals_excluded": len(attributed) - len(measured),
        "interval": _stats([a.interval.duration_ns / 1e6 for a in measured]),
        "phases": phases,
        "unattributed": {**_stats(unattributed), "share": sum(unattributed) * 1e6 / total_ns if total_ns else 0.0},
        "coverage": 1 - sum(a.unattributed_ns for a in measured) / total_ns if total_ns else 1.0,
    }


def attribute(records: CaptureRecords, sources: list[PhaseSource] | None = None) -> dict[str, Any]:
    """The whole attribution as the ``attribution.json`` payload."""
    intervals = find_intervals(records.spans)
    attributed = [attribute_interval(iv, records, sources) for iv in intervals]
    payload = {
        "schema": SCHEMA,
        "precedence": [{"source": s.name, "rank": s.rank} for s in sorted(sources or SOURCES, key=lambda s: s.rank)],
        "intervals": [a.to_json() for a in attributed],
        "summary": summarize(attributed),
    }
    payload.update(merge_outcomes(attributed))
    return payload


def merge_outcomes(attributed: list[AttributedInterval]) -> dict[str, dict[str, Any]]:
    """Each source's per-interval outcomes as ``<source>_matching``: counts summed, lists joined."""
    merged: dict[str, dict[str, Any]] = {}
    for a in attributed:
        for source, outcome in a.outcomes.items():
            into = merged.setdefault(f"{source}_matching", {})
            for key, value in outcome.items():
                if isinstance(value, list):
                    into.setdefault(key, []).extend(value)
                else:
                    into[key] = into.get(key, 0) + value
    return merged
