"""The HTML report: self-contained (nothing fetched), every phase in the DOM, capture text escaped."""

from __future__ import annotations

import io
import json
import re
import stat
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ollama_tracer.attribution.analysis import ExportData
from ollama_tracer.attribution.correlate import Evidence
from ollama_tracer.collectors.nvml import GpuSample
from ollama_tracer.exporters import html, write_rendered

T0 = 1_760_000_000_000_000_000  # an epoch-ns origin, as real captures have
MS = 1_000_000
HOSTILE = "<script>alert('x')</script>"
HOSTILE_PHASE = "server.odd</script><script>alert(1)</script>"

# Attributes and CSS through which a browser would fetch something.
FETCHING_ATTRIBUTE = re.compile(
    r"\b(?:src|href|action|formaction|poster|srcset|background|ping|manifest|data|xlink:href)\s*=\s*[\"']?([^\"'\s>]*)",
    re.IGNORECASE)


def _phase(name: str, start_ms: float, end_ms: float, process: str, source: str = "ebpf",
           **extra: Any) -> dict[str, Any]:
    return {"name": name, "start_ns": T0 + int(start_ms * MS), "end_ns": T0 + int(end_ms * MS),
            "duration_ms": end_ms - start_ms, "source": source, "process": process, **extra}


def _interval(index: int, start_ms: float, *, warmup: bool = False, prefill_ms: float = 80) -> dict[str, Any]:
    at = start_ms
    phases = [
        _phase("client.interrupt", at, at + 1, "client", "client"),
        _phase("client.request", at + 1, at + 2, "client", "client"),
        _phase("server.receive", at + 2, at + 2.5, "server", "response", attributes={"clipped": True}),
        _phase("server.receive", at + 2.5, at + 3, "server"),
        _phase("server.decode+model_lookup", at + 3, at + 40, "server",
               attributes={"gguf_scans": 3, "note": HOSTILE},
               top_functions={"server": [{"function": "github.com/ollama/ollama/fs/gguf.readString", "samples": 12}],
                              "runner": [{"function": "ggml_barrier", "samples": 4.5}]}),
        _phase(HOSTILE_PHASE, at + 40, at + 41, "proxy", "client"),
        _phase("runner.prefill", at + 41, at + 41 + prefill_ms, "runner", "log",
               gpu={"0": {"samples": 3, "util_mean": 71.5, "util_max": 98}}),
        _phase("client.first_token", at + 150, at + 156, "client", "response"),
    ]
    return {
        "index": index, "kind": "interrupt", "trace_id": f"{index:032x}", "iteration": index, "warmup": warmup,
        "model": f"gemma3-synthetic {HOSTILE}", "start_ns": T0 + int(at * MS), "end_ns": T0 + int((at + 156) * MS),
        "duration_ms": 156.0, "phases": phases,
        "off_critical_path": [_phase("server.cancel", at - 1, at + 30, "server")],
        "unattributed_ms": 156.0 - sum(p["duration_ms"] for p in phases), "coverage": 0.81,
    }


FINDING = {
    "cause": "gguf_metadata_scans", "title": "Repeated GGUF metadata scans on every request",
    "summary": "The server re-reads the model file's metadata 3 times per request.",
    "evidence": ["3 opens of the model's GGUF blob per request", f"took 37 ms {HOSTILE}"],
    "remedy": "Upgrade Ollama to 0.32.15 or newer.", "impact_ms": 37.0, "intervals": [1, 2],
}


def _data(*, diagnosis: list[dict[str, Any]] | None = None, with_gpu: bool = True) -> ExportData:
    intervals = [_interval(0, 0, warmup=True), _interval(1, 1000, prefill_ms=80), _interval(2, 2000, prefill_ms=90)]
    attribution: dict[str, Any] = {
        "schema": "tracer.attribution/1",
        "intervals": intervals,
        "summary": {
            "intervals": 2, "warmup_intervals_excluded": 1, "coverage": 0.81,
            "interval": {"mean_ms": 156.0, "median_ms": 156.0, "p95_ms": 156.0},
            "phases": [{"name": name, "process": process, "source": source, "median_ms": median, "p95_ms": p95,
                        "mean_ms": median, "share": median / 156.0}
                       for name, process, source, median, p95 in (
                           ("client.interrupt", "client", "client", 1.0, 1.0),
                           ("server.receive", "server", "ebpf+response", 1.0, 1.0),
                           ("runner.prefill", "runner", "log", 85.0, 89.5))],
            "unattributed": {"median_ms": 28.0, "p95_ms": 29.0, "share": 0.18},
        },
        "alignment": {"ebpf": {"method": "CLOCK_BOOTTIME offset", "error_ns": 138, "drift_ns": 2},
                      "pyspy": {"method": "marker", "error_ns": 1_529_214, "markers_used": 9}},
        "ebpf_matching": {"matched": 3, "unmatched": ["request 7"]},
    }
    if diagnosis is not None:
        attribution["diagnosis"] = diagnosis
    meta = {
        "command": ["python", "bench.py", "--prompt-file", HOSTILE], "tracer_version": "0.1.0", "exit_code": 0,
        "started_ns": T0 - 500 * MS, "ended_ns": T0 + 3000 * MS, "mode": "capture",
        "ollama": {"host": "http://127.0.0.1:11434", "pid": 42, "version": "0.13.5"},
        "collectors": {
            "ebpf": {"ran": True, "reason": "", "stats": {"design": "go-runners", "design_note": "v0.13-era design.",
                                                          "events": 706, "probes_missing": []}},
            "nvml": {"ran": False, "reason": "no NVIDIA driver; GPU sampling skipped"},
            "client_spans": {"ran": True, "reason": "", "stats": {"received_spans": 18}},
        },
        "drops": {"ebpf": 0, "client_spans": 2},
    }
    samples = [GpuSample(time_ns=T0 + t * 50 * MS, gpu=0, metric=metric, value=float(t % 100), source="nvml")
               for t in range(-2, 70) for metric in ("gpu_util", "power_w")] if with_gpu else []
    return ExportData(meta=meta, attribution=attribution, spans=[], evidence=Evidence(gpu_samples=samples))


def _render(data: ExportData) -> str:
    out = io.StringIO()
    html.render(out, data)
    return out.getvalue()


@dataclass
class Waterfall:
    phases: list[str] = field(default_factory=list)  # data-phase of each bar, in document order
    text: list[str] = field(default_factory=list)


class WaterfallParser(HTMLParser):
    """Each ``data-interval`` element: the ``data-phase`` values and the text inside it.

    Also used by tests/integration/test_report_html.py on Chromium's serialized DOM.
    """

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                      "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.waterfalls: dict[str, Waterfall] = {}
        self._inside: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if self._inside is None:
            if attributes.get("data-interval") is None:
                return
            self._inside = str(attributes["data-interval"])
            self._depth = 0
            self.waterfalls[self._inside] = Waterfall()
        if tag not in self.VOID:
            self._depth += 1
        if attributes.get("data-phase") is not None:
            self.waterfalls[self._inside].phases.append(str(attributes["data-phase"]))

    def handle_endtag(self, tag: str) -> None:
        if self._inside is not None and tag not in self.VOID:
            self._depth -= 1
            if self._depth == 0:
                self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside is not None:
            self.waterfalls[self._inside].text.append(data)


def waterfalls_of(document: str) -> dict[str, Waterfall]:
    parser = WaterfallParser()
    parser.feed(document)
    parser.close()
    return parser.waterfalls


def assert_every_phase_drawn(document: str, attribution: dict[str, Any]) -> None:
    """Each interval has a ``data-interval`` waterfall holding a ``data-phase`` bar and the name as text
    for every phase, critical path and off it."""
    found = waterfalls_of(document)
    for interval in attribution["intervals"]:
        waterfall = found[str(interval["index"])]
        text = "".join(waterfall.text)
        expected = [p["name"] for p in [*interval["phases"], *interval["off_critical_path"]]]
        assert waterfall.phases == expected
        for name in expected:
            assert name in text, f"{name} is not text in the waterfall of interval {interval['index']}"


def island_of(document: str) -> dict[str, Any]:
    match = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", document, re.DOTALL)
    assert match, "no JSON island"
    payload: dict[str, Any] = json.loads(match.group(1))
    return payload


def test_nothing_in_the_report_would_be_fetched() -> None:
    document = _render(_data())
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "", document, flags=re.DOTALL | re.IGNORECASE)
    for match in FETCHING_ATTRIBUTE.finditer(markup):
        assert match.group(1).startswith("#"), f"{match.group(0)} would leave the page"
    lowered = document.lower()
    for forbidden in ("@import", "url(", "<link", "<img", "<iframe", "<object", "<embed", "<base",
                      "fetch(", "xmlhttprequest", "websocket", "eventsource", "import(", "sendbeacon"):
        assert forbidden not in lowered, forbidden
    assert not re.search(r"<script[^>]*\bsrc\s*=", document, re.IGNORECASE)
    # The browser enforces it too: no source is allowed, only the one inline script (by hash).
    policy = re.search(r"<meta http-equiv='Content-Security-Policy' content='([^']+)'", document)
    assert policy and "default-src &#x27;none&#x27;" in policy.group(1) and "sha256-" in policy.group(1)


def test_every_phase_of_every_interval_is_in_its_waterfall() -> None:
    data = _data()
    document = _render(data)
    assert_every_phase_drawn(document, data.attribution)
    assert len(re.findall(r"class='bar [^']*off'", document)) == 3  # server.cancel, once per interval
    assert "off the critical path" in document


def test_capture_text_is_escaped_everywhere() -> None:
    document = _render(_data(diagnosis=[FINDING]))
    # Exactly our two script elements: the JSON island and the inlined script.
    assert len(re.findall(r"<script\b", document, re.IGNORECASE)) == 2
    assert HOSTILE not in document and HOSTILE_PHASE not in document and "<script>alert" not in document
    assert "note: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in document  # the phase attribute, in its tooltip
    # The island still holds the names exactly, once parsed.
    island = island_of(document)
    assert HOSTILE_PHASE in {p["name"] for p in island["intervals"][1]["phases"]}


def test_the_json_island_is_what_the_script_draws() -> None:
    data = _data()
    island = island_of(_render(data))
    assert island["schema"] == html.DATA_SCHEMA
    first = island["intervals"][1]
    assert first["index"] == 1 and first["duration_ms"] == 156.0
    assert first["view"] == [-1.0, 156.0]  # server.cancel starts 1 ms before the interval
    prefill = next(p for p in first["phases"] if p["name"] == "runner.prefill")
    assert (prefill["t0"], prefill["t1"], prefill["off"]) == (41.0, 121.0, False)
    assert first["phases"][-1]["name"] == "server.cancel" and first["phases"][-1]["off"] is True
    # gpu_util only, relative to the interval, one sample either side of the view; power_w is not drawn.
    times = [t for t, _ in first["gpu_util"]["0"]]
    assert times[0] < -1.0 and times[-1] > 156.0 and all(-50 <= t <= 200 for t in times)


def test_gpu_track_only_when_there_are_gpu_samples() -> None:
    assert "<polyline data-gpu='0'>" in _render(_data())
    without = _render(_data(with_gpu=False))
    assert "<polyline" not in without and "class='gpu'" not in without


def test_stack_summaries_under_each_waterfall() -> None:
    document = _render(_data())
    assert document.count("github.com/ollama/ollama/fs/gguf.readString (12)") == 3
    assert "ggml_barrier (4.5)" in document


def test_diagnosis_empty_or_missing_says_so() -> None:
    for data in (_data(), _data(diagnosis=[])):
        assert f"{html.NO_FINDING}." in _render(data)


def test_a_finding_is_rendered() -> None:
    document = _render(_data(diagnosis=[FINDING]))
    assert html.NO_FINDING not in document
    assert "data-cause='gguf_metadata_scans'" in document
    for text in ("Repeated GGUF metadata scans on every request", "re-reads the model file&#x27;s metadata",
                 "3 opens of the model&#x27;s GGUF blob per request", "Upgrade Ollama to 0.32.15 or newer.",
                 "impact ≈ 37.00 ms per interval", "intervals 1, 2"):
        assert text in document, text


def test_summary_table_and_distribution() -> None:
    document = _render(_data())
    summary = document[document.index("<section id='summary'>"):document.index("<section id='distribution'>")]
    assert "<th>phase</th><th>process</th><th>source</th><th class='num'>median ms</th>" in summary
    assert "<td>runner.prefill</td>" in summary and "85.00" in summary and "89.50" in summary
    assert "54.5 %" in summary  # share
    assert "2 interval(s), median 156.00 ms, coverage 81.0 %; 1 warm-up interval(s) excluded" in summary
    distribution = document[document.index("<section id='distribution'>"):document.index("<section id='intervals'>")]
    # One dot per measured interval (the warm-up is left out), with that interval's own value;
    # the two server.receive pieces of an interval count as one value, as in the summary.
    assert distribution.count("class='dist-dot'") == 2 * 4  # three phases plus unattributed
    assert "interval 1: 80.000 ms" in distribution and "interval 2: 90.000 ms" in distribution
    assert "interval 1: 1.000 ms" in distribution
    assert "interval 0:" not in distribution


def test_header_collectors_alignment_matching() -> None:
    document = _render(_data())
    for text in ("python bench.py --prompt-file", "0.13.5", "http://127.0.0.1:11434", "go-runners",
                 "v0.13-era design.", "gemma3-synthetic &lt;script&gt;",
                 "no NVIDIA driver; GPU sampling skipped", "did not run", "Data was lost: client_spans: 2",
                 "CLOCK_BOOTTIME offset", "138 ns", "1.53 ms", "markers_used: 9", "request 7"):
        assert text in document, text


def test_no_intervals() -> None:
    data = _data()
    data.attribution.update(intervals=[], summary={"intervals": 0, "phases": []})
    document = _render(data)
    assert html.NO_INTERVALS in document and waterfalls_of(document) == {}
    assert island_of(document)["intervals"] == []


def test_write_is_user_only(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_rendered(path, html.render, _data())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
# Where a damaged or foreign capture.json (or a diagnosis) may hold anything.
META_PATHS = [("command",), ("started_ns",), ("ended_ns",), ("exit_code",), ("interrupted",), ("complete",),
              ("errors",), ("drops",), ("drops", "ebpf"), ("ollama",), ("ollama", "version"), ("ollama", "settings"),
              ("collectors",), ("collectors", "ebpf"), ("collectors", "ebpf", "stats"),
              ("collectors", "nvml", "reason"), ("collectors", "ebpf", "stats", "design_note"), ("mode",)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(META_PATHS), json_values), max_size=4),
       json_values | st.lists(st.dictionaries(st.sampled_from(sorted(FINDING)), json_values), max_size=2))
def test_any_capture_json_and_diagnosis_render(changes: list[tuple[tuple[str, ...], Any]], diagnosis: Any) -> None:
    data = _data(diagnosis=diagnosis)
    for path, value in changes:
        parent = data.meta
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                parent[key] = {}
            parent = parent[key]
        parent[path[-1]] = value
    document = _render(data)
    assert_every_phase_drawn(document, data.attribution)
    island_of(document)
