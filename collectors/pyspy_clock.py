"""py-spy's clock placed on the epoch clock: the clock markers' fit, or the launch anchor.

py-spy's ``ts`` are µs since its recorder started, on a monotonic clock, with no epoch anchor in
the file, so the capture makes its own. The command's Python process runs a clock-marker thread
(``ollama_tracer.instrument.clock_marker``) that sits in ``_tracer_clock_marker`` between two
logged ``time_ns()`` readings. The first sample that shows that frame, and the first that no
longer does, bound py-spy's offset to epoch time. Without markers (a non-Python command, attach
mode) the anchor is ``time_ns()`` taken just before py-spy was launched, good to about ±8 ms.

py-spy's sampling is a Poisson process: the gaps between samples are exponential with mean
1/rate (src/timer.rs, to avoid aliasing), not a fixed period. So an edge tells us only that
py-spy saw the change *after* it happened, by an exponential lag. Each edge gives a hard lower
bound on the offset; the sharpest of n of them is above the truth by the smallest of n lags,
which is exponential with mean period/n. A ``B`` also gives a hard upper bound, because the
sample that saw the frame came before the frame ended. :func:`align` takes the consensus of all
edges (mis-paired or late ones are outvoted) and reports the midpoint and half-width of
[max lower, min(hard upper, max lower + ln(100)·period/n + recording latency)]: a 99 % interval.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from ollama_tracer.collectors.pyspy_trace import ChromeEvent, ClockMarker, as_int
from ollama_tracer.instrument.clock_marker import MARKER_FUNCTION

LAUNCH_ERROR_NS = 8_000_000  # time_ns() before launching py-spy vs its recorder's start (reference: ±8 ms)
RECORD_LATENCY_NS = 500_000  # a sample's timestamp is taken after the stack was read: allow this much
MARKER_PAIR_WINDOW_NS = 90_000_000  # markers start >= 225 ms apart; the launch anchor is good to ~10 ms
MAX_MARKER_NS = 1_000_000_000  # a marker held longer than this (a stalled process) is not looked for
LAG_QUANTILE = math.log(100)  # P(smallest of n exponential lags > q·period/n) = e^-q = 1 %
MAX_RESIDUALS = 64


@dataclass(frozen=True)
class Alignment:
    """``epoch_ns = ts_ns + offset_ns``, known to within ``error_ns`` either way."""

    method: str  # "marker" or "launch"
    offset_ns: int
    error_ns: int
    markers_used: int = 0
    edges_used: int = 0
    edges_rejected: int = 0
    residuals_ns: tuple[int, ...] = ()  # per used edge: how long after the logged edge py-spy saw it
    launch_minus_marker_ns: int | None = None  # how far off the launch anchor would have been

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["residuals_ns"] = list(self.residuals_ns[:MAX_RESIDUALS])
        return payload

    @classmethod
    def from_json(cls, payload: Any) -> Alignment | None:
        """The alignment stored in the meta, or None if it is missing or not well-formed."""
        if not isinstance(payload, dict):
            return None
        method, offset, error = payload.get("method"), as_int(payload.get("offset_ns")), \
            as_int(payload.get("error_ns"))
        if method not in ("marker", "launch") or offset is None or error is None:
            return None
        residuals = payload.get("residuals_ns")
        return cls(method=str(method), offset_ns=offset, error_ns=error,
                   markers_used=as_int(payload.get("markers_used")) or 0,
                   edges_used=as_int(payload.get("edges_used")) or 0,
                   edges_rejected=as_int(payload.get("edges_rejected")) or 0,
                   residuals_ns=tuple(r for r in map(as_int, residuals) if r is not None)
                   if isinstance(residuals, list) else (),
                   launch_minus_marker_ns=as_int(payload.get("launch_minus_marker_ns")))


Sighting = tuple[int, int, int, int | None]  # (pid, tid, B ts_ns, E ts_ns or None), see observed_markers


def observed_markers(events: list[ChromeEvent]) -> list[Sighting]:
    """Marker frames py-spy saw: (pid, tid, B ts_ns, E ts_ns or None when the E is unusable).

    An ``E`` at the trace's last timestamp is py-spy closing every open frame when it wrote the
    file, not a sample that saw the frame end.
    """
    if not events:
        return []
    last_ts = max(event.ts_ns for event in events)
    open_at: dict[tuple[int, int], int] = {}
    seen: list[Sighting] = []
    for event in sorted(events, key=lambda e: e.ts_ns):
        if event.name != MARKER_FUNCTION:
            continue
        key = (event.pid, event.tid)
        if event.phase == "B":
            open_at[key] = event.ts_ns
        elif key in open_at:
            begin = open_at.pop(key)
            seen.append((event.pid, event.tid, begin, event.ts_ns if event.ts_ns < last_ts else None))
    seen.extend((pid, tid, begin, None) for (pid, tid), begin in open_at.items())
    return seen


def align(events: list[ChromeEvent], markers: list[ClockMarker], *, rate_hz: int,
          launch_epoch_ns: int) -> Alignment:
    """py-spy's offset to epoch from the clock markers, or the launch anchor if there are none."""
    # Each constraint: (lower, upper or None, logged edge time, py-spy ts, marker index).
    constraints: list[tuple[int, int | None, int, int, int]] = []
    pairs, unpaired_edges = _pair_sightings(observed_markers(events), markers, launch_epoch_ns)
    for (_, _, begin_ts, end_ts), index in pairs:
        marker = markers[index]
        constraints.append((marker.start_ns - begin_ts, marker.end_ns - begin_ts + RECORD_LATENCY_NS,
                            marker.start_ns, begin_ts, index))
        if end_ts is not None:
            constraints.append((marker.end_ns - end_ts, None, marker.end_ns, end_ts, index))
    if not constraints:
        return Alignment(method="launch", offset_ns=launch_epoch_ns, error_ns=LAUNCH_ERROR_NS)
    point = _most_covered([(c[0], c[1]) for c in constraints])
    kept = [c for c in constraints if c[0] <= point and (c[1] is None or point <= c[1])]
    lower = max(c[0] for c in kept)
    period_ns = 1_000_000_000 // max(rate_hz, 1)
    upper = lower + math.ceil(LAG_QUANTILE * period_ns / len(kept)) + RECORD_LATENCY_NS
    upper = min([upper, *(c[1] for c in kept if c[1] is not None)])
    offset = (lower + upper) // 2
    return Alignment(method="marker", offset_ns=offset, error_ns=(upper - lower + 1) // 2,
                     markers_used=len({c[4] for c in kept}), edges_used=len(kept),
                     edges_rejected=len(constraints) - len(kept) + unpaired_edges,
                     residuals_ns=tuple(ts + offset - logged for _, _, logged, ts, _ in kept),
                     launch_minus_marker_ns=launch_epoch_ns - offset)


def _pair_sightings(sightings: list[Sighting], markers: list[ClockMarker],
                    launch_epoch_ns: int) -> tuple[list[tuple[Sighting, int]], int]:
    """Which logged marker each sighting is: the pairing under which the most sightings fit.

    Seeing marker m at ``B`` is possible only for offsets in [m.start - B, m.end - B]. The offset
    the most (sighting, marker) candidates allow picks one marker per sighting, so one early
    sighting cannot shift the pairing of all later ones. Candidates lie within
    MARKER_PAIR_WINDOW_NS of the launch anchor, under half the marker spacing, so a pairing
    shifted by a whole marker cannot win. Also returns the number of edges of sightings that had
    candidates but fit none (a sighting with no logged marker near it, such as the marker a
    process was in when it exited, is not counted).
    """
    pools: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, logged in sorted(enumerate(markers), key=lambda pair: pair[1].start_ns):
        pools[(logged.pid, logged.tid)].append(position)
        pools[(logged.pid, -1)].append(position)
    starts = {key: [markers[i].start_ns for i in pool] for key, pool in pools.items()}
    candidates: list[tuple[int, int, int, int]] = []  # (lower, upper, sighting index, marker index)
    for number, (pid, tid, begin_ts, _) in enumerate(sightings):
        key = (pid, tid) if (pid, tid) in pools else (pid, -1)  # newer py-spy renumbers threads
        estimate = begin_ts + launch_epoch_ns
        pool, pool_starts = pools.get(key, []), starts.get(key, [])
        first = bisect.bisect_left(pool_starts, estimate - MARKER_PAIR_WINDOW_NS - MAX_MARKER_NS)
        last = bisect.bisect_right(pool_starts, estimate + MARKER_PAIR_WINDOW_NS)
        for index in pool[first:last]:
            marker = markers[index]
            if marker.start_ns - MARKER_PAIR_WINDOW_NS <= estimate <= marker.end_ns + MARKER_PAIR_WINDOW_NS:
                candidates.append((marker.start_ns - begin_ts, marker.end_ns - begin_ts + RECORD_LATENCY_NS,
                                   number, index))
    if not candidates:
        return [], 0
    point = _most_covered([(c[0], c[1]) for c in candidates])
    chosen: dict[int, int] = {}
    taken: set[int] = set()
    for lower, upper, number, index in sorted(candidates, key=lambda c: abs((c[0] + c[1]) // 2 - point)):
        if lower <= point <= upper and number not in chosen and index not in taken:
            chosen[number] = index
            taken.add(index)
    unpaired = {number for _, _, number, _ in candidates} - chosen.keys()
    unpaired_edges = sum(1 + (sightings[number][3] is not None) for number in unpaired)
    return [(sightings[number], index) for number, index in sorted(chosen.items())], unpaired_edges


def _most_covered(intervals: list[tuple[int, int | None]]) -> int:
    """The smallest point inside the most intervals (closed; None: no upper bound)."""
    sweep: list[tuple[int, int]] = []
    for lower, upper in intervals:
        sweep.append((lower, 0))  # opening sorts before closing at the same point: bounds are inclusive
        if upper is not None:
            sweep.append((upper, 1))
    sweep.sort()
    best_count, best_point, count = -1, sweep[0][0], 0
    for point, kind in sweep:
        count += 1 if kind == 0 else -1
        if kind == 0 and count > best_count:
            best_count, best_point = count, point
    return best_point
