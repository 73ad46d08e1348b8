"""Compare two captures phase by phase: did an upgrade or a config change move any phase?

Two captures of the same workload never give the same milliseconds, so a bare difference of
medians says little. For every row (each phase, ``unattributed`` and the whole ``interval``) this
module reports the difference of medians, B − A, with a 95 % percentile-bootstrap confidence
interval: each capture's measured intervals are resampled with replacement, independently, and
the difference of the resampled medians is taken, ``resamples`` times. A row is ``significant``
when that interval excludes 0. Medians, not means: one interval that hit a runner reload or a
noisy neighbour should not decide the verdict.

What a row's values are, per measured (non-warm-up) interval of a capture:

* a phase that occurs in some intervals of the capture: the sum of its pieces in each interval
  (a coarser source's phase can be clipped into several pieces), and 0 ms in an interval where it
  is absent. Absent there means it took no time there (zero length, or a finer source claimed
  all of it, or, like ``server.model_load``, it did not happen), as ``attribution.summarize``
  counts it, so both tools give the same medians.
* a phase that occurs in no interval of a capture gets no values there (n = 0), not a row of
  zeros: its absence may mean "it did not happen" (no model load) or "no source could see it"
  (the capture ran without eBPF, so the phase came merged under another name), and only the
  reader can tell which. Such a row is reported as only in A or only in B, and it is significant
  when that capture has at least 2 intervals and the bootstrap interval of its median excludes 0.

Every row draws from its own generator, seeded from ``seed`` and the row's name, so the output
is reproducible and a phase that appears in one capture never shifts another row's interval.
"""

from __future__ import annotations

import statistics
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ollama_tracer.attribution import percentile
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.vocabulary import UNATTRIBUTED

SCHEMA = "tracer.diff/1"
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
INTERVAL_ROW = "interval"
UNATTRIBUTED_ROW = UNATTRIBUTED
# Fewer intervals than this and a bootstrap only resamples one value: its interval is a point.
MIN_INTERVALS = 2
# Below this many intervals per capture the percentile bootstrap of a median is optimistic: with
# 3 or 4, about 1 in 10 rows that did not change comes out significant (5 % or less from 6 up).
RELIABLE_INTERVALS = 5


@dataclass(frozen=True)
class CaptureSide:
    """One capture as the diff sees it: who made it, and each row's value per measured interval."""

    directory: str
    command: list[str]
    models: list[str]
    ollama_version: str | None
    collectors: list[str]  # the collectors that ran
    settings: dict[str, str]  # the server's OLLAMA_* settings, where the capture recorded them
    kinds: list[str]  # interval kinds ("interrupt", "request")
    intervals: int
    phases: dict[str, list[float]]  # critical-path phase → ms per measured interval
    off_path: dict[str, list[float]]  # off-critical-path phase (server.cancel) → ms per measured interval
    interval_ms: list[float]
    unattributed_ms: list[float]
    start_offsets_ns: dict[str, list[int]] = field(default_factory=dict)  # where each phase begins, to order rows

    def to_json(self) -> dict[str, Any]:
        return {"directory": self.directory, "command": self.command, "models": self.models,
                "ollama_version": self.ollama_version, "collectors": self.collectors, "settings": self.settings,
                "kinds": self.kinds, "intervals": self.intervals}


def describe(directory: str, meta: dict[str, Any], attribution: dict[str, Any],
             ollama_version: str | None = None) -> CaptureSide:
    """A capture's measured intervals, as rows of per-interval values.

    ``ollama_version`` overrides what ``meta`` says (older captures recorded it only in the eBPF
    collector's raw meta)."""
    measured = [iv for iv in attribution.get("intervals", []) if not iv.get("warmup")]
    if not measured:
        raise TracerError(
            f"{directory} has no measured intervals (no request reached a first token, or all were warm-up); "
            "re-run the capture with a command that makes at least one non-warm-up Ollama request.",
            ExitCode.BAD_CAPTURE,
        )
    phases, offsets = _per_interval(measured, "phases")
    off_path, _ = _per_interval(measured, "off_critical_path")
    server = meta.get("ollama") or {}
    return CaptureSide(
        directory=directory,
        command=[str(part) for part in meta.get("command") or []],
        models=sorted({str(iv["model"]) for iv in measured if iv.get("model")}),
        ollama_version=ollama_version or server.get("version"),
        collectors=sorted(name for name, status in (meta.get("collectors") or {}).items() if status.get("ran")),
        settings=dict(server.get("settings") or {}),
        kinds=sorted({str(iv.get("kind")) for iv in measured}),
        intervals=len(measured),
        phases=phases,
        off_path=off_path,
        interval_ms=[float(iv["duration_ms"]) for iv in measured],
        unattributed_ms=[float(iv["unattributed_ms"]) for iv in measured],
        start_offsets_ns=offsets,
    )


def _per_interval(measured: list[dict[str, Any]], group: str) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Each name's summed duration per interval (0 where absent), and its first piece's offset."""
    values: dict[str, list[float]] = {}
    offsets: dict[str, list[int]] = {}
    for position, interval in enumerate(measured):
        first_start: dict[str, int] = {}
        for phase in interval.get(group) or []:
            name = phase["name"]
            column = values.setdefault(name, [0.0] * len(measured))
            column[position] += float(phase["duration_ms"])
            start = int(phase.get("start_ns", 0))
            first_start[name] = min(start, first_start.get(name, start))
        for name, start in first_start.items():
            offsets.setdefault(name, []).append(start - int(interval.get("start_ns", 0)))
    return values, offsets


def _rng(seed: int, name: str) -> np.random.Generator:
    # crc32, not hash(): str hashes change between processes.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _resampled_medians(values: list[float], resamples: int, rng: np.random.Generator) -> Any:
    data = np.asarray(values, dtype=float)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    return np.median(data[picks], axis=1)


def _bounds(samples: Any) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    ordered = [float(v) for v in samples]
    return percentile(ordered, tail), percentile(ordered, 100 - tail)


def median_difference_interval(a: list[float], b: list[float], *, resamples: int = DEFAULT_RESAMPLES,
                               seed: int = DEFAULT_SEED, name: str = "") -> tuple[float, float]:
    """95 % percentile-bootstrap interval of median(B) − median(A), A and B resampled independently."""
    rng = _rng(seed, name)
    medians_a = _resampled_medians(a, resamples, rng)
    medians_b = _resampled_medians(b, resamples, rng)
    return _bounds(medians_b - medians_a)


def median_interval(values: list[float], *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                    name: str = "") -> tuple[float, float]:
    """95 % percentile-bootstrap interval of one capture's median."""
    return _bounds(_resampled_medians(values, resamples, _rng(seed, name)))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def compare_row(name: str, a: list[float], b: list[float], *, resamples: int = DEFAULT_RESAMPLES,
                seed: int = DEFAULT_SEED, off_critical_path: bool = False) -> dict[str, Any]:
    """One row of the diff. ``a`` or ``b`` is empty when the phase does not occur in that capture."""
    median_a = statistics.median(a) if a else None
    median_b = statistics.median(b) if b else None
    only_in: str | None = None
    if median_a is not None and median_b is not None:
        low, high = median_difference_interval(a, b, resamples=resamples, seed=seed, name=name)
        enough = min(len(a), len(b)) >= MIN_INTERVALS
        change_ms = median_b - median_a
    else:
        # Present on one side only: the change is that side's time, from (or to) nothing.
        only_in = "B" if b else "A"
        values = b or a
        low, high = median_interval(values, resamples=resamples, seed=seed, name=name)
        enough = len(values) >= MIN_INTERVALS
        change_ms = statistics.median(values) * (1 if b else -1)
        if not b:
            low, high = -high, -low
    significant = enough and (low > 0 or high < 0)
    ratio = median_b / median_a if median_a and median_b is not None else None
    return {
        "name": name,
        "off_critical_path": off_critical_path,
        "only_in": only_in,
        "n_a": len(a),
        "n_b": len(b),
        "median_a_ms": _round(median_a),
        "median_b_ms": _round(median_b),
        "change_ms": _round(change_ms),
        "change_ratio": None if ratio is None else round(ratio, 4),
        "change_percent": None if ratio is None else round(100 * (ratio - 1), 2),
        "ci95_ms": [_round(low), _round(high)],
        "significant": significant,
        "verdict": _verdict(only_in, significant, enough, low),
    }


def _verdict(only_in: str | None, significant: bool, enough: bool, low: float) -> str:
    if only_in == "B":
        return "new in B" if significant else "only in B, not significant"
    if only_in == "A":
        return "gone in B" if significant else "only in A, not significant"
    if not enough:
        return "too few intervals"
    if not significant:
        return "no significant change"
    return "slower" if low > 0 else "faster"


def _ordered(names: set[str], a: CaptureSide, b: CaptureSide) -> list[str]:
    """Critical-path order: by where each phase begins in its intervals (both captures pooled)."""
    def offset(name: str) -> float:
        pooled = a.start_offsets_ns.get(name, []) + b.start_offsets_ns.get(name, [])
        return float(statistics.median(pooled)) if pooled else 0.0

    return sorted(names, key=lambda name: (offset(name), name))


def notes(a: CaptureSide, b: CaptureSide) -> list[str]:
    """What differs between the captures besides the change being measured: each one can explain a row."""
    out = []
    if a.models != b.models:
        out.append(f"the captures ran different models (A: {', '.join(a.models) or '?'}; "
                   f"B: {', '.join(b.models) or '?'})")
    if a.ollama_version != b.ollama_version:
        out.append(f"the captures ran different Ollama versions (A: {a.ollama_version or '?'}; "
                   f"B: {b.ollama_version or '?'})")
    if a.collectors != b.collectors:
        out.append(f"the captures ran different collectors (A: {', '.join(a.collectors) or 'none'}; "
                   f"B: {', '.join(b.collectors) or 'none'}): a phase only in one of them may be one that only "
                   "its sources can separate, not a change in Ollama")
    if a.settings and b.settings and a.settings != b.settings:
        changed = sorted(key for key in set(a.settings) | set(b.settings) if a.settings.get(key) != b.settings.get(key))
        out.append("the servers ran with different settings: " + ", ".join(
            f"{key} {a.settings.get(key, 'unset')} → {b.settings.get(key, 'unset')}" for key in changed))
    few = [f"{label} has {side.intervals}" for label, side in (("A", a), ("B", b))
           if side.intervals < RELIABLE_INTERVALS]
    if few:
        out.append(f"{' and '.join(few)} measured interval(s): with fewer than {RELIABLE_INTERVALS} the confidence "
                   "intervals are too narrow (about 1 unchanged row in 10 shows as significant); capture more "
                   "iterations")
    if a.kinds != b.kinds:
        out.append(f"the captures measured different interval kinds (A: {', '.join(a.kinds)}; "
                   f"B: {', '.join(b.kinds)})")
    return out


def compare(a: CaptureSide, b: CaptureSide, *, resamples: int = DEFAULT_RESAMPLES,
            seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The whole diff as the ``tracer.diff/1`` document: rows in critical-path order, then the
    off-path phases, then ``unattributed`` and ``interval``."""
    rows = [compare_row(name, a.phases.get(name, []), b.phases.get(name, []), resamples=resamples, seed=seed)
            for name in _ordered(set(a.phases) | set(b.phases), a, b)]
    rows += [compare_row(name, a.off_path.get(name, []), b.off_path.get(name, []), resamples=resamples, seed=seed,
                         off_critical_path=True)
             for name in _ordered(set(a.off_path) | set(b.off_path), a, b)]
    rows.append(compare_row(UNATTRIBUTED_ROW, a.unattributed_ms, b.unattributed_ms, resamples=resamples, seed=seed))
    rows.append(compare_row(INTERVAL_ROW, a.interval_ms, b.interval_ms, resamples=resamples, seed=seed))
    return {
        "schema": SCHEMA,
        "a": a.to_json(),
        "b": b.to_json(),
        "notes": notes(a, b),
        "bootstrap": {"statistic": "median(B) - median(A), in ms", "confidence": CONFIDENCE,
                      "method": "percentile bootstrap, each capture's intervals resampled with replacement",
                      "resamples": resamples, "seed": seed},
        "rows": rows,
    }

