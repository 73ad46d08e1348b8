"""The interface every evidence source speaks. Adding a source: one module plus one registry line.

A collector is asked ``available()`` first; a missing one says why in one sentence (with the
fix), and the capture goes on without it. ``start`` gets the session (directory, clock, pids),
``stop`` flushes and writes the collector's raw output under ``raw/`` so that attribution can be
recomputed from the capture directory alone, and returns its stats (counts, drops).

Each collector module also owns ``load(directory, clock)``: its raw files read back as typed
records (a dataclass of its own, with ``unreadable`` counts per file), or None when the capture
has none of its files. ``collectors.registry.LOADERS`` lists them; the capture directory layer
calls each once, and attribution asks for the records by type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ollama_tracer.capture_files import RAW_DIR
from ollama_tracer.clock import ClockModel


@dataclass
class SessionInfo:
    """What a collector may need to know about the capture it is part of."""

    directory: Path
    clock: ClockModel
    ollama_host: str | None = None
    ollama_pid: int | None = None
    ollama_version: str | None = None  # asked once, when the capture starts
    ollama_log: Path | None = None
    child_env: dict[str, str] = field(default_factory=dict)  # a collector may add variables

    @property
    def raw_dir(self) -> Path:
        path = self.directory / RAW_DIR
        path.mkdir(mode=0o700, exist_ok=True)
        return path


class Collector(Protocol):
    name: str

    def available(self) -> tuple[bool, str]: ...

    def start(self, session: SessionInfo) -> None: ...

    def child_started(self, pid: int) -> None: ...

    def stop(self) -> dict[str, Any]: ...


Records = TypeVar("Records", covariant=True)


class Loader(Protocol[Records]):
    """A collector's ``load``: its raw files as typed records, or None when it wrote none."""

    def __call__(self, directory: Path, clock: ClockModel | None, /) -> Records | None: ...
