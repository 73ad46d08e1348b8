from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ollama_tracer.attribution.ebpf_source import EbpfSource, blob_scans
from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.clock import ClockModel, ClockOffset
from ollama_tracer.collectors.ebpf_events import EbpfRecords, ParseError, ProbeEvent, parse_line
from ollama_tracer.collectors.ebpf_plan import build_script, plan_probes
from ollama_tracer.collectors.ollama_log import parse_line as parse_log_line
from ollama_tracer.collectors.probe_catalogue import design_for, probes_for
from ollama_tracer.vocabulary import merged_name

CLOCK = ClockModel(start={"boottime": ClockOffset("boottime", 1_000, 100, 0),
                          "monotonic": ClockOffset("monotonic", 2_000, 100, 0)})
MS = 1_000_000


def test_parse_event_lines() -> None:
    probes = {0: "github.com/ollama/ollama/server.getExistingName"}
    assert parse_line("R 5000 10 11 8 238 POST\n", CLOCK, probes) == ProbeEvent("R", 6000, 10, 11, 8, 238, "POST")
    assert parse_line("U 5 10 12 0\n", CLOCK, probes).text == probes[0]
    assert parse_line("X 5 10 12 9 6815744\n", CLOCK, probes).value == 6815744
    opened = parse_line("O 5 10 12 9 /models/blobs/sha256-ab cd\n", CLOCK, probes)
    assert opened.text == "/models/blobs/sha256-ab cd" and opened.fd == 9
    for bad in ("", "Attaching 22 probes...", "Q 1 2 3", "R x 1 2 3 4", "U 1 2 3 99", "W 1 2"):
        with pytest.raises(ParseError):
            parse_line(bad, CLOCK, probes)


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=120))
def test_event_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(ParseError):
        parse_line(text, CLOCK, {0: "f"})


def test_parse_slog_lines() -> None:
    line = ('time=2026-11-25T04:17:41.709Z level=DEBUG source=server.go:1509 msg="completion request" '
            'images=0 prompt=181 format=""')
    event = parse_log_line(line)
    assert event is not None
    assert (event.level, event.source, event.msg) == ("DEBUG", "server.go:1509", "completion request")
    assert event.attrs == {"images": "0", "prompt": "181", "format": ""}
    assert event.time_ns % 1_000_000_000 == 709_000_000
    assert parse_log_line("[GIN] 2026/11/25 - 04:17:42 | 200 | 1.2s | 127.0.0.1 | POST") is None
    assert parse_log_line("time=garbage msg=x") is None


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=200))
def test_slog_parser_never_crashes(text: str) -> None:
    parse_log_line("time=" + text)
    parse_log_line(text)


def test_merged_names() -> None:
    assert merged_name(["server.receive", "server.decode", "server.model_lookup"]) == \
        "server.receive+decode+model_lookup"
    assert merged_name(["runner.admit", "runner.prefill"]) == "runner.admit+prefill"
    assert merged_name(["server.handoff", "runner.admit"]) == "server.handoff+runner.admit"
    # a phase that comes twice in a merge is named once
    assert merged_name(["server.handoff", "server.runner_wait", "server.handoff"]) == "server.handoff+runner_wait"


def _Records(events: list[ProbeEvent]) -> CaptureRecords:
    ebpf = EbpfRecords(events=events, meta={}, roles={1: "server", 2: "runner"})
    return CaptureRecords(spans=[], loaded={EbpfRecords: ebpf})


def _interval(end_ms: int) -> Interval:
    return Interval(index=0, kind="request", start_ns=0, end_ns=end_ms * MS, trace_id="t",
                    request={"startTimeUnixNano": 0, "attributes": {}})


def _u(t: int, pid: int, symbol: str) -> ProbeEvent:
    return ProbeEvent("U", t * MS, pid, pid, text=symbol)


S = "github.com/ollama/ollama/server."
R = "github.com/ollama/ollama/runner/ollamarunner."


def test_symbol_layer_boundaries_and_first_hit_wins() -> None:
    events = [
        ProbeEvent("R", 1 * MS, 1, 1, 8, 200, "POST"),
        _u(2, 1, S + "(*Server).GenerateHandler"), _u(2, 1, S + "(*Server).GenerateHandler"),  # morestack
        _u(3, 1, S + "getExistingName"),
        ProbeEvent("O", 4 * MS, 1, 1, 9, 0, "/m/blobs/sha256-aa"), ProbeEvent("X", 30 * MS, 1, 1, 9, 0),
        _u(40, 1, S + "(*runnerRef).needsReload"), _u(41, 1, S + "(*LlmRequest).useLoadedRunner"),
        _u(42, 1, "github.com/ollama/ollama/llm.(*llmServer).Completion"),
        # Completion's health check, after the semaphore; another connection's answer comes first
        ProbeEvent("W", 45 * MS, 1, 1, 10, 90, "GET "), ProbeEvent("R", 45 * MS + 500, 1, 1, 11, 100, "HTTP"),
        ProbeEvent("R", 46 * MS, 1, 1, 10, 100, "HTTP"),
        _u(47, 2, R + "(*Server).completion"), _u(48, 2, R + "(*InputCache).LoadCacheSlot"),
        _u(60, 2, "github.com/ollama/ollama/sample.(*Sampler).Sample"),
        ProbeEvent("W", 61 * MS, 2, 2, 6, 100, "HTTP"), ProbeEvent("W", 62 * MS, 1, 1, 7, 100, "HTTP"),
        ProbeEvent("W", 63 * MS, 1, 1, 8, 100, "HTTP"),
    ]
    phases = EbpfSource().phases(_interval(70), _Records(events))  # type: ignore[arg-type]
    assert [(p.name, p.start_ns // MS, p.end_ns // MS) for p in phases] == [
        ("server.receive", 1, 2), ("server.decode", 2, 3), ("server.model_lookup", 3, 40),
        ("server.schedule", 40, 41), ("server.handoff", 41, 42), ("server.runner_wait", 42, 45),
        ("server.runner_health", 45, 46), ("server.handoff", 46, 47), ("runner.admit", 47, 48),
        ("runner.prefill", 48, 60), ("runner.sample", 60, 61),
        ("server.stream", 61, 63),  # the write on the client's fd (8), not another socket's (7)
    ]
    assert phases[2].attributes["gguf_scans"] == 1 and phases[2].attributes["blob_opens"] == 1


def test_syscall_layer_merges_what_it_cannot_separate() -> None:
    events = [
        ProbeEvent("R", 1 * MS, 1, 1, 8, 200, "POST"), ProbeEvent("W", 40 * MS, 1, 1, 10, 90, "GET "),
        ProbeEvent("R", 43 * MS, 2, 2, 6, 500, "POST"), ProbeEvent("W", 61 * MS, 2, 2, 6, 100, "HTTP"),
        ProbeEvent("W", 63 * MS, 1, 1, 8, 100, "HTTP"),
    ]
    phases = EbpfSource().phases(_interval(70), _Records(events))  # type: ignore[arg-type]
    # One GET /health (needsReload's) and no symbol: the semaphore and Completion's own health
    # check cannot be told apart from the hand-off.
    assert [p.name for p in phases] == ["server.receive+decode+model_lookup",
                                        "server.schedule+handoff+runner_wait+runner_health",
                                        "runner.admit+prefill+sample", "server.stream"]


def test_model_load_reason() -> None:
    events = [
        ProbeEvent("R", 1 * MS, 1, 1, 8, 200, "POST"), _u(2, 1, S + "(*Server).GenerateHandler"),
        _u(3, 1, S + "getExistingName"), _u(5, 1, S + "(*Scheduler).load"),
        _u(900, 1, S + "(*LlmRequest).useLoadedRunner"), ProbeEvent("R", 903 * MS, 2, 2, 6, 500, "POST"),
        ProbeEvent("W", 910 * MS, 2, 2, 6, 100, "HTTP"), ProbeEvent("W", 911 * MS, 1, 1, 8, 100, "HTTP"),
    ]
    phases = EbpfSource().phases(_interval(920), _Records(events))  # type: ignore[arg-type]
    names = [p.name for p in phases]
    assert names[:5] == ["server.receive", "server.decode", "server.model_lookup+schedule", "server.model_load",
                         "server.handoff+runner_wait+runner_health"]
    load = phases[3]
    assert (load.start_ns, load.end_ns) == (5 * MS, 900 * MS)
    assert load.attributes["reason"].startswith("cold load")


def test_blob_scans_pick_the_model_blob() -> None:
    events = [ProbeEvent("R", 0, 1, 1, 8, 10, "POST")]
    for i, path in enumerate(["/b/blobs/sha256-cfg", "/b/blobs/sha256-model", "/b/blobs/sha256-model"]):
        events += [ProbeEvent("O", (i + 1) * MS, 1, 1, 9, 0, path), ProbeEvent("X", (i + 1) * MS + 500, 1, 1, 9, 0)]
    scans = blob_scans(events, {1: "server"}, events[0], None)
    assert (scans["blob_opens"], scans["other_blob_opens"], scans["gguf_scans"], scans["gguf_scan_ms"]) == (
        2, 1, 2, 0.001)
    # the runner's --model names the blob even when another one is opened as often
    assert blob_scans(events, {1: "server"}, events[0], None, {"/b/blobs/sha256-cfg"})["gguf_scans"] == 1
    # v0.34 reads a metadata sidecar: the config blob is opened, the runner's GGUF blob is not
    sidecar = blob_scans(events[:3], {1: "server"}, events[0], None, {"/b/blobs/sha256-gguf"})
    assert (sidecar["blob_opens"], sidecar["other_blob_opens"], sidecar["gguf_scans"]) == (0, 1, 0)


def test_catalogue_by_version_and_missing_symbols(tmp_path: Path) -> None:
    assert design_for("0.13.5") == "go-runners" and design_for("0.33.0") == "llama-server"
    assert design_for(None) == "unknown" and design_for("garbage") == "unknown"
    assert probes_for("0.13.5") == probes_for("0.13.0") and probes_for("0.14.1") == probes_for("0.13.5")
    assert probes_for("0.33.0") == probes_for("0.30.0") != ()  # llama-server design: its own catalogue entry
    plan = plan_probes(Path("/bin/true"), "0.13.5")
    assert plan.attached == {} and "github.com/ollama/ollama/server.getExistingName" in plan.missing


@pytest.mark.parametrize("hz", [0, 99])
def test_the_program_is_filled_in_and_bpftrace_parses_it(hz: int) -> None:
    """Every placeholder of ebpf_program.bt is filled, with and without the stack sampler; where
    bpftrace is installed, its parser accepts the result (``-d``, a dry run: nothing attaches)."""
    import re
    import shutil
    import subprocess

    script = build_script(plan_probes(Path("/bin/true"), "0.13.5"), hz, held=[])
    assert not re.search(r"\{[A-Z_]+\}", script), script
    assert ("@P0[" in script) == (hz > 0)
    if shutil.which("bpftrace") is None:
        return
    parsed = subprocess.run(["bpftrace", "-d", "-"], input=script, capture_output=True, text=True, timeout=60)
    assert "syntax error" not in parsed.stderr and "ERROR: " not in parsed.stderr.replace(
        "ERROR: Unknown error -1: couldn't set RLIMIT_MEMLOCK", ""), parsed.stderr[-2000:]



def test_log_collector_keeps_no_prompt_text_without_record_content(tmp_path: Path) -> None:
    from ollama_tracer.collectors.base import SessionInfo
    from ollama_tracer.collectors.ollama_log import OllamaLogCollector

    log = tmp_path / "ollama.log"
    log.write_text("old line before the capture\n")
    (tmp_path / "cap" / "raw").mkdir(parents=True)
    lines = [
        'time=2026-11-25T04:17:41.709Z level=DEBUG source=server.go:1509 msg="completion request" images=0 prompt=181',
        'time=2026-11-25T04:17:41.710Z level=TRACE source=s.go:1 msg="completion request" prompt="SECRET-PROMPT"',
        'time=2026-11-25T04:17:41.720Z level=DEBUG source=runner.go:793 msg="hit stop token" pending="[SECRET-REPLY]"',
        'time=2026-11-25T04:17:41.730Z level=DEBUG source=cache.go:142 msg="loading cache slot" id=0 used=1',
        "[GIN] 2026/11/25 - 04:17:42 | 200 | 1.2s | 127.0.0.1 | POST",
    ]
    for record, expect_secret in ((False, False), (True, True)):
        collector = OllamaLogCollector(log, record_content=record)
        collector.start(SessionInfo(directory=tmp_path / "cap", clock=CLOCK))
        with log.open("a") as out:
            out.write("\n".join(lines) + "\n")
        collector.stop()
        kept = (tmp_path / "cap" / "raw" / "ollama.log").read_text()
        assert ("SECRET" in kept) is expect_secret
        assert "loading cache slot" in kept and "old line" not in kept


def test_a_slewed_realtime_is_followed_between_checkpoints() -> None:
    from ollama_tracer.clock import ClockOffset

    def at(t: int, offset: int) -> dict[str, ClockOffset]:
        return {"boottime": ClockOffset("boottime", offset, 100, t)}

    # REALTIME gains 5 ms per second on BOOTTIME for 2 s (as seen on this project's VMs), then stops.
    base = 10**18
    points = [at(base + k * 500_000_000, base + min(k, 4) * 2_500_000) for k in range(7)]
    model = ClockModel(start=points[0], end=points[-1], checkpoints=tuple(points[1:-1]))
    boot_at_1s = 1_000_000_000  # epoch ≈ base + 1 s
    assert model.to_epoch("boottime", boot_at_1s) == boot_at_1s + base + 5_000_000
    assert model.to_epoch("boottime", 2_750_000_000) == 2_750_000_000 + base + 10_000_000
    # The bend where the slew stopped is the conversion's error bound; start/end alone would say 10 ms.
    assert model.error_ns("boottime") == 100 + 1_250_000
    assert ClockModel(start=points[0], end=points[-1]).error_ns("boottime") == 100 + 10_000_000
    assert ClockModel.from_json(model.to_json()) == model


def test_another_servers_processes_are_left_out(tmp_path: Path) -> None:
    """The comm filter records every `ollama` process; only this server's tree is the capture's."""
    from ollama_tracer import capture_files
    from ollama_tracer.collectors.ebpf_events import load
    from ollama_tracer.process_discovery import role_of

    assert role_of(10, 10) == "server" and role_of(12, 10, parent=10) != "other"
    assert role_of(20, 10, parent=1) == "other" and role_of(21, 10, parent=20) == "other"
    raw = tmp_path / "raw"
    raw.mkdir()
    meta = {"pid": 10, "probe_index": {}, "roles": {"10": "server", "20": "other", "21": "other"},
            "model_blobs": [], "plan": {"goroutines": {}}, "sockets_at_start": []}
    (tmp_path / capture_files.EBPF_META).write_text(json.dumps(meta))
    (tmp_path / capture_files.EBPF_EVENTS).write_text(
        "R 5000 10 11 8 238 POST\nR 5001 20 22 8 238 POST\nX 5002 21 23 9 0\nX 5003 10 11 8 0\n")
    records = load(tmp_path, CLOCK)
    assert records is not None
    assert [e.pid for e in records.events] == [10, 10]
    assert set(records.roles) == {10} and records.meta["other_pids"] == [20, 21]


def test_an_unknown_connection_with_another_request_in_its_interval_is_not_guessed() -> None:
    """Through a proxy (or a relay) the server accepted the proxy's connection, so the client's
    port names none: the first request read in the interval may be another client's."""
    events = [
        ProbeEvent("R", 1 * MS, 1, 1, 8, 200, "POST"), _u(2, 1, S + "(*Server).GenerateHandler"),
        _u(3, 1, S + "getExistingName"), ProbeEvent("R", 30 * MS, 1, 1, 9, 200, "POST"),  # the other client's
        ProbeEvent("W", 61 * MS, 1, 1, 8, 100, "HTTP"), ProbeEvent("W", 63 * MS, 1, 1, 9, 100, "HTTP"),
    ]
    found = EbpfSource().find(_interval(70), _Records(events))  # type: ignore[arg-type]
    assert found.phases == []
    assert "client connection is unknown" in found.outcome["unmatched"][0]["reason"], found.outcome
    # alone in its interval, the same request is matched as before
    alone = [e for e in events if e.fd != 9]
    assert EbpfSource().phases(_interval(70), _Records(alone))  # type: ignore[arg-type]
