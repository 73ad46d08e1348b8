"""From a capture directory's raw records to every output. Everything here can be re-run later
(`tracer report`, `tracer export`), because the raw records are the single source of truth."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files
from ollama_tracer.attribution import CaptureRecords, attribute
from ollama_tracer.attribution.correlate import Evidence, correlate
from ollama_tracer.attribution.diagnosis import cache_slots, diagnose
from ollama_tracer.capture import directory as capture_directory
from ollama_tracer.clock import ClockModel
from ollama_tracer.errors import ExitCode, TracerError


@dataclass
class ExportData:
    """Everything an exporter may show, as recomputed from a capture directory."""

    meta: dict[str, Any]  # capture.json: "command", "tracer_version", "clock", "collectors", "exit_code", "drops"
    attribution: dict[str, Any]  # attribution.json ("tracer.attribution/1")
    spans: list[dict[str, Any]]  # spans.jsonl rows (OTLP-JSON-shaped)
    evidence: Evidence | None = None  # GPU samples and stacks, for exporters that draw them


SERVICE_BY_PROCESS = {"client": "ollama-client", "server": "ollama-server", "runner": "ollama-runner",
                      "proxy": "ollama-proxy"}


def load_records(directory: Path, meta: dict[str, Any]) -> tuple[CaptureRecords, dict[str, int]]:
    """The raw records of a capture, and how many unreadable rows each file had."""
    rows, bad = capture_files.read_jsonl(directory / capture_files.CLIENT_SPANS)
    spans = [row for row in rows if _usable_span(row)]
    bad += len(rows) - len(spans)  # JSON, but not a span as the receiver writes one
    extra: dict[str, Any] = {"meta": meta}
    unreadable = {capture_files.CLIENT_SPANS: bad}
    from ollama_tracer.collectors.ollama_log import RAW_LOG, load_log

    log_events, bad_log = load_log(directory)
    if log_events:
        extra["log_events"] = log_events
        unreadable[RAW_LOG] = bad_log
    if (directory / "raw" / "ebpf_meta.json").exists():
        from ollama_tracer.collectors.ebpf import load_events
        from ollama_tracer.process_discovery import role_of

        if not meta.get("clock"):  # load_capture_meta has checked one that is there
            raise TracerError(f"{directory / 'capture.json'} has no clock, so the eBPF events cannot be placed in "
                              "time; re-run the capture.", ExitCode.BAD_CAPTURE)
        events, ebpf_meta, bad_events = load_events(directory, ClockModel.from_json(meta["clock"]))
        server_pid = int(ebpf_meta["pid"])
        roles = ebpf_meta.get("roles") or {}
        pids = {e.pid for e in events}
        extra["ebpf"] = {
            "events": events, "meta": ebpf_meta,
            "roles": {pid: roles.get(str(pid)) or role_of(pid, server_pid) for pid in pids},
        }
        unreadable["raw/ebpf_events.txt"] = bad_events
        if meta.get("mode") == "attach":
            from ollama_tracer.attribution.server_requests import server_request_spans

            # No client: the requests are the ones the server read, seen through eBPF alone.
            spans = server_request_spans(events, extra["ebpf"]["roles"])
        if ebpf_meta.get("profile_hz"):
            from ollama_tracer.collectors.ebpf_profile import load_samples

            extra["native_stacks"], unreadable["raw/ebpf_events.txt (stacks)"] = load_samples(
                directory, ClockModel.from_json(meta["clock"]))
    if (directory / "raw" / "gpu_samples.jsonl").exists():
        from ollama_tracer.collectors.nvml import load_gpu_samples

        samples, extra["gpu_meta"], bad_gpu = load_gpu_samples(directory)
        # No NVML reading reaches 2**64 (bytes of memory at most); past it, a sum or a difference is infinite.
        extra["gpu_samples"] = [sample for sample in samples if abs(sample.value) < 2**64]
        unreadable["raw/gpu_samples.jsonl"] = bad_gpu + len(samples) - len(extra["gpu_samples"])
    if (directory / "raw" / "pyspy_meta.json").exists():
        from ollama_tracer.collectors.pyspy import load_stacks

        extra["python_stacks"], extra["pyspy_meta"], unreadable["raw/pyspy.chrometrace.json"] = load_stacks(directory)
    return CaptureRecords(spans=spans, extra=extra), unreadable


# Attributes that attribution reads as integers: epoch ns, durations, a port, an fd.
_INTEGER_ATTRIBUTES = ("tracer.first_token_ns", "tracer.request_written_ns", "tracer.response_start_ns",
                       "ollama.created_at_first_ns", "ollama.created_at_last_ns", "ollama.total_duration",
                       "ollama.load_duration", "ollama.prompt_eval_duration", "tracer.local_port", "server.fd")
# What tells one client from another (intervals.py): dictionary keys, so never a list or an object.
_CLIENT_KEYS = (("resource", "service.name"), ("resource", "process.pid"), ("resource", "service.instance.id"),
                ("attributes", "tracer.client_key"), ("attributes", "thread.id"))
_SCALARS = (str, int, float, bool, type(None))


def _usable_span(row: dict[str, Any]) -> bool:
    """Whether a row of client_spans.jsonl has, in what attribution reads, the shape the receiver writes."""
    attributes, resource = row.get("attributes", {}), row.get("resource", {})
    if not (isinstance(attributes, dict) and isinstance(resource, dict)):
        return False
    maps = {"attributes": attributes, "resource": resource}
    return (all(isinstance(row.get(key), str) for key in ("traceId", "spanId", "name"))
            and isinstance(row.get("parentSpanId") or "", str) and isinstance(row.get("events", []), list)
            and all(_is_int(row.get(key)) and row[key] >= 0 for key in ("startTimeUnixNano", "endTimeUnixNano"))
            and all(attributes.get(key) is None or _is_int(attributes[key]) for key in _INTEGER_ATTRIBUTES)
            # A stream that reached `done` (total_duration) had chunks: their times come with it.
            and (attributes.get("ollama.total_duration") is None
                 or None not in (attributes.get(f"ollama.created_at_{end}_ns") for end in ("first", "last")))
            and all(isinstance(maps[where].get(key), _SCALARS) for where, key in _CLIENT_KEYS))


def _is_int(value: Any) -> bool:
    """A JSON integer (not a bool) that fits in 64 bits."""
    return type(value) is int and abs(value) < 2**64


def _evidence_of(records: CaptureRecords) -> Evidence:
    extra = records.extra
    roles = (extra.get("ebpf") or {}).get("roles") or {}
    pyspy_meta = extra.get("pyspy_meta") or {}
    return Evidence(gpu_samples=extra.get("gpu_samples", ()), native_samples=extra.get("native_stacks", ()),
                    native_roles={int(pid): str(role) for pid, role in roles.items() if role},
                    native_hz=int((extra.get("ebpf") or {}).get("meta", {}).get("profile_hz") or 99),
                    python_slices=extra.get("python_stacks", ()),
                    python_rate_hz=float(pyspy_meta.get("rate_hz", 100)))


def _span_id(*parts: object) -> str:
    return hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def phase_spans(attribution: dict[str, Any], spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each interval's phases as child spans of its iteration (or request) span, in the
    service of the process they happened in; plus one ``tracer.interval`` span per interval."""
    by_trace_root: dict[str, str] = {}
    for span in spans:
        if span["name"] == "bench.interrupt.iteration":
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
            "tracer.interval.index": interval["index"], "tracer.interval.kind": interval["kind"],
            "tracer.unattributed_ms": interval["unattributed_ms"], "tracer.coverage": interval["coverage"],
        }
        rows.append(_row(trace_id, interval_id, parent, "tracer.interval", interval["start_ns"], interval["end_ns"],
                         "client", interval_attributes))
        for group in ("phases", "off_critical_path"):
            for phase in interval[group]:
                attributes = {"tracer.phase": phase["name"], "tracer.source": phase["source"],
                              "tracer.interval.index": interval["index"]}
                if group == "off_critical_path":
                    attributes["tracer.off_critical_path"] = True
                for key, value in phase.get("attributes", {}).items():
                    if isinstance(value, (str, int, float, bool)):
                        attributes[f"tracer.{key}"] = value
                attributes.update(_gpu_attributes(phase.get("gpu") or {}))
                row = _row(trace_id, _span_id(trace_id, interval["index"], phase["name"], phase["start_ns"]),
                           interval_id, phase["name"], phase["start_ns"], phase["end_ns"], phase["process"],
                           attributes)
                row["events"] = _stack_events(phase)
                rows.append(row)
    return rows


def _gpu_attributes(gpu: dict[str, Any]) -> dict[str, Any]:
    """``tracer.gpu.<index>.util_mean`` etc., flat, as Jaeger shows span tags."""
    return {f"tracer.gpu.{index}.{key}": value for index, entry in gpu.items() for key, value in entry.items()}


def _stack_events(phase: dict[str, Any]) -> list[dict[str, Any]]:
    """One span event per top stack of each process (at the phase's start: stacks are a summary)."""
    events = []
    for role, stacks in (phase.get("stacks") or {}).items():
        for rank, stack in enumerate(stacks):
            events.append({"name": f"stack.{role}", "timeUnixNano": phase["start_ns"], "attributes": {
                "tracer.stack.process": role, "tracer.stack.rank": rank + 1, "tracer.stack.samples": stack["samples"],
                "tracer.stack.leaf": stack["frames"][-1] if stack["frames"] else "",
                "tracer.stack.frames": ";".join(stack["frames"])}})
    return events


def _row(trace_id: str, span_id: str, parent: str, name: str, start: int, end: int, process: str,
         attributes: dict[str, Any]) -> dict[str, Any]:
    service = SERVICE_BY_PROCESS.get(process, "ollama-client")
    return {
        "traceId": trace_id, "spanId": span_id, "parentSpanId": parent, "name": name, "kind": 1,
        "startTimeUnixNano": start, "endTimeUnixNano": end, "attributes": attributes, "events": [],
        "status": {"code": 0, "message": ""}, "resource": {"service.name": service}, "service": service,
    }


def compute(directory: Path) -> ExportData:
    """The capture meta, attribution, spans.jsonl rows and evidence, recomputed from the raw records."""
    meta = capture_directory.load_capture_meta(directory)
    records, bad_rows = load_records(directory, meta)
    if not records.spans and not (directory / capture_files.CLIENT_SPANS).exists():
        raise TracerError(f"{directory} holds no recorded spans ({capture_files.CLIENT_SPANS} is missing); "
                          "the capture is incomplete.", ExitCode.BAD_CAPTURE)
    attribution = attribute(records)
    if "ebpf_matching" in records.extra:
        attribution["ebpf_matching"] = records.extra["ebpf_matching"]
    evidence = _evidence_of(records)
    correlate(attribution, evidence)
    attribution["alignment"] = _alignment(records)
    attribution["unreadable_rows"] = bad_rows
    # A client may have emitted its own reconstruction of the server phases (`tracer bench`
    # does, source=response). The attribution's phase spans supersede them in spans.jsonl, so a
    # trace never shows a phase twice; raw/ still holds them as they were received.
    client_spans = [s for s in records.spans if s.get("attributes", {}).get("tracer.source") != "response"]
    spans = client_spans + phase_spans(attribution, records.spans)
    attribution["evidence"] = _evidence(attribution)
    attribution["diagnosis"] = diagnose(attribution, {
        "ollama_version": (meta.get("ollama") or {}).get("version")
        or ((records.extra.get("ebpf") or {}).get("meta", {}).get("plan") or {}).get("version"),
        "num_parallel": ((meta.get("ollama") or {}).get("settings") or {}).get("OLLAMA_NUM_PARALLEL"),
        "cache_slots": cache_slots(records.extra.get("log_events", [])),
    })
    return ExportData(meta=meta, attribution=attribution, spans=spans, evidence=evidence)


def _alignment(records: CaptureRecords) -> dict[str, Any]:
    """How well each source's clock lines up with the spans' epoch clock, as recorded."""
    meta = records.extra["meta"]
    clock = meta.get("clock") or {}
    out: dict[str, Any] = {}
    if "ebpf" in records.extra and clock.get("start"):
        model = ClockModel.from_json(clock)
        out["ebpf"] = {"method": "CLOCK_BOOTTIME offset measured at start, end and every 0.5 s, "
                                 "interpolated between neighbours",
                       "error_ns": model.error_ns("boottime"), "drift_ns": model.drift_ns("boottime"),
                       "checkpoints": len(model.checkpoints)}
    gpu_meta = records.extra.get("gpu_meta") or {}
    if gpu_meta:
        domains = gpu_meta.get("clock_domain") or {}
        described = ", ".join(f"{api}: {domain}" for api, domain in sorted(domains.items())) \
            if isinstance(domains, dict) else str(domains)
        out["nvml"] = {"method": f"driver timestamps converted to epoch ({described or 'point queries only'})",
                       "clock_domain": domains, "error_ns": gpu_meta.get("alignment_error_ns"),
                       "period_ns": gpu_meta.get("period_ns")}
    pyspy_meta = records.extra.get("pyspy_meta") or {}
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
                              "gguf_scans": attrs["gguf_scans"], "gguf_scan_ms": attrs.get("gguf_scan_ms"),
                              "uprobe_hits": attrs.get("uprobe_hits"), "syscall_events": attrs.get("syscall_events")})
                break
    return {"gguf_scans_per_request": scans}
