"""The capture directory: the single source of truth, from which everything else is recomputed.

``create`` makes one (user-only), ``load_capture_meta`` checks its ``capture.json``. The raw
files' names and the writers and readers are in :mod:`ollama_tracer.capture_files`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from ollama_tracer.capture_files import CAPTURE_JSON, RAW_DIR, read_json
from ollama_tracer.clock import ClockModel
from ollama_tracer.errors import ExitCode, TracerError

CAPTURE_SCHEMA = "tracer.capture/1"

Records = TypeVar("Records")


@dataclass
class CaptureRecords:
    """What a capture directory holds, read back: capture.json, the client spans, and each
    collector's typed records (``get(EbpfRecords)``). Attribution reads only this."""

    spans: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    loaded: dict[type, Any] = field(default_factory=dict)
    unreadable: dict[str, int] = field(default_factory=dict)  # file -> rows that could not be read
    server_clock_offset_ns: int = 0  # server clock − client clock; 0 for a server on this machine

    def get(self, kind: type[Records]) -> Records | None:
        return cast("Records | None", self.loaded.get(kind))

    @property
    def ollama_version(self) -> str | None:
        """capture.json's server version; a capture that did not record it may still have the eBPF
        collector's, which read it from the server to choose its probes."""
        from ollama_tracer.collectors.ebpf_events import EbpfRecords

        version = (self.meta.get("ollama") or {}).get("version")
        ebpf = self.get(EbpfRecords)
        if not version and ebpf is not None:
            version = (ebpf.meta.get("plan") or {}).get("version")
        return str(version) if version else None


def load_records(directory: Path, meta: dict[str, Any]) -> CaptureRecords:
    """Every collector's records of a capture whose ``capture.json`` (``meta``) has been checked."""
    from ollama_tracer.collectors.otlp import ClientSpans
    from ollama_tracer.collectors.registry import LOADERS

    clock = ClockModel.from_json(meta["clock"]) if meta.get("clock") else None
    records = CaptureRecords(spans=[], meta=meta)
    for load in LOADERS:
        found = load(directory, clock)
        if found is not None:
            records.loaded[type(found)] = found
            records.unreadable.update(getattr(found, "unreadable", {}))
    client = records.get(ClientSpans)
    records.spans = client.spans if client is not None else []
    return records


def create(path: Path, *, force: bool) -> Path:
    occupied = any(path.iterdir()) if path.is_dir() else path.exists()
    if occupied and not force:
        raise TracerError(
            f"{path} already exists and is not empty; choose another -o or pass --force to overwrite.",
            ExitCode.OUTPUT_EXISTS,
        )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    (path / RAW_DIR).mkdir(mode=0o700, exist_ok=True)
    return path


def load_capture_meta(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise TracerError(f"{directory} does not exist; pass the directory a capture wrote.", ExitCode.BAD_CAPTURE)
    if not directory.is_dir():
        raise TracerError(f"{directory} is not a directory; pass the directory a capture wrote.",
                          ExitCode.BAD_CAPTURE)
    meta = read_json(directory / CAPTURE_JSON, f"no {CAPTURE_JSON}")
    if meta.get("schema") != CAPTURE_SCHEMA:
        raise TracerError(f"{directory / CAPTURE_JSON} has schema {meta.get('schema')!r}, expected "
                          f"{CAPTURE_SCHEMA!r}; it was not written by this tracer.", ExitCode.BAD_CAPTURE)
    problem = _meta_problem(meta)
    if problem is not None:
        raise TracerError(f"{directory / CAPTURE_JSON} is corrupt ({problem}); re-run the capture.",
                          ExitCode.BAD_CAPTURE)
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What of capture.json the pipeline reads but does not have the shape the capture wrote, if anything."""
    if "clock" in meta:
        try:
            clock = ClockModel.from_json(meta["clock"])
        except (KeyError, TypeError, AttributeError, ValueError):
            return "its clock is not a clock model"
        points = [clock.start, *clock.checkpoints, *([clock.end] if clock.end else [])]
        if not all(isinstance(o.clock, str) and all(type(v) is int and abs(v) < 2**64  # a float, a bool, 10**400
                                                     for v in (o.offset_ns, o.uncertainty_ns, o.taken_at_ns))
                   for point in points for o in point.values()):
            return "its clock holds a measurement that is not integer nanoseconds"
        if "boottime" not in clock.start or (clock.end is not None and not clock.start.keys() <= clock.end.keys()):
            return "its clock lacks a measurement at the start or the end"
    ollama = meta.get("ollama")
    if ollama is not None and not (isinstance(ollama, dict) and isinstance(ollama.get("settings") or {}, dict)
                                   and isinstance(ollama.get("version") or "", str)):
        return "its ollama block is not what the capture writes"
    return None
