from __future__ import annotations

import itertools
import random

from ollama_tracer.attribution import AttributedInterval, attribute, percentile, reconcile, summarize
from ollama_tracer.attribution.intervals import Interval, find_intervals
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.model import Phase

MS = 1_000_000


def _interval(start: int = 0, end: int = 100 * MS) -> Interval:
    return Interval(index=0, kind="interrupt", start_ns=start, end_ns=end, trace_id="t",
                    request={"attributes": {}})


def test_finer_source_wins_and_nothing_is_counted_twice() -> None:
    iv = _interval()
    ebpf = [Phase("server.decode", 10 * MS, 20 * MS, "ebpf", "server"),
            Phase("server.model_lookup", 20 * MS, 60 * MS, "ebpf", "server")]
    response = [Phase("server.decode+model_lookup+schedule", 5 * MS, 70 * MS, "response", "server")]
    phases, off = reconcile(iv, [(30, response), (10, ebpf)])
    assert off == []
    assert [(p.name, p.start_ns // MS, p.end_ns // MS, p.source) for p in phases] == [
        ("server.decode+model_lookup+schedule", 5, 10, "response"),
        ("server.decode", 10, 20, "ebpf"),
        ("server.model_lookup", 20, 60, "ebpf"),
        ("server.decode+model_lookup+schedule", 60, 70, "response"),
    ]
    assert phases[0].attributes["clipped"] is True
    assert sum(p.duration_ns for p in phases) == 65 * MS


def test_phases_are_clipped_to_the_interval_and_off_path_is_kept_aside() -> None:
    iv = _interval(10 * MS, 50 * MS)
    phases, off = reconcile(iv, [(40, [Phase("client.interrupt", 0, 20 * MS, "client")]),
                                 (10, [Phase("server.cancel", 12 * MS, 40 * MS, "ebpf", "runner",
                                             {"off_critical_path": True})])])
    assert [(p.start_ns, p.end_ns) for p in phases] == [(10 * MS, 20 * MS)]
    assert [p.name for p in off] == ["server.cancel"]


def test_remainder_is_exact_for_random_overlapping_sources() -> None:
    rng = random.Random(7)
    for _ in range(300):
        iv = _interval(rng.randrange(0, 50) * MS, rng.randrange(60, 200) * MS)
        by_source = []
        for rank in (10, 20, 30, 40):
            phases = []
            for _ in range(rng.randrange(0, 6)):
                a, b = sorted(rng.randrange(0, 250 * MS) for _ in range(2))
                phases.append(Phase(f"p{rank}", a, b, f"s{rank}"))
            by_source.append((rank, phases))
        kept, _ = reconcile(iv, by_source)
        attributed = AttributedInterval(iv, kept, [])
        assert attributed.attributed_ns + attributed.unattributed_ns == iv.duration_ns
        assert attributed.unattributed_ns >= 0
        for a, b in itertools.pairwise(kept):
            assert a.end_ns <= b.start_ns
        assert all(iv.start_ns <= p.start_ns < p.end_ns <= iv.end_ns for p in kept)


def test_percentile_and_summary() -> None:
    assert percentile([1.0], 95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert abs(percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) - 4.8) < 1e-9
    a = AttributedInterval(_interval(0, 10 * MS), [Phase("x", 0, 4 * MS, "client")], [])
    b = AttributedInterval(_interval(0, 10 * MS), [Phase("x", 0, 6 * MS, "client"),
                                                   Phase("y", 6 * MS, 10 * MS, "response", "server")], [])
    s = summarize([a, b])
    assert s["intervals"] == 2
    x, y = s["phases"]
    assert (x["name"], x["median_ms"], x["share"]) == ("x", 5.0, 0.5)
    assert (y["name"], y["count"], y["median_ms"]) == ("y", 1, 2.0)  # absent in one interval: 0 there
    assert abs(s["coverage"] - 0.7) < 1e-9


def _span(span_id: str, name: str, start: int, end: int, parent: str = "", trace: str = "t1",
          **attributes: object) -> dict[str, object]:
    return {"traceId": trace, "spanId": span_id, "parentSpanId": parent, "name": name,
            "startTimeUnixNano": start, "endTimeUnixNano": end, "attributes": attributes,
            "resource": {"service.name": "ollama-client"}}


def test_interrupt_pattern_is_found_without_a_client_interrupt_span() -> None:
    genai = {"gen_ai.provider.name": "ollama", "gen_ai.request.model": "m"}
    spans = [
        _span("a", "text_completion m", 0, 500 * MS, **genai, **{"tracer.cancelled": True}),
        _span("b", "text_completion m", 501 * MS, 900 * MS, **genai, **{"tracer.first_token_ns": 640 * MS}),
        _span("c", "text_completion m", 2000 * MS, 2300 * MS, **genai, **{"tracer.first_token_ns": 2100 * MS}),
    ]
    intervals = find_intervals(spans)  # type: ignore[arg-type]
    assert [(iv.kind, iv.start_ns // MS, iv.end_ns // MS) for iv in intervals] == [
        ("interrupt", 500, 640), ("request", 2000, 2100)]


def test_attribute_payload_schema() -> None:
    payload = attribute(CaptureRecords(spans=[]))
    assert payload["schema"] == "tracer.attribution/1"
    assert payload["intervals"] == [] and payload["summary"]["intervals"] == 0
    assert [p["source"] for p in payload["precedence"]] == ["ebpf", "log", "response", "client"]


def test_summary_orders_phases_by_their_first_piece() -> None:
    iv = _interval(0, 100 * MS)
    kept, _ = reconcile(iv, [(10, [Phase("b", 10 * MS, 20 * MS, "ebpf"), Phase("c", 20 * MS, 30 * MS, "ebpf")]),
                             (30, [Phase("a", 5 * MS, 95 * MS, "response")])])
    # "a" keeps two pieces (5-10 and 30-95): its later piece must not move it after "b" and "c".
    names = [p["name"] for p in summarize([AttributedInterval(iv, kept, [])])["phases"]]
    assert names == ["a", "b", "c"]
