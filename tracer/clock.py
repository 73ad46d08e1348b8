"""The one clock model: every record becomes integer epoch nanoseconds here.

bpftrace's ``nsecs`` is CLOCK_BOOTTIME, py-spy and Go's monotonic readings are
CLOCK_MONOTONIC, OTel spans and Ollama's ``created_at`` are CLOCK_REALTIME (epoch). The offset
of each to REALTIME is measured as the narrowest of many (clock, time_ns(), clock) triples,
about 0.1 µs wide, at the start and the end of a capture, and every half second between
(:class:`ClockTicker`). REALTIME is not steady: NTP, or a VM's host, slews it (this project's
VMs were seen gaining 5 ms per second on BOOTTIME for tens of seconds, then stopping). Conversion
interpolates linearly between neighbouring checkpoints, and :meth:`ClockModel.error_ns` bounds
what that can miss: how far each checkpoint lies from the line through its neighbours.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
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
    checkpoints: tuple[dict[str, ClockOffset], ...] = ()  # between start and end, in time order

    @classmethod
    def measure(cls) -> ClockModel:
        return cls(start={name: measure_offset(name) for name in _CLOCKS})

    def finish(self, checkpoints: tuple[dict[str, ClockOffset], ...] = ()) -> ClockModel:
        return ClockModel(start=self.start, end={name: measure_offset(name) for name in _CLOCKS},
                          checkpoints=checkpoints)

    def _points(self, clock: str) -> list[ClockOffset]:
        points = [self.start[clock], *(c[clock] for c in self.checkpoints if clock in c)]
        if self.end is not None:
            points.append(self.end[clock])
        return points

    def _table(self, clock: str) -> tuple[list[ClockOffset], list[int]]:
        """``clock``'s points and their times, built once per model (a capture converts every
        one of its events through here)."""
        tables: dict[str, tuple[list[ClockOffset], list[int]]] = self.__dict__.setdefault("_tables", {})
        if clock not in tables:
            points = self._points(clock)
            tables[clock] = (points, [p.taken_at_ns for p in points])
        return tables[clock]

    def to_epoch(self, clock: str, value_ns: int) -> int:
        """Convert, interpolating the offset linearly between the neighbouring measurements."""
        points, times = self._table(clock)
        approx = value_ns + points[0].offset_ns
        if len(points) == 1:
            return approx
        i = min(max(bisect.bisect_right(times, approx), 1), len(points) - 1)
        before, after = points[i - 1], points[i]
        span = after.taken_at_ns - before.taken_at_ns
        if span <= 0:
            return value_ns + before.offset_ns
        fraction = min(1.0, max(0.0, (approx - before.taken_at_ns) / span))
        return value_ns + before.offset_ns + round((after.offset_ns - before.offset_ns) * fraction)

    def drift_ns(self, clock: str) -> int | None:
        if self.end is None:
            return None
        return self.end[clock].offset_ns - self.start[clock].offset_ns

    def error_ns(self, clock: str) -> int:
        """A bound on the conversion error: the widest measurement, plus the largest distance of a
        checkpoint from the line through its neighbours (a slew that changed pace between them).
        With only a start and an end, the whole drift (it might have been one step anywhere)."""
        points = self._points(clock)
        widest = max(p.uncertainty_ns for p in points)
        if len(points) == 2:
            return widest + abs(points[1].offset_ns - points[0].offset_ns)
        bend = 0
        for before, here, after in zip(points, points[1:], points[2:], strict=False):
            span = after.taken_at_ns - before.taken_at_ns
            if span <= 0:
                continue
            # integers: epoch-sized offsets lose their last digits in a float
            rise = (after.offset_ns - before.offset_ns) * (here.taken_at_ns - before.taken_at_ns) // span
            bend = max(bend, abs(here.offset_ns - before.offset_ns - rise))
        return widest + bend

    def to_json(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"start": {k: asdict(v) for k, v in self.start.items()}}
        payload["end"] = {k: asdict(v) for k, v in self.end.items()} if self.end else None
        payload["checkpoints"] = [{k: asdict(v) for k, v in c.items()} for c in self.checkpoints]
        payload["drift_ns"] = {k: self.drift_ns(k) for k in self.start}
        payload["error_ns"] = {k: self.error_ns(k) for k in self.start}
        return payload

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClockModel:
        start = {k: ClockOffset(**v) for k, v in raw["start"].items()}
        end = {k: ClockOffset(**v) for k, v in raw["end"].items()} if raw.get("end") else None
        checkpoints = tuple({k: ClockOffset(**v) for k, v in c.items()} for c in raw.get("checkpoints") or [])
        return cls(start=start, end=end, checkpoints=checkpoints)


class ClockTicker:
    """Measures the offsets every ``period_s`` in a daemon thread (20 triples each: ~20 µs)."""

    def __init__(self, period_s: float = 0.5, limit: int = 20_000) -> None:
        self.period_s = period_s
        self.limit = limit  # about 3 hours at 0.5 s; later ones thin out to every other
        self.points: list[dict[str, ClockOffset]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tracer-clock", daemon=True)

    def __enter__(self) -> ClockTicker:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.points.append({name: measure_offset(name, samples=20) for name in _CLOCKS})
            if len(self.points) >= self.limit:
                self.points = self.points[::2]


_RFC3339 = re.compile(r"^(?P<base>[^.Zz+-]+(?:-[^.Zz+-]+)*T[\d:]+)(?:\.(?P<frac>\d+))?(?P<zone>[Zz]|[+-]\d\d:\d\d)?$")


def parse_created_at(value: str) -> int:
    """Ollama's RFC3339Nano ``created_at`` as epoch ns (Python's parser keeps only µs)."""
    match = _RFC3339.match(value.strip())
    if match is None:
        raise ValueError(f"not an RFC3339 timestamp: {value!r}")
    zone = match["zone"] or "+00:00"
    zone = "+00:00" if zone in ("Z", "z") else zone
    seconds = int(datetime.fromisoformat(match["base"] + zone).timestamp())
    nanos = int((match["frac"] or "0").ljust(9, "0")[:9])
    return seconds * 1_000_000_000 + nanos
