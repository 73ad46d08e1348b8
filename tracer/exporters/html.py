"""A self-contained HTML report (``report.html``) that opens in a browser with no network.

Everything is inlined: the stylesheet and a small hand-written script (``html_report.css`` and
``html_report.js`` next to this module) and the data, as a JSON island. There is no CDN, web font
or image URL, because this machine and many users' machines are offline; a Content-Security-Policy
that allows no source at all makes the browser refuse any request a future edit might add.

The text (every phase name and number, the tables, the diagnosis) is HTML written here, so it
reads, prints and searches without the script. The script draws from the JSON island what depends
on the zoom: the time axis, the GPU utilization line and the side of each bar its label goes on.
A bar's geometry is two CSS variables in ms from its interval's start, so zooming changes two
variables per waterfall and the bars cannot drift from the axis.

Privacy: the report shows what attribution.json and capture.json hold (plus the GPU samples), never
spans, which carry prompt text when a capture records content.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import html
import json
import math
import shlex
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from ollama_tracer import __version__
from ollama_tracer.attribution.analysis import ExportData
from ollama_tracer.units import accuracy_statement
from ollama_tracer.units import format_ms as _ms
from ollama_tracer.vocabulary import PROCESS_CLIENT, PROCESS_FORWARDER, PROCESS_PROXY, PROCESS_RUNNER, PROCESS_SERVER

DATA_SCHEMA = "tracer.report-data/1"
NO_FINDING = "No known cause found"
NO_INTERVALS = "No intervals found: the command made no Ollama request that reached a first token."
# each has a colour in html_report.css
PROCESSES = (PROCESS_CLIENT, PROCESS_PROXY, PROCESS_FORWARDER, PROCESS_SERVER, PROCESS_RUNNER)
GPU_METRIC = "gpu_util"
_ASSETS = Path(__file__).parent
_STATS_LIST_ITEMS = 4  # a collector's list stat longer than this shows as a count


def render(outfile: TextIO, data: ExportData) -> None:
    """Write ``data`` as one HTML document."""
    attribution, meta = data.attribution, data.meta
    intervals: list[dict[str, Any]] = attribution.get("intervals", [])
    gpu_series = _gpu_series(data)
    script = (_ASSETS / "html_report.js").read_text(encoding="utf-8")
    style = (_ASSETS / "html_report.css").read_text(encoding="utf-8")
    if "</script" in script.lower() or "</style" in style.lower():
        raise ValueError("an inlined asset contains its own end tag, which would end it early")
    drawings = [_interval_drawing(iv, gpu_series) for iv in intervals]
    script_hash = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    # Only the inline script with this hash may run, and nothing may be fetched.
    policy = (f"default-src 'none'; script-src 'sha256-{script_hash}'; style-src 'unsafe-inline'; "
              "img-src data:; base-uri 'none'; form-action 'none'")
    command = _command_text(meta.get("command"))
    outfile.write(
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<meta http-equiv='Content-Security-Policy' content='{_e(policy)}'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>tracer report: {_e(command)}</title>\n<style>\n{style}</style>\n</head>\n<body>\n"
    )
    for part in (_header(meta, attribution), _diagnosis(attribution), _summary(attribution), _distribution(attribution),
                 _waterfalls(intervals, drawings, sorted(gpu_series)), _alignment(attribution)):
        outfile.write(part)
    outfile.write(f"<footer class='muted'>Written by tracer {_e(__version__)}. This file needs no network.</footer>\n")
    island = _json_island({"schema": DATA_SCHEMA, "intervals": drawings})
    outfile.write(f"<script type='application/json' id='report-data'>{island}</script>\n")
    outfile.write(f"<script>{script}</script>\n</body>\n</html>\n")



# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    """Text from the capture, escaped for element content and quoted attribute values alike."""
    return html.escape(str(value), quote=True)


def _json_island(payload: Any) -> str:
    """JSON that cannot end its <script> element: every ``<``, ``>`` and ``&`` is a JSON escape.

    ``<`` only occurs inside JSON strings, where ``\\u003c`` parses back to the same text.
    """
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f} %"


def _duration_ns(value: Any) -> str:
    """An alignment error in the unit that keeps it readable (ns, µs or ms)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "unknown"
    if abs(value) < 1_000:
        return f"{value:.0f} ns"
    if abs(value) < 1_000_000:
        return f"{value / 1_000:.1f} µs"
    return f"{value / 1_000_000:.2f} ms"


def _process_class(process: object) -> str:
    return f"proc-{process}" if process in PROCESSES else "proc-other"


def _scalar_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _command_text(command: Any) -> str:
    if isinstance(command, list):
        return shlex.join(str(part) for part in command)
    return str(command or "")


def _utc(epoch_ns: Any) -> str:
    if not isinstance(epoch_ns, int) or isinstance(epoch_ns, bool):
        return "unknown"
    try:
        return datetime.fromtimestamp(epoch_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):  # not a time this machine can represent
        return f"unknown ({epoch_ns} ns)"


def _facts(rows: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are already HTML."""
    return "<dl class='facts'>" + "".join(f"<dt>{_e(key)}</dt><dd>{value}</dd>" for key, value in rows) + "</dl>\n"


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is an object, else empty: capture.json is read as found, damaged or not."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    return [] if value is None or value == "" else [value]


def _plain(value: Any) -> str:
    """Any JSON value as escaped, compact text (dicts as ``key: value`` pairs)."""
    if isinstance(value, dict):
        return ", ".join(f"{_e(key)}: {_plain(item)}" for key, item in value.items()) or "—"
    if isinstance(value, list):
        return ", ".join(_plain(item) for item in value) or "none"
    return _e(_scalar_text(value))


# --------------------------------------------------------------------------------------------
# Header: the command, the capture, Ollama, the collectors and what was dropped
# --------------------------------------------------------------------------------------------


def _header(meta: dict[str, Any], attribution: dict[str, Any]) -> str:
    collectors = _dict(meta.get("collectors"))
    ebpf_stats = _dict(_dict(collectors.get("ebpf")).get("stats"))
    ollama = _dict(meta.get("ollama"))
    version = ollama.get("version") or ebpf_stats.get("ollama_version") or ebpf_stats.get("version")
    intervals = attribution.get("intervals", [])
    models = sorted({str(iv["model"]) for iv in intervals if iv.get("model")})
    started, ended = meta.get("started_ns"), meta.get("ended_ns")
    captured = _e(_utc(started))
    if isinstance(started, int) and isinstance(ended, int):
        captured += f" for {(ended - started) / 1e9:.1f} s"
    exit_code = meta.get("exit_code")
    exit_text = _e(exit_code) + (" <span class='bad'>(interrupted)</span>" if meta.get("interrupted") else "")
    design = ebpf_stats.get("design")
    rows = [
        ("command", f"<code>{_e(_command_text(meta.get('command')))}</code>"),
        ("mode", _e(meta.get("mode") or "capture")),
        ("captured", captured),
        ("exit code", exit_text),
        ("Ollama host", _e(ollama.get("host") or "unknown") + (f" (pid {_e(ollama['pid'])})" if ollama.get("pid")
                                                                else "")),
        ("Ollama version", _e(version) if version else "<span class='muted'>not recorded in capture.json</span>"),
        ("server design", (f"<b>{_e(design)}</b>: {_e(ebpf_stats.get('design_note') or '')}" if design
                           else "<span class='muted'>unknown (eBPF did not run)</span>")),
        ("model(s)", _e(", ".join(models)) if models else "<span class='muted'>none</span>"),
        *([("Ollama settings", _plain(ollama["settings"]))] if ollama.get("settings") else []),
        ("tracer", _e(meta.get("tracer_version") or "unknown")),
    ]
    legend = "".join(f"<span class='swatch {_process_class(p)}'></span>{p}" for p in PROCESSES)
    errors = list(_list(meta.get("errors")))
    if meta.get("complete") is False:
        errors.insert(0, "the capture is incomplete: what is shown is what was written before it stopped")
    error_list = ("<p class='bad'>Errors during the capture:</p><ul>"
                  + "".join(f"<li>{_plain(error)}</li>" for error in errors) + "</ul>\n") if errors else ""
    return (
        "<header>\n<h1>Where the time goes between an interrupt and the next first token</h1>\n"
        "<nav><a href='#diagnosis'>Diagnosis</a><a href='#summary'>Summary</a>"
        "<a href='#distribution'>Distribution</a><a href='#intervals'>Intervals</a>"
        "<a href='#alignment'>Alignment</a></nav>\n"
        + _facts(rows) + f"<p class='muted'>Processes:{legend}</p>\n" + error_list
        + _collectors(collectors, _dict(meta.get("drops")), _dict(attribution.get("unreadable_rows")))
        + "</header>\n"
    )


def _collectors(collectors: dict[str, Any], drops: dict[str, Any], unreadable: dict[str, Any]) -> str:
    rows = []
    for name, value in collectors.items():
        status = _dict(value)
        ran = bool(status.get("ran"))
        # Why a collector did not run is the point of this table; a running one's stats are detail.
        detail = (f"<details><summary>stats</summary><span class='mono'>{_stats_text(_dict(status.get('stats')))}"
                  "</span></details>" if ran else _e(status.get("reason") or "no reason given"))
        if status.get("error"):
            detail = f"<span class='bad'>{_e(status['error'])}</span>" + detail
        dropped = drops.get(name, 0)
        dropped_cell = f"<span class='bad'>{_e(dropped)}</span>" if dropped else _e(dropped)
        ran_cell = "ran" if ran else "<span class='bad'>did not run</span>"
        rows.append(f"<tr><td>{_e(name)}</td><td>{ran_cell}</td><td class='num'>{dropped_cell}</td>"
                    f"<td>{detail}</td></tr>")
    lost = {name: count for name, count in drops.items() if count}
    lost.update({f"unreadable rows in {name}": count for name, count in unreadable.items() if count})
    summary = (f"<p class='bad'>Data was lost: {_plain(lost)}.</p>" if lost
               else "<p class='muted'>Nothing was dropped.</p>")
    return ("<h2>Collectors</h2>\n<table><tr><th>collector</th><th>status</th><th class='num'>dropped</th>"
            "<th>why not, or stats</th></tr>" + "".join(rows) + "</table>\n" + summary + "\n")


def _stats_text(stats: dict[str, Any]) -> str:
    """A collector's stats on one line: scalars, short lists, one level of nested scalars."""
    parts: list[str] = []
    for key, value in stats.items():
        if key == "design_note":
            continue  # shown in full above
        if isinstance(value, dict):
            parts.extend(f"{key}.{sub}={_scalar_text(item)}" for sub, item in value.items()
                         if not isinstance(item, (dict, list)))
        elif isinstance(value, list):
            short = len(value) <= _STATS_LIST_ITEMS and all(not isinstance(item, (dict, list)) for item in value)
            parts.append(f"{key}=[{', '.join(map(_scalar_text, value))}]" if short else f"{key}=[{len(value)} items]")
        else:
            parts.append(f"{key}={_scalar_text(value)}")
    return _e(" · ".join(parts)) or "—"


# --------------------------------------------------------------------------------------------
# Diagnosis, summary table, distribution
# --------------------------------------------------------------------------------------------


def _diagnosis(attribution: dict[str, Any]) -> str:
    findings = [f for f in _list(attribution.get("diagnosis")) if isinstance(f, dict)]
    if not findings:
        return f"<section id='diagnosis'>\n<h2>Diagnosis</h2>\n<p class='none-found'>{NO_FINDING}.</p>\n</section>\n"
    parts: list[str] = []
    for finding in findings:
        impact = finding.get("impact_ms")
        facts = []
        if isinstance(impact, (int, float)):
            facts.append(f"impact ≈ {impact:.2f} ms per interval")
        if _list(finding.get("intervals")):
            facts.append("intervals " + ", ".join(_e(i) for i in _list(finding["intervals"])))
        evidence = "".join(f"<li>{_e(item)}</li>" for item in _list(finding.get("evidence")))
        parts.append(
            f"<article class='finding' data-cause='{_e(finding.get('cause', ''))}'>"
            f"<h3>{_e(finding.get('title') or finding.get('cause') or 'finding')}"
            f"<span class='cause mono'>{_e(finding.get('cause', ''))}</span></h3>"
            f"<p>{_e(finding.get('summary', ''))}</p>"
            + (f"<p class='muted'>{' · '.join(facts)}</p>" if facts else "")
            + (f"<ul>{evidence}</ul>" if evidence else "")
            + (f"<p><b>Remedy:</b> {_e(finding['remedy'])}</p>" if finding.get("remedy") else "")
            + "</article>\n"
        )
    return "<section id='diagnosis'>\n<h2>Diagnosis</h2>\n" + "".join(parts) + "</section>\n"


def _summary(attribution: dict[str, Any]) -> str:
    """The terminal table's columns (tracer/exporters/table.py), as HTML."""
    summary: dict[str, Any] = attribution.get("summary") or {}
    if not summary.get("intervals"):
        return f"<section id='summary'>\n<h2>Summary</h2>\n<p>{NO_INTERVALS}</p>\n</section>\n"
    interval, unattributed = summary.get("interval") or {}, summary.get("unattributed") or {}
    rows = [
        f"<tr><td>{_e(p['name'])}</td><td><span class='swatch {_process_class(p.get('process'))}'></span>"
        f"{_e(p.get('process', ''))}</td><td>{_e(p.get('source', ''))}</td><td class='num'>{_ms(p.get('median_ms'))}"
        f"</td><td class='num'>{_ms(p.get('p95_ms'))}</td><td class='num'>{_percent(p.get('share'))}</td></tr>"
        for p in summary.get("phases", [])
    ]
    rows.append(f"<tr class='dim'><td>unattributed</td><td></td><td></td>"
                f"<td class='num'>{_ms(unattributed.get('median_ms'))}</td>"
                f"<td class='num'>{_ms(unattributed.get('p95_ms'))}</td>"
                f"<td class='num'>{_percent(unattributed.get('share'))}</td></tr>")
    rows.append(f"<tr class='total'><td>interval</td><td></td><td></td><td class='num'>"
                f"{_ms(interval.get('median_ms'))}</td><td class='num'>{_ms(interval.get('p95_ms'))}</td>"
                "<td class='num'>100.0 %</td></tr>")
    excluded = summary.get("warmup_intervals_excluded")
    caption = (f"{_e(summary['intervals'])} interval(s), median {_ms(interval.get('median_ms'))} ms, "
               f"coverage {_percent(summary.get('coverage'))}"
               + (f"; {_e(excluded)} warm-up interval(s) excluded" if excluded else ""))
    statement = accuracy_statement()
    return ("<section id='summary'>\n<h2>Summary</h2>\n"
            + (f"<p class='muted'>{_e(statement)}</p>\n" if statement else "")
            + "<table class='summary'>"
            f"<caption class='muted'>{caption}</caption><tr><th>phase</th><th>process</th><th>source</th>"
            "<th class='num'>median ms</th><th class='num'>p95 ms</th><th class='num'>share</th></tr>"
            + "".join(rows) + "</table>\n</section>\n")


def _measured_values(intervals: Sequence[dict[str, Any]]) -> tuple[list[int], dict[str, list[float]]]:
    """Each phase name's ms per measured interval, as the summary counts them: the pieces of one
    name summed, and 0 where an interval lacks the name (so every name has a value per interval)."""
    measured = [iv for iv in intervals if not iv.get("warmup")] or list(intervals)
    indices = [int(iv.get("index", n)) for n, iv in enumerate(measured)]
    values: dict[str, list[float]] = {}
    for position, interval in enumerate(measured):
        for phase in interval.get("phases", []):
            row = values.setdefault(str(phase["name"]), [0.0] * len(measured))
            row[position] += float(phase.get("duration_ms") or 0.0)
    values["unattributed"] = [float(iv.get("unattributed_ms") or 0.0) for iv in measured]
    return indices, values


def _distribution(attribution: dict[str, Any]) -> str:
    summary: dict[str, Any] = attribution.get("summary") or {}
    rows_in = [*summary.get("phases", [])]
    if not summary.get("intervals") or not rows_in:
        return ""
    if summary.get("unattributed"):
        rows_in.append({"name": "unattributed", "process": "other", **summary["unattributed"]})
    indices, values = _measured_values(attribution.get("intervals", []))
    scale = max([1e-9, *(float(r.get("p95_ms") or 0) for r in rows_in), *(v for vs in values.values() for v in vs)])

    def at(value: float) -> str:
        return f"{min(100.0, max(0.0, 100 * value / scale)):.3f}%"

    rows = []
    for row in rows_in:
        name = str(row["name"])
        median, p95 = float(row.get("median_ms") or 0), float(row.get("p95_ms") or 0)
        dots = "".join(f"<span class='dist-dot' style='left:{at(value)}' title='interval {index}: "
                       f"{value:.3f} ms'></span>" for index, value in zip(indices, values.get(name, []), strict=False))
        whisker = (f"<span class='dist-whisker' style='left:{at(median)};width:calc({at(p95)} - {at(median)})'>"
                   "</span>" if p95 > median else "")
        rows.append(
            f"<div class='dist-name {_process_class(row.get('process'))}' data-dist-phase='{_e(name)}'>"
            f"<span class='swatch {_process_class(row.get('process'))}'></span>{_e(name)}</div>"
            f"<div class='dist-track {_process_class(row.get('process'))}'><span class='dist-bar' "
            f"style='width:{at(median)}'></span>{whisker}{dots}</div>"
            f"<div class='dist-value'>median {median:.2f} · p95 {p95:.2f} ms</div>"
        )
    return ("<section id='distribution'>\n<h2>Distribution per phase</h2>\n"
            f"<p class='muted'>Across the {len(indices)} measured interval(s): bar = median, whisker = p95, "
            "dots = each interval (hover for its number).</p>\n<div class='dist'>" + "".join(rows)
            + f"<div class='dist-axis'><span>0 ms</span><span>{scale / 2:.2f} ms</span>"
            f"<span>{scale:.2f} ms</span></div></div>\n</section>\n")


# --------------------------------------------------------------------------------------------
# Waterfalls
# --------------------------------------------------------------------------------------------


def _gpu_series(data: ExportData) -> dict[int, list[tuple[int, float]]]:
    """``gpu_util`` samples per GPU, in time order."""
    series: dict[int, list[tuple[int, float]]] = {}
    if data.evidence is None:
        return series
    for sample in data.evidence.gpu_samples:
        if sample.metric == GPU_METRIC and math.isfinite(sample.value):
            series.setdefault(int(sample.gpu), []).append((int(sample.time_ns), float(sample.value)))
    for samples in series.values():
        samples.sort()
    return series


def _offset_ms(epoch_ns: Any, origin_ns: int) -> float:
    # Relative, in Python's exact integers: epoch ns do not fit a JavaScript number exactly.
    return round((int(epoch_ns) - origin_ns) / 1e6, 6)


def _interval_drawing(interval: dict[str, Any], gpu_series: dict[int, list[tuple[int, float]]]) -> dict[str, Any]:
    """What the script draws for one interval, in ms from its start."""
    origin = int(interval["start_ns"])
    phases = [
        {"name": str(p["name"]), "process": p.get("process"), "source": p.get("source"), "off": group != "phases",
         "t0": _offset_ms(p["start_ns"], origin), "t1": _offset_ms(max(int(p["start_ns"]), int(p["end_ns"])), origin)}
        for group in ("phases", "off_critical_path") for p in interval.get(group, [])
    ]
    duration = _offset_ms(interval["end_ns"], origin)
    view = [min([0.0, *(p["t0"] for p in phases)]), max([duration, *(p["t1"] for p in phases)])]
    gpu: dict[str, list[list[float]]] = {}
    for gpu_index, samples in gpu_series.items():
        # One sample either side of the view too, so the line crosses the whole track.
        times = [time_ns for time_ns, _ in samples]
        first = max(0, bisect.bisect_left(times, origin + int(view[0] * 1e6)) - 1)
        last = bisect.bisect_right(times, origin + int(view[1] * 1e6)) + 1
        gpu[str(gpu_index)] = [[_offset_ms(t, origin), value] for t, value in samples[first:last]]
    return {"index": interval.get("index"), "duration_ms": duration, "view": view, "phases": phases,
            "gpu_util": gpu}


def _tooltip(phase: dict[str, Any]) -> str:
    lines = [f"{phase['name']}: {float(phase.get('duration_ms') or 0):.3f} ms",
             f"process: {phase.get('process', '?')}", f"source: {phase.get('source', '?')}"]
    lines.extend(f"{key}: {_scalar_text(value)}" for key, value in (phase.get("attributes") or {}).items())
    for gpu_index, entry in sorted((phase.get("gpu") or {}).items()):
        lines.append(f"GPU {gpu_index}: " + ", ".join(f"{key} {_scalar_text(value)}" for key, value in entry.items()))
    return "\n".join(lines)


def _bar(phase: dict[str, Any], drawn: dict[str, Any], position: int) -> str:
    classes = f"bar {_process_class(phase.get('process'))}" + (" off" if drawn["off"] else "")
    return (f"<div class='lane'><div class='{classes}' data-phase='{_e(phase['name'])}' data-i='{position}' "
            f"style='--t0:{drawn['t0']};--t1:{drawn['t1']}' title='{_e(_tooltip(phase))}'><span class='label'>"
            f"<span class='phase-name'>{_e(phase['name'])}</span> {_ms(phase.get('duration_ms'))} ms</span>"
            "</div></div>")


def _stacks(interval: dict[str, Any]) -> str:
    items = []
    for phase in [*interval.get("phases", []), *interval.get("off_critical_path", [])]:
        roles = [(role, functions) for role, functions in (phase.get("top_functions") or {}).items() if functions]
        if not roles:
            continue
        described = "; ".join(
            f"<span class='role'>{_e(role)}:</span> "
            + ", ".join(f"{_e(f.get('function', '?'))} ({_e(format(float(f.get('samples') or 0), 'g'))})"
                        for f in functions)
            for role, functions in roles)
        items.append(f"<li><b>{_e(phase['name'])}</b> {described}</li>")
    if not items:
        return "<p class='stacks muted'>No stack samples fell in this interval's phases.</p>\n"
    return ("<details class='stacks' open><summary>Top functions per phase (samples)</summary><ul>"
            + "".join(items) + "</ul></details>\n")


def _waterfall(interval: dict[str, Any], drawing: dict[str, Any], gpus: list[int]) -> str:
    """One interval: the bars (positions from ``drawing``, as the script zooms them), the GPU track, the stacks."""
    index = interval.get("index")
    phases = [*interval.get("phases", []), *interval.get("off_critical_path", [])]
    lanes = []
    for position, (phase, drawn) in enumerate(zip(phases, drawing["phases"], strict=True)):
        if drawn["off"] and (position == 0 or not drawing["phases"][position - 1]["off"]):
            lanes.append("<div class='lane-heading'>off the critical path (concurrent; not part of the sum)</div>")
        lanes.append(_bar(phase, drawn, position))
    view_start, view_end = drawing["view"]
    view_ms = max(view_end - view_start, 0.01)
    boundaries = "".join(f"<span class='boundary at' style='--t:{t}'></span>" for t in (0.0, drawing["duration_ms"]))
    gpu = ""
    if gpus:
        gpu = ("<div class='gpu'><span class='gpu-label'>GPU util % (0–100)</span>"
               f"<svg viewBox='{view_start} 0 {view_ms} 100' preserveAspectRatio='none'>"
               + "".join(f"<polyline data-gpu='{g}'></polyline>" for g in gpus) + "</svg></div>")
    warmup = " <span class='warmup-tag'>warm-up: excluded from the summary</span>" if interval.get("warmup") else ""
    facts = (f"{_ms(interval.get('duration_ms'))} ms · coverage {_percent(interval.get('coverage'))} · "
             f"unattributed {_ms(interval.get('unattributed_ms'))} ms")
    return (
        f"<section class='interval' id='interval-{_e(index)}'>\n"
        f"<h3>Interval {_e(index)} · {_e(interval.get('kind', ''))} · {_e(interval.get('model') or 'unknown model')}"
        f"{warmup}</h3>\n<p class='interval-facts'>{facts}</p>\n"
        f"<div class='zoom'><button type='button' data-for='{_e(index)}' data-zoom='out' title='zoom out'>−"
        f"</button><button type='button' data-for='{_e(index)}' data-zoom='in' title='zoom in'>+</button>"
        f"<button type='button' data-for='{_e(index)}' data-zoom='reset'>reset</button>"
        "<span class='hint'>mouse wheel zooms at the pointer, drag pans</span></div>\n"
        f"<div class='waterfall' data-interval='{_e(index)}' style='--view-start:{view_start};"
        f"--view-ms:{view_ms}'><div class='plot'><div class='axis'></div>"
        f"<div class='lanes'><div class='grid'></div>{boundaries}{''.join(lanes)}</div>{gpu}</div></div>\n"
        + _stacks(interval) + "</section>\n"
    )


def _waterfalls(intervals: list[dict[str, Any]], drawings: list[dict[str, Any]], gpus: list[int]) -> str:
    if not intervals:
        return f"<section id='intervals'>\n<h2>Intervals</h2>\n<p>{NO_INTERVALS}</p>\n</section>\n"
    return ("<section id='intervals'>\n<h2>Intervals</h2>\n<p class='muted'>One waterfall per interval, "
            "critical-path phases in order; hover a bar for its source and attributes.</p>\n"
            + "".join(_waterfall(iv, drawing, gpus) for iv, drawing in zip(intervals, drawings, strict=True))
            + "</section>\n")


# --------------------------------------------------------------------------------------------
# Alignment and matching
# --------------------------------------------------------------------------------------------


def _alignment(attribution: dict[str, Any]) -> str:
    alignment: dict[str, Any] = attribution.get("alignment") or {}
    rows = []
    for source, entry in alignment.items():
        entry = entry if isinstance(entry, dict) else {"method": entry}
        others = {key: value for key, value in entry.items() if key not in ("method", "error_ns")}
        rows.append(f"<tr><td>{_e(source)}</td><td>{_e(entry.get('method') or 'unknown')}</td>"
                    f"<td class='num'>{_e(_duration_ns(entry.get('error_ns')))}</td>"
                    f"<td class='mono'>{_plain(others) if others else '—'}</td></tr>")
    table = ("<table><tr><th>source</th><th>method</th><th class='num'>error</th><th>details</th></tr>"
             + "".join(rows) + "</table>\n") if rows else "<p class='muted'>No clock alignment was recorded.</p>\n"
    matching = attribution.get("ebpf_matching")
    matching_html = (_facts((str(key), _plain(value)) for key, value in matching.items())
                     if isinstance(matching, dict) else
                     f"<p>{_plain(matching)}</p>\n" if matching is not None else
                     "<p class='muted'>Not recorded (no eBPF matching in this capture).</p>\n")
    correlation = attribution.get("correlation") or {}
    correlation_html = _facts((str(key), _plain(value)) for key, value in correlation.items()) if correlation else ""
    return ("<section id='alignment'>\n<h2>Alignment and matching</h2>\n<p class='muted'>How far each source's "
            "clock may be off the spans' epoch clock.</p>\n" + table + "<h3>eBPF request matching</h3>\n"
            + matching_html + ("<h3>Evidence joined to phases</h3>\n" + correlation_html if correlation_html else "")
            + "</section>\n")
