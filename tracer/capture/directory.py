"""The capture directory: the single source of truth, from which everything else is recomputed.

``create`` makes one (user-only), ``load_capture_meta`` checks its ``capture.json``. The raw
files' names and the writers and readers are in :mod:`ollama_tracer.capture_files`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ollama_tracer.capture_files import RAW_DIR, read_json
from ollama_tracer.clock import ClockModel
from ollama_tracer.errors import ExitCode, TracerError

CAPTURE_SCHEMA = "tracer.capture/1"


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
    meta = read_json(directory / "capture.json", "no capture.json")
    if meta.get("schema") != CAPTURE_SCHEMA:
        raise TracerError(f"{directory / 'capture.json'} has schema {meta.get('schema')!r}, expected "
                          f"{CAPTURE_SCHEMA!r}; it was not written by this tracer.", ExitCode.BAD_CAPTURE)
    problem = _meta_problem(meta)
    if problem is not None:
        raise TracerError(f"{directory / 'capture.json'} is corrupt ({problem}); re-run the capture.",
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
