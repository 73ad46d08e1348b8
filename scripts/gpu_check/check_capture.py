"""Check a capture of torch_workload.py: does the GPU timeline line up with the client's span?

    tracer capture --no-ebpf -o /tmp/gpu-cap -- python scripts/gpu_check/torch_workload.py
    python scripts/gpu_check/check_capture.py /tmp/gpu-cap

The workload keeps the GPU busy exactly inside its ``gpu.phase`` span and idle around it, so a
correct capture shows (1) utilization inside far above outside, and (2) the first and last busy
samples within one sample period (or one NVML averaging window, whichever is longer) of the
span's edges. A wrong clock domain or a stale buffer shows up as an edge off by far more.

Exit status: 0 all checks pass, 1 a check failed, 2 the capture lacks what the check needs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_tracer.capture_files import CLIENT_SPANS, read_jsonl
from ollama_tracer.collectors.nvml import GpuSample, load_gpu_samples

SPAN_NAME = "gpu.phase"
BUSY_PERCENT = 50.0
MIN_CONTRAST_POINTS = 30.0
# nvmlDeviceGetUtilizationRates averages over "between 1 second and 1/6 second depending on the
# product" (nvidia-smi --help-query-gpu) and reports no figure, so a point-query edge gets the upper bound.
QUERY_WINDOW_NS = 1_000_000_000


class CheckError(ValueError):
    """The capture lacks what the check needs (no span, no samples)."""


@dataclass
class CheckResult:
    inside_util: float | None
    outside_util: float | None
    sample_rate_hz: float
    sample_period_ns: int
    clock_domain: Any
    start_edge_ns: int | None  # first busy sample minus span start
    end_edge_ns: int | None  # last busy sample minus span end
    tolerance_ns: int
    checks: list[tuple[str, bool]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _ms(ns: int | None) -> str:
    return "n/a" if ns is None else f"{ns / 1e6:+.1f} ms"


def _find_span(directory: Path) -> tuple[int, int]:
    spans, _bad = read_jsonl(directory / CLIENT_SPANS)
    for span in spans:
        if span.get("name") == SPAN_NAME:
            return int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])
    raise CheckError(f"no {SPAN_NAME!r} span in {directory / CLIENT_SPANS}; did the workload run under tracer capture?")


def _window_ns(sample: GpuSample | None, meta: dict[str, Any], gpu: int) -> int:
    """How long a utilization sample averages over: the ring's measured period, or the query's bound."""
    if sample is None or sample.source != "samples":
        return QUERY_WINDOW_NS
    for entry in meta.get("gpus", []):
        if entry.get("index") == gpu:
            period = (entry.get("ring_period_ns") or {}).get("gpu_util")
            if isinstance(period, int) and period > 0:
                return period
    return QUERY_WINDOW_NS


def _centre_ns(sample: GpuSample, meta: dict[str, Any], gpu: int) -> int:
    """Where a sample's averaging window is centred. A ring entry stamped t covers (t - period, t], so
    its stamp alone is late by up to a period: a perfectly aligned start edge would read +0.5 to +1.5
    periods and fail a one-period test half the time. A point query's window is unknown (1/6–1 s
    trailing), so its stamp is used as is and the 1 s tolerance covers it."""
    if sample.source != "samples":
        return sample.time_ns
    return sample.time_ns - _window_ns(sample, meta, gpu) // 2


def check(directory: Path, gpu: int = 0) -> CheckResult:
    if not directory.is_dir():
        raise CheckError(f"{directory} is not a capture directory")
    samples, meta, bad = load_gpu_samples(directory)
    util = [s for s in samples if s.metric == "gpu_util" and s.gpu == gpu]
    if len(util) < 2:
        reason = meta.get("reason") or "no gpu_util samples"
        raise CheckError(f"{directory} has no GPU timeline for GPU {gpu} ({reason})")
    span_start, span_end = _find_span(directory)

    spacing = [b.time_ns - a.time_ns for a, b in itertools.pairwise(util) if b.time_ns > a.time_ns]
    period_ns = int(statistics.median(spacing)) if spacing else 0
    duration_ns = util[-1].time_ns - util[0].time_ns
    rate_hz = (len(util) - 1) / (duration_ns / 1e9) if duration_ns > 0 else 0.0

    # Busy samples near the span only: the workload's warm-up, seconds earlier, is not an edge. Ring
    # entries give the edges where there are any: a point query after the span still averages over
    # up to a second of the busy phase and would read as a late edge.
    near = [s for s in util if span_start - QUERY_WINDOW_NS <= s.time_ns <= span_end + QUERY_WINDOW_NS]
    if any(s.source == "samples" for s in near):
        near = [s for s in near if s.source == "samples"]
    busy = [s for s in near if s.value >= BUSY_PERCENT]
    first = busy[0] if busy else None
    last = busy[-1] if busy else None
    window_ns = max(_window_ns(first, meta, gpu), _window_ns(last, meta, gpu))
    tolerance_ns = max(period_ns, window_ns)
    # A sample stamped t averages over (t - window, t]; a clean one lies wholly inside or outside the
    # span, with one sample period to spare.
    inside, outside = [], []
    for sample in util:
        window = _window_ns(sample, meta, gpu)
        if sample.time_ns - window - period_ns >= span_start and sample.time_ns + period_ns <= span_end:
            inside.append(sample.value)
        elif sample.time_ns + period_ns < span_start or sample.time_ns - window - period_ns > span_end:
            outside.append(sample.value)
    result = CheckResult(
        inside_util=_mean(inside), outside_util=_mean(outside), sample_rate_hz=rate_hz, sample_period_ns=period_ns,
        clock_domain=meta.get("clock_domain"),
        start_edge_ns=None if first is None else _centre_ns(first, meta, gpu) - span_start,
        end_edge_ns=None if last is None else _centre_ns(last, meta, gpu) - span_end,
        tolerance_ns=tolerance_ns,
    )
    contrast = (result.inside_util is not None and result.outside_util is not None
                and result.inside_util > result.outside_util + MIN_CONTRAST_POINTS)
    result.checks = [
        ("util inside > outside + 30", contrast),
        ("start edge", result.start_edge_ns is not None and abs(result.start_edge_ns) <= tolerance_ns),
        ("end edge", result.end_edge_ns is not None and abs(result.end_edge_ns) <= tolerance_ns),
    ]
    sources = {source: sum(1 for s in util if s.source == source) for source in ("samples", "query")}
    result.lines = [
        f"span {SPAN_NAME}: {(span_end - span_start) / 1e6:.1f} ms",
        f"gpu_util samples: {len(util)} ({sources['samples']} from the ring buffer, {sources['query']} point queries), "
        f"{bad} unreadable rows",
        f"sample rate achieved: {rate_hz:.1f} Hz (median spacing {period_ns / 1e6:.2f} ms; "
        f"collector rate {meta.get('rate_hz')} Hz)",
        f"clock domain: {meta.get('clock_domain')}",
        f"mean gpu_util inside: {_fmt(result.inside_util)} ({len(inside)} samples), "
        f"outside: {_fmt(result.outside_util)} ({len(outside)} samples)",
        f"start edge (first sample >= {BUSY_PERCENT:.0f}% minus span start, at its window's centre): "
        f"{_ms(result.start_edge_ns)}",
        f"end edge (last sample >= {BUSY_PERCENT:.0f}% minus span end, at its window's centre): "
        f"{_ms(result.end_edge_ns)}",
        f"tolerance: {tolerance_ns / 1e6:.1f} ms (max of sample period {period_ns / 1e6:.1f} ms and "
        f"averaging window {window_ns / 1e6:.1f} ms)",
    ]
    result.lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in result.checks]
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("capture", type=Path)
    parser.add_argument("--gpu", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = check(args.capture, args.gpu)
    except CheckError as err:
        print(f"check_capture: {err}", file=sys.stderr)
        return 2
    print("\n".join(result.lines))
    print("ALL CHECKS PASS" if result.passed else "SOME CHECKS FAILED")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
