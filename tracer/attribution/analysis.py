"""From a capture directory's raw records to every output. Everything here can be re-run later
(`tracer report`, `tracer export`), because the raw records are the single source of truth."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files
from ollama_tracer.attribution import attribute
from ollama_tracer.attribution.correlate import Evidence, correlate
from ollama_tracer.attribution.diagnosis import cache_slots, diagnose
from ollama_tracer.attribution.ebpf_source import capture_design
from ollama_tracer.attribution.server_requests import merge_server_requests, server_request_spans, untracked_requests
from ollama_tracer.attribution.unanswered import unanswered
from ollama_tracer.capture import directory as capture_directory
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.ebpf_events import EbpfRecords
from ollama_tracer.collectors.nvml import GpuRecords
from ollama_tracer.collectors.ollama_log import LogRecords
from ollama_tracer.collectors.otlp import ClientSpans
from ollama_tracer.collectors.pyspy import PythonStacks
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.vocabulary import (
    DESIGN_LLAMA_SERVER_ALONE,
    PROCESS_CLIENT,
    PROVIDER_LLAMA_CPP,
    PROVIDER_OLLAMA,
    SERVICE_BY_PROCESS,
    SERVICE_CLIENT,
    SERVICE_NAME,
    SOURCE_RESPONSE,
    SPAN_BENCH_ITERATION,
    SPAN_INTERVAL,
    STACK_EVENT_PREFIX,
    TRACER_COVERAGE,
    TRACER_GPU_PREFIX,
    TRACER_INTERVAL_INDEX,
    TRACER_INTERVAL_KIND,
    TRACER_OFF_CRITICAL_PATH,
    TRACER_PHASE,
    TRACER_PREFIX,
    TRACER_SOURCE,
    TRACER_STACK_FRAMES,
    TRACER_STACK_LEAF,
    TRACER_STACK_PROCESS,
    TRACER_STACK_RANK,
    TRACER_STACK_SAMPLES,
    TRACER_UNATTRIBUTED_MS,
)


@dataclass
class ExportData:
    """Everything an exporter may show, as recomputed from a capture directory."""

    meta: dict[str, Any]  # capture.json: "command", "tracer_version", "clock", "collectors", "exit_code", "drops"
    attribution: dict[str, Any]  # attribution.json ("tracer.attribution/1")
    spans: list[dict[str, Any]]  # spans.jsonl rows (OTLP-JSON-shaped)
    evidence: Evidence | None = None  # GPU samples and stacks, for exporters that draw them
    ollama_version: str | None = None  # capture.json's, or what the eBPF collector read from the server


def _evidence_of(records: CaptureRecords) -> Evidence:
    ebpf, gpu, python = records.get(EbpfRecords), records.get(GpuRecords), records.get(PythonStacks)
    return Evidence(gpu_samples=gpu.samples if gpu else (), native_samples=ebpf.native_stacks if ebpf else (),
                    native_roles={int(pid): str(role) for pid, role in (ebpf.roles if ebpf else {}).items() if role},
                    native_hz=(ebpf.profile_hz if ebpf else 0) or 99,
                    python_slices=python.slices if python else (),
                    python_rate_hz=python.rate_hz if python else 100.0)


def _span_id(*parts: object) -> str:
    return hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def phase_spans(attribution: dict[str, Any], spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each interval's phases as child spans of its iteration (or request) span, in the
    service of the process they happened in; plus one ``tracer.interval`` span per interval."""
    by_trace_root: dict[str, str] = {}
    for span in spans:
        if span["name"] == SPAN_BENCH_ITERATION:
            by_trace_root[span["traceId"]] = span["spanId"]
    rows = []
    for interval in attribution["intervals"]:
        trace_id = interval["trace_id"]
        parent = by_trace_root.get(trace_id)
        if parent is None:  # no iteration root: hang the phases under the request's parent or itself
            candidates = [s for s in spans if s["traceId"] == trace_id and not s.get("parentSpanId")]
            parent = candidates[0]["spanId"] if candidates else ""
        interval_id = _span_id(trace_id, interval["index"], "interval")
        interval_attributes = {
            TRACER_INTERVAL_INDEX: interval["index"], TRACER_INTERVAL_KIND: interval["kind"],
            TRACER_UNATTRIBUTED_MS: interval["unattributed_ms"], TRACER_COVERAGE: interval["coverage"],
        }
        rows.append(_row(trace_id, interval_id, parent, SPAN_INTERVAL, interval["start_ns"], interval["end_ns"],
                         PROCESS_CLIENT, interval_attributes))
        for group in ("phases", "off_critical_path"):
            for phase in interval[group]:
                attributes = {TRACER_PHASE: phase["name"], TRACER_SOURCE: phase["source"],
                              TRACER_INTERVAL_INDEX: interval["index"]}
                if group == "off_critical_path":
                    attributes[TRACER_OFF_CRITICAL_PATH] = True
                for key, value in phase.get("attributes", {}).items():
                    if isinstance(value, (str, int, float, bool)):
                        attributes[f"{TRACER_PREFIX}{key}"] = value
                attributes.update(_gpu_attributes(phase.get("gpu") or {}))
                row = _row(trace_id, _span_id(trace_id, interval["index"], phase["name"], phase["start_ns"]),
                           interval_id, phase["name"], phase["start_ns"], phase["end_ns"], phase["process"],
                           attributes)
                row["events"] = _stack_events(phase)
                rows.append(row)
    return rows


def _gpu_attributes(gpu: dict[str, Any]) -> dict[str, Any]:
    """``tracer.gpu.<index>.util_mean`` etc., flat, as Jaeger shows span tags."""
    return {f"{TRACER_GPU_PREFIX}{index}.{key}": value for index, entry in gpu.items() for key, value in entry.items()}


def _stack_events(phase: dict[str, Any]) -> list[dict[str, Any]]:
    """One span event per top stack of each process (at the phase's start: stacks are a summary)."""
    events = []
    for role, stacks in (phase.get("stacks") or {}).items():
        for rank, stack in enumerate(stacks):
            events.append({"name": f"{STACK_EVENT_PREFIX}{role}", "timeUnixNano": phase["start_ns"], "attributes": {
                TRACER_STACK_PROCESS: role, TRACER_STACK_RANK: rank + 1, TRACER_STACK_SAMPLES: stack["samples"],
                TRACER_STACK_LEAF: stack["frames"][-1] if stack["frames"] else "",
                TRACER_STACK_FRAMES: ";".join(stack["frames"])}})
    return events


def _row(trace_id: str, span_id: str, parent: str, name: str, start: int, end: int, process: str,
         attributes: dict[str, Any]) -> dict[str, Any]:
    service = SERVICE_BY_PROCESS.get(process, SERVICE_CLIENT)
    return {
        "traceId": trace_id, "spanId": span_id, "parentSpanId": parent, "name": name, "kind": 1,
        "startTimeUnixNano": start, "endTimeUnixNano": end, "attributes": attributes, "events": [],
        "status": {"code": 0, "message": ""}, "resource": {SERVICE_NAME: service}, "service": service,
    }


def compute(directory: Path) -> ExportData:
    """The capture meta, attribution, spans.jsonl rows and evidence, recomputed from the raw records."""
    meta = capture_directory.load_capture_meta(directory)
    records = capture_directory.load_records(directory, meta)
    if records.get(ClientSpans) is None:
        raise TracerError(f"{directory} holds no recorded spans ({capture_files.CLIENT_SPANS} is missing); "
                          "the capture is incomplete.", ExitCode.BAD_CAPTURE)
    ebpf = records.get(EbpfRecords)
    server_requests: dict[str, Any] | None = None
    untracked: list[dict[str, Any]] = []
    if ebpf is not None:
        alone = capture_design(ebpf.meta) == DESIGN_LLAMA_SERVER_ALONE
        seen = server_request_spans(ebpf.events, ebpf.roles, PROVIDER_LLAMA_CPP if alone else PROVIDER_OLLAMA)
        untracked = untracked_requests(ebpf.events, ebpf.roles, seen)
        if meta.get("mode") == "attach":
            # No client: the requests are the ones the server read, seen through eBPF alone.
            records.spans = seen
            server_requests = {"seen": len(seen), "server_only": len(seen)}
        else:
            # Every request the server read is a candidate: the ones no client span recorded
            # (an uninstrumented client) join with their server and runner phases alone.
            added, decided = merge_server_requests(records.spans, seen)
            records.spans = [*records.spans, *added]
            server_requests = {"seen": len(seen), **decided}
    attribution = attribute(records)
    attribution["server_requests"] = server_requests  # None: no eBPF, the server's side was not seen
    attribution["untracked_requests"] = untracked
    evidence = _evidence_of(records)
    correlate(attribution, evidence)
    attribution["alignment"] = _alignment(records)
    attribution["unreadable_rows"] = records.unreadable
    # A client may have emitted its own reconstruction of the server phases (`tracer bench`
    # does, source=response). The attribution's phase spans supersede them in spans.jsonl, so a
    # trace never shows a phase twice; raw/ still holds them as they were received.
    client_spans = [s for s in records.spans if s.get("attributes", {}).get(TRACER_SOURCE) != SOURCE_RESPONSE]
    spans = client_spans + phase_spans(attribution, records.spans)
    attribution["evidence"] = _evidence(attribution)
    attribution["unanswered"] = unanswered(records)
    log = records.get(LogRecords)
    attribution["diagnosis"] = diagnose(attribution, {
        "ollama_version": records.ollama_version,
        "num_parallel": ((meta.get("ollama") or {}).get("settings") or {}).get("OLLAMA_NUM_PARALLEL"),
        "cache_slots": cache_slots(log.events if log else [], records.spans),
        "unanswered": attribution["unanswered"],
    })
    return ExportData(meta=meta, attribution=attribution, spans=spans, evidence=evidence,
                      ollama_version=records.ollama_version)


def _alignment(records: CaptureRecords) -> dict[str, Any]:
    """How well each source's clock lines up with the spans' epoch clock, as recorded."""
    clock = records.meta.get("clock") or {}
    out: dict[str, Any] = {}
    if records.get(EbpfRecords) is not None and clock.get("start"):
        model = ClockModel.from_json(clock)
        out["ebpf"] = {"method": "CLOCK_BOOTTIME offset measured at start, end and every 0.5 s, "
                                 "interpolated between neighbours",
                       "error_ns": model.error_ns("boottime"), "drift_ns": model.drift_ns("boottime"),
                       "checkpoints": len(model.checkpoints)}
    gpu = records.get(GpuRecords)
    gpu_meta = gpu.meta if gpu else {}
    if gpu_meta:
        domains = gpu_meta.get("clock_domain") or {}
        described = ", ".join(f"{api}: {domain}" for api, domain in sorted(domains.items())) \
            if isinstance(domains, dict) else str(domains)
        out["nvml"] = {"method": f"driver timestamps converted to epoch ({described or 'point queries only'})",
                       "clock_domain": domains, "error_ns": gpu_meta.get("alignment_error_ns"),
                       "period_ns": gpu_meta.get("period_ns")}
    python = records.get(PythonStacks)
    pyspy_meta = python.meta if python else {}
    if pyspy_meta:
        anchor = pyspy_meta.get("alignment") or {}
        out["pyspy"] = {"method": anchor.get("method"), "error_ns": anchor.get("error_ns"),
                        "markers_used": anchor.get("markers_used")}
    return out


def _evidence(attribution: dict[str, Any]) -> dict[str, Any]:
    """Per-request facts worth a line of their own (e.g. GGUF metadata scans per request)."""
    scans = []
    for interval in attribution["intervals"]:
        for phase in interval["phases"]:
            attrs = phase.get("attributes", {})
            if "gguf_scans" in attrs:
                scans.append({"interval": interval["index"], "blob_opens": attrs.get("blob_opens"),
                              "other_blob_opens": attrs.get("other_blob_opens"),
                              "gguf_scans": attrs["gguf_scans"], "gguf_scan_ms": attrs.get("gguf_scan_ms"),
                              "uprobe_hits": attrs.get("uprobe_hits"), "syscall_events": attrs.get("syscall_events")})
                break
    return {"gguf_scans_per_request": scans}
