"""What overlapped an interval, found without scanning the capture once per interval.

Whether another request was inside the server (or another sequence inside the runner) while one
was there depends on state that may begin long before: a request read an hour ago and never
answered is still in flight. Scanning every event up to each interval made the analysis
quadratic in the capture. Instead the spans (what started, when it ended, how) are built once
per capture in one pass, and each interval asks for those that reach into its window.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Span:
    """One request (or sequence) seen from its start to how it ended. ``end_ns`` None: still
    going when the capture ended. ``ended``: how (each caller says which endings count)."""

    key: Any
    start_ns: int
    end_ns: int | None
    ended: str = ""


class Overlaps:
    """Spans indexed by start, with the latest end so far beside each, so that the spans that
    reach into ``[start_ns, end_ns]`` are found by walking back from ``end_ns`` only as far as
    some span still reaches ``start_ns``."""

    def __init__(self, spans: list[Span]) -> None:
        self.spans = sorted(spans, key=lambda s: s.start_ns)
        self._starts = [s.start_ns for s in self.spans]
        self._reach: list[float] = []
        furthest: float = float("-inf")
        for span in self.spans:
            furthest = max(furthest, float("inf") if span.end_ns is None else span.end_ns)
            self._reach.append(furthest)

    def reaching(self, start_ns: int, end_ns: int) -> Iterator[Span]:
        """The spans that started by ``end_ns`` and had not ended before ``start_ns``, the latest
        started first."""
        i = bisect.bisect_right(self._starts, end_ns) - 1
        while i >= 0 and self._reach[i] >= start_ns:
            span = self.spans[i]
            if span.end_ns is None or span.end_ns >= start_ns:
                yield span
            i -= 1
