"""The capture directory: the single source of truth. Files are user-only (0600 in a 0700 dir)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tracer.errors import ExitCode, TracerError

CAPTURE_SCHEMA = "tracer.capture/1"
ATTRIBUTION_SCHEMA = "tracer.attribution/1"
CLIENT_SPANS = "raw/client_spans.jsonl"


def create(path: Path, *, force: bool) -> Path:
    occupied = any(path.iterdir()) if path.is_dir() else path.exists()
    if occupied and not force:
        raise TracerError(
            f"{path} already exists and is not empty; choose another -o or pass --force to overwrite.",
            ExitCode.OUTPUT_EXISTS,
        )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    (path / "raw").mkdir(mode=0o700, exist_ok=True)
    return path


def _open_private(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def open_private(path: Path, mode: str = "w") -> Any:
    """Open a capture file for writing, user-only (0600) from the moment it exists."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode, encoding=None if "b" in mode else "utf-8")


def write_text(path: Path, text: str) -> None:
    """Write atomically: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with os.fdopen(_open_private(tmp), "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise TracerError(f"could not write {path} ({err.strerror}); free some disk space or choose another -o.",
                          ExitCode.FAILURE) from err


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    write_text(path, "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))


class JsonlAppender:
    """Append rows as they arrive and flush each batch, so a killed capture keeps what it had."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8")
        self.rows = 0

    def append(self, rows: Iterable[Any]) -> None:
        for row in rows:
            self._out.write(json.dumps(row, separators=(",", ":")) + "\n")
            self.rows += 1
        self._out.flush()

    def close(self) -> None:
        self._out.close()


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TracerError(f"{path} is missing: {path.parent} is not a complete capture ({what}).",
                          ExitCode.BAD_CAPTURE) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise TracerError(f"{path} is corrupt ({err}); re-run the capture.", ExitCode.BAD_CAPTURE) from None
    if not isinstance(raw, dict):
        raise TracerError(f"{path} is corrupt (not a JSON object); re-run the capture.", ExitCode.BAD_CAPTURE)
    return raw


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a JSONL file and the number of unreadable lines (a torn last line after a kill)."""
    rows: list[dict[str, Any]] = []
    bad = 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


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
    return meta
