"""The one clock model: every record becomes integer epoch nanoseconds here.

bpftrace's ``nsecs`` is CLOCK_BOOTTIME, py-spy and Go's monotonic readings are
CLOCK_MONOTONIC, OTel spans and Ollama's ``created_at`` are CLOCK_REALTIME (epoch). The offset
of each to REALTIME is measured as the narrowest of many (clock, time_ns(), clock) triples,
about 0.1 µs wide, at the start and again at the end of a capture (NTP can slew REALTIME).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

_CLOCKS = {"boottime": time.CLOCK_BOOTTIME, "monotonic": time.CLOCK_MONOTONIC}


@dataclass(frozen=True)
class ClockOffset:
    """``epoch_ns = clock_ns + offset_ns``, known to within ``uncertainty_ns``."""

    clock: str
    offset_ns: int
    uncertainty_ns: int
    taken_at_ns: int  # epoch ns when it was measured


def measure_offset(clock: str, samples: int = 200) -> ClockOffset:
    clock_id = _CLOCKS[clock]
    best: tuple[int, int] | None = None  # (width, offset)
    for _ in range(samples):
        before = time.clock_gettime_ns(clock_id)
        realtime = time.time_ns()
        after = time.clock_gettime_ns(clock_id)
        width = after - before
        if best is None or width < best[0]:
            best = (width, realtime - (before + after) // 2)
    assert best is not None
    return ClockOffset(clock=clock, offset_ns=best[1], uncertainty_ns=best[0], taken_at_ns=time.time_ns())


@dataclass(frozen=True)
class ClockModel:
    start: dict[str, ClockOffset]
    end: dict[str, ClockOffset] | None = None

    @classmethod
    def measure(cls) -> ClockModel:
        return cls(start={name: measure_offset(name) for name in _CLOCKS})

    def finish(self) -> ClockModel:
        return ClockModel(start=self.start, end={name: measure_offset(name) for name in _CLOCKS})

    def to_epoch(self, clock: str, value_ns: int) -> int:
        """Convert, interpolating the offset linearly between the start and end measurements."""
        start = self.start[clock]
        if self.end is None:
            return value_ns + start.offset_ns
        end = self.end[clock]
        approx = value_ns + start.offset_ns
        span = end.taken_at_ns - start.taken_at_ns
        if span <= 0:
            return approx
        fraction = min(1.0, max(0.0, (approx - start.taken_at_ns) / span))
        return value_ns + start.offset_ns + round((end.offset_ns - start.offset_ns) * fraction)

    def drift_ns(self, clock: str) -> int | None:
        if self.end is None:
            return None
        return self.end[clock].offset_ns - self.start[clock].offset_ns

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"start": {k: asdict(v) for k, v in self.start.items()}}
        payload["end"] = {k: asdict(v) for k, v in self.end.items()} if self.end else None
        payload["drift_ns"] = {k: self.drift_ns(k) for k in self.start}
        return payload

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClockModel:
        start = {k: ClockOffset(**v) for k, v in raw["start"].items()}
        end = {k: ClockOffset(**v) for k, v in raw["end"].items()} if raw.get("end") else None
        return cls(start=start, end=end)
