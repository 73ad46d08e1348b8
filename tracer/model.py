"""The data model every part speaks. All times are integer epoch nanoseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ollama_tracer.vocabulary import PROCESS_CLIENT, SOURCE_RESOLUTION_MS


@dataclass(frozen=True)
class Phase:
    """One named stretch of an interval, measured by one ``source``.

    ``source`` is ``client``, ``ebpf``, ``log`` or ``response``; ``process`` is ``client``,
    ``server`` or ``runner``. A name joined with ``+`` is a merge of phases the source could
    not separate (e.g. ``server.decode+model_lookup``), never a guess at the split.
    """

    name: str
    start_ns: int
    end_ns: int
    source: str
    process: str = PROCESS_CLIENT
    attributes: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def duration_ms(self) -> float:
        return self.duration_ns / 1e6

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "name": self.name,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ms, 6),
            "source": self.source,
            "process": self.process,
            "resolution_ms": max((SOURCE_RESOLUTION_MS.get(part, 1.0) for part in self.source.split("+")), default=1.0),
        }
        if self.attributes:
            payload["attributes"] = self.attributes
        return payload

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Phase:
        return cls(
            name=str(raw["name"]), start_ns=int(raw["start_ns"]), end_ns=int(raw["end_ns"]),
            source=str(raw["source"]), process=str(raw.get("process", PROCESS_CLIENT)),
            attributes=dict(raw.get("attributes", {})),
        )
