"""The llama-server design's boundaries (Ollama v0.30+) on synthetic events laid out as one warm
/api/generate on v0.34 runs: each call to llama-server is a new connection, answered on it."""

from __future__ import annotations

import itertools

from ollama_tracer.attribution.ebpf_llama_server import boundaries
from ollama_tracer.attribution.ebpf_source import EbpfSource, _symbol_keys
from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.collectors.ebpf_events import EbpfRecords, ProbeEvent
from ollama_tracer.collectors.probe_catalogue import (
    DESIGN_ALONE,
    V0_30,
    design_for,
    design_of,
    probes_for,
    probes_for_design,
)

MS = 1_000_000
SERVER, RUNNER = 1, 2
S = "github.com/ollama/ollama/server."
L = "github.com/ollama/ollama/llm."


def _u(t: float, pid: int, symbol: str) -> ProbeEvent:
    return ProbeEvent("U", int(t * MS), pid, pid, text=symbol)


def _io(kind: str, t: float, pid: int, fd: int, text: str, value: int = 100) -> ProbeEvent:
    return ProbeEvent(kind, int(t * MS), pid, pid, fd, value, text)


def _request(*, symbols: bool = True) -> list[ProbeEvent]:
    events = [
        _io("R", 1, SERVER, 8, "POST /api/generate"),
        _u(1.5, SERVER, S + "(*Server).GenerateHandler"), _u(2.2, SERVER, S + "getExistingName"),
        _u(4.2, SERVER, S + "(*Server).scheduleRunner"),
        _io("W", 7.0, SERVER, 20, "GET /health HTTP/1."), _io("R", 7.6, SERVER, 20, "HTTP/1.1 200 OK"),
        _u(7.8, SERVER, S + "(*LlmRequest).useLoadedRunner"),
        _io("W", 8.3, SERVER, 21, "POST /tokenize HTT"), _io("R", 9.1, SERVER, 21, "HTTP/1.1 200 OK"),
        _u(9.4, SERVER, L + "(*llamaServerRunner).Completion"),
        _io("W", 9.6, SERVER, 22, "GET /health HTTP/1."), _io("R", 10.2, SERVER, 22, "HTTP/1.1 200 OK"),
        _io("W", 13.0, SERVER, 23, "POST /completion H"), _io("R", 13.1, RUNNER, 5, "POST /completion H"),
        _u(13.2, RUNNER, "server_routes::handle_completions_impl"),
        _u(14.5, RUNNER, "server_context_impl::process_single_task"),
        _io("W", 15.3, RUNNER, 5, "HTTP/1.1 200 OK"),  # headers go out when the slot launches
        _u(15.5, RUNNER, "llama_process"), _u(20.8, RUNNER, "common_sampler_sample"),
        _u(20.9, RUNNER, "server_context_impl::process_token"),
        _io("W", 21.0, RUNNER, 5, "data: {\"index\":0"), _io("R", 21.1, SERVER, 23, "HTTP/1.1 200 OK"),
        _io("W", 21.3, SERVER, 8, "HTTP/1.1 200 OK"),
    ]
    return [e for e in events if symbols or e.kind != "U"]


def _phases(events: list[ProbeEvent]) -> list[tuple[str, float, float]]:
    ebpf = EbpfRecords(events=events, meta={"plan": {"design": "llama-server"}}, roles={SERVER: "server",
                                                                                       RUNNER: "runner"})
    records = CaptureRecords(spans=[], loaded={EbpfRecords: ebpf})
    interval = Interval(index=0, kind="request", start_ns=0, end_ns=30 * MS, trace_id="t",
                        request={"startTimeUnixNano": 0, "attributes": {}})
    return [(p.name, p.start_ns / MS, p.end_ns / MS) for p in EbpfSource().phases(interval, records)]


def test_v0_30_and_newer_get_the_llama_server_catalogue() -> None:
    assert design_for("0.34.4") == "llama-server"
    assert probes_for("0.34.4") == probes_for("0.30.0") == V0_30
    libraries = {spec.library for spec in V0_30 if spec.process == "runner"}
    assert libraries == {"libllama-server-impl.so", "libllama.so", "libllama-common.so"}


def test_each_round_trip_to_llama_server_is_its_own_phase() -> None:
    phases = _phases(_request())
    assert phases == [
        ("server.receive", 1, 1.5), ("server.decode", 1.5, 2.2), ("server.model_lookup", 2.2, 4.2),
        ("server.schedule", 4.2, 7.0), ("server.runner_health", 7.0, 7.6), ("server.schedule", 7.6, 7.8),
        ("server.handoff", 7.8, 8.3), ("server.tokenize", 8.3, 9.1), ("server.handoff", 9.1, 9.4),
        ("server.runner_wait", 9.4, 9.6), ("server.runner_health", 9.6, 10.2), ("server.handoff", 10.2, 13.2),
        ("runner.admit", 13.2, 15.5), ("runner.prefill", 15.5, 20.8), ("runner.sample", 20.8, 21.0),
        ("server.stream", 21.0, 21.3),
    ]
    for (_, _, end), (_, start, _) in itertools.pairwise(phases):
        assert end == start  # in order, no gap, no overlap


def test_the_syscall_layer_alone_still_separates_every_round_trip() -> None:
    phases = _phases(_request(symbols=False))
    assert phases == [
        ("server.receive+decode+model_lookup+schedule", 1, 7.0), ("server.runner_health", 7.0, 7.6),
        ("server.schedule+handoff", 7.6, 8.3), ("server.tokenize", 8.3, 9.1),
        ("server.handoff+runner_wait", 9.1, 9.6), ("server.runner_health", 9.6, 10.2),
        ("server.handoff", 10.2, 13.1), ("runner.admit+prefill+sample", 13.1, 15.3),
        ("server.stream", 15.3, 21.3),
    ]


def test_an_answer_is_taken_only_from_its_own_connection() -> None:
    events = _request()
    # Another connection's answer arrives first; the health check's own comes later.
    events.append(_io("R", 7.2, SERVER, 99, "HTTP/1.1 200 OK"))
    events.sort(key=lambda e: e.time_ns)
    assert ("server.runner_health", 7.0, 7.6) in _phases(events)


LLAMA_SERVER_LOG = """\
time=1970-01-01T00:00:00.001Z level=DEBUG source=llama_server.go:1624 msg="llama-server completion request" \
media=0 prompt_len=77
slot get_availabl: id  0 | task -1 | selected slot by LCP similarity, f_sim_best = 1.000 (> 0.100 thold), \
f_keep = 0.860
slot launch_slot_: id  0 | task 7 | processing task, is_child = 0
slot   operator(): id  0 | task 7 | new prompt, n_ctx_slot = 4096, n_keep = 4, task.n_tokens = 69
slot   operator(): id  0 | task 7 | cached n_tokens = 68, memory_seq_rm [68, end)
slot launch_slot_: id  0 | task 7 | prompt: Tell me a secret
slot print_timing: id  0 | task 7 | prompt eval time =       0.61 ms /     1 tokens \
(    0.61 ms per token,  1628.66 tokens per second)
"""


def test_llama_servers_own_lines_say_what_happened_to_the_request() -> None:
    from ollama_tracer.collectors.ollama_log import LogRecords, keep_without_content, parse_log

    kept = [line for line in LLAMA_SERVER_LOG.splitlines() if keep_without_content(line)]
    assert not any("secret" in line for line in kept)  # text is never kept without --record-content
    events, bad = parse_log("\n".join(kept))
    assert bad == 0 and {e.time_ns for e in events} == {1 * MS}  # the Ollama line's time: a lower bound
    ebpf = EbpfRecords(events=_request(), meta={"plan": {"design": "llama-server"}},
                       roles={SERVER: "server", RUNNER: "runner"})
    records = CaptureRecords(spans=[], loaded={EbpfRecords: ebpf, LogRecords: LogRecords(events)})
    interval = Interval(index=0, kind="request", start_ns=0, end_ns=30 * MS, trace_id="t",
                        request={"startTimeUnixNano": 0, "attributes": {}})
    phases = {p.name: p.attributes for p in EbpfSource().phases(interval, records)}
    assert phases["runner.admit"]["slot_selected_by"] == "LCP similarity"
    assert phases["runner.admit"]["runner_task"] == 7
    assert (phases["runner.prefill"]["prompt_tokens"], phases["runner.prefill"]["cached_tokens"],
            phases["runner.prefill"]["evaluated_tokens"]) == (69, 68, 1)
    assert phases["runner.prefill"]["runner_prompt_eval_ms"] == 0.61


def test_the_cancel_ends_on_the_interrupted_requests_own_completion_connection() -> None:
    """server.cancel: the client's EOF, then llama-server reading EOF on that request's /completion
    socket (the one that read the bytes the server posted), not the first connection to close."""
    from ollama_tracer.attribution.ebpf_llama_server import completion_closed

    roles = {SERVER: "server", RUNNER: "runner"}
    events = [
        _io("W", 1.0, SERVER, 23, "POST /completion H", 486), _io("R", 1.1, RUNNER, 4, "POST /health HTT", 121),
        _io("R", 1.2, RUNNER, 5, "POST /completion H", 486),
        _io("R", 50.0, SERVER, 8, "", 0),  # the client closed its stream
        _io("R", 51.0, RUNNER, 4, "", 0),  # another connection's close comes first
        _io("R", 57.5, RUNNER, 5, "", -104),
    ]
    closed = completion_closed(events, roles, events[3])
    assert closed is not None and closed.time_ns == 57.5 * MS and closed.fd == 5
    # Without llama-server's read of the posted bytes the link is missing: no end, not a guess.
    assert completion_closed([e for e in events if e is not events[2]], roles, events[3]) is None


def test_an_unanswered_request_shows_the_phase_it_is_stuck_in() -> None:
    """The interrupt stall on v0.34: the request reached Completion and never wrote to llama-server
    again; it waited in server.runner_wait until the client gave up, and the diagnosis says so."""
    from ollama_tracer.attribution.diagnosis import stalled_request
    from ollama_tracer.attribution.unanswered import unanswered

    stalled = [e for e in _request() if e.time_ns <= 9.4 * MS]  # up to Completion, then nothing
    ebpf = EbpfRecords(events=stalled, meta={"plan": {"design": "llama-server"}},
                       roles={SERVER: "server", RUNNER: "runner"})
    span = {"traceId": "t1", "spanId": "s1", "startTimeUnixNano": 0, "endTimeUnixNano": 10_009 * MS,
            "attributes": {"gen_ai.provider.name": "ollama", "gen_ai.request.model": "m"},
            "status": {"code": 2, "message": "timed out"}}
    answered = dict(span, traceId="t2", attributes={**span["attributes"], "tracer.first_token_ns": 5 * MS})
    records = CaptureRecords(spans=[span, answered], loaded={EbpfRecords: ebpf})
    entries = unanswered(records)
    assert len(entries) == 1 and entries[0]["trace_id"] == "t1"
    assert entries[0]["stuck_in"] == "server.runner_wait" and entries[0]["last_boundary"] == "CP"
    assert abs(entries[0]["stuck_ms"] - 9_999.6) < 0.01
    finding = stalled_request([], {"unanswered": entries})
    assert finding is not None and "semaphore" in finding["summary"] and "keep_alive 0" in finding["remedy"]
    # Without the evidence (no eBPF: the phase is unknown), or a fast failure: no finding.
    unknown = unanswered(CaptureRecords(spans=[span], loaded={}))
    assert unknown[0]["stuck_in"] is None and stalled_request([], {"unanswered": unknown}) is None
    fast = [dict(entries[0], end_ns=entries[0]["start_ns"] + 5 * MS)]
    assert stalled_request([], {"unanswered": fast}) is None


def test_a_missing_boundary_is_reported_with_its_reason() -> None:
    """A boundary that was not found merges its neighbours; the outcome says which and why."""
    events = [e for e in _request() if e.text != "common_sampler_sample"]
    ebpf = EbpfRecords(events=events, meta={"plan": {"design": "llama-server"}},
                       roles={SERVER: "server", RUNNER: "runner"})
    records = CaptureRecords(spans=[], loaded={EbpfRecords: ebpf})
    interval = Interval(index=3, kind="request", start_ns=0, end_ns=30 * MS, trace_id="t",
                        request={"startTimeUnixNano": 0, "attributes": {}})
    found = EbpfSource().find(interval, records)
    assert "runner.prefill+sample" in [p.name for p in found.phases]
    assert found.outcome["missing"] == [{"interval": 3, "boundary": "SA", "phase": "runner.sample",
                                         "why": "no hit of its probe or syscall stand-in after the boundary "
                                                "before it"}]
    complete = EbpfSource().find(interval, CaptureRecords(spans=[], loaded={EbpfRecords: EbpfRecords(
        events=_request(), meta={"plan": {"design": "llama-server"}}, roles={SERVER: "server", RUNNER: "runner"})}))
    assert complete.outcome["missing"] == []


def _alone(events: list[ProbeEvent]) -> list[tuple[str, float, float]]:
    ebpf = EbpfRecords(events=events, meta={"plan": {"design": DESIGN_ALONE}}, roles={SERVER: "server"})
    records = CaptureRecords(spans=[], loaded={EbpfRecords: ebpf})
    interval = Interval(index=0, kind="request", start_ns=0, end_ns=30 * MS, trace_id="t",
                        request={"startTimeUnixNano": 0, "attributes": {}})
    return [(p.name, p.start_ns / MS, p.end_ns / MS) for p in EbpfSource().phases(interval, records)]


def test_llama_server_alone_is_its_own_server_and_runner() -> None:
    """llama-server without Ollama: it reads the client's request itself (on the client's
    connection), its functions split admission, prefill and sampling, and its first write after
    the first sampled token ends its part. The headers it writes at the slot's launch do not."""
    events = [
        _io("R", 1, SERVER, 8, "POST /completion H"),
        _io("R", 1.2, SERVER, 9, "POST /completion H"),  # another client's request: another connection
        _u(1.8, SERVER, "server_routes::handle_completions_impl"),
        _u(2.5, SERVER, "server_context_impl::process_single_task"),
        _io("W", 3.0, SERVER, 8, "HTTP/1.1 200 OK"),
        _u(3.1, SERVER, "llama_process"), _u(9.0, SERVER, "common_sampler_sample"),
        _io("W", 9.2, SERVER, 9, "data: {\"index\":0"),  # the other connection's
        _io("W", 9.4, SERVER, 8, "data: {\"index\":0"),
    ]
    alone = [e for e in events if e.fd != 9]  # one client
    assert _alone(alone) == [("server.receive", 1, 1.8), ("runner.admit", 1.8, 3.1),
                             ("runner.prefill", 3.1, 9.0), ("runner.sample", 9.0, 9.4)]
    found = boundaries(events, {SERVER: "server"}, _symbol_keys(), known_fd=8, alone=True)
    assert {key: e.time_ns / MS for key, e in found.items()} == {"R": 1, "RC": 1.8, "PF": 3.1, "SA": 9.0, "RW": 9.4}
    # Without the functions (a binary that exports none), receive to sampling is one phase.
    plain = [e for e in events if e.kind != "U"]
    found = boundaries(plain, {SERVER: "server"}, _symbol_keys(), known_fd=8, alone=True)
    assert set(found) == {"R", "RW"}


def test_the_interrupted_streams_last_decode_is_not_the_next_requests_prefill() -> None:
    """After an interrupt llama-server keeps decoding for the cancelled stream until its next write
    fails; the new request's handler has run by then, but its task waits for the one slot. Its
    prefill is the first batch after the slot took its task (launch_slot_with_task), so the old
    stream's decode and sample count as admission, and the first sample is the new request's.
    (A longer prompt moved client.first_token, not runner.prefill, until this was fixed.)"""
    events = [
        _io("R", 1, SERVER, 8, "POST /completion H"),
        _u(1.8, SERVER, "server_routes::handle_completions_impl"),
        _u(2.4, SERVER, "llama_process"), _u(2.9, SERVER, "common_sampler_sample"),  # the old stream's token
        _io("W", 3.0, SERVER, 7, "data: {\"index\":0"),  # to the old connection: it fails, the slot is freed
        _u(3.4, SERVER, "server_context_impl::launch_slot_with_task"),
        _io("W", 3.5, SERVER, 8, "HTTP/1.1 200 OK"),
        _u(3.6, SERVER, "llama_process"), _u(11.0, SERVER, "common_sampler_sample"),
        _io("W", 11.2, SERVER, 8, "data: {\"index\":0"),
    ]
    assert _alone(events) == [("server.receive", 1, 1.8), ("runner.admit", 1.8, 3.6),
                              ("runner.prefill", 3.6, 11.0), ("runner.sample", 11.0, 11.2)]
    # Without the slot probe (an older build), the first batch after the handler is all there is.
    unslotted = [e for e in events if "launch_slot" not in e.text]
    assert ("runner.prefill", 2.4, 2.9) in _alone(unslotted)


def test_a_binary_named_llama_server_is_the_alone_design_with_its_runner_probes() -> None:
    assert design_of("llama-server", None) == DESIGN_ALONE
    assert design_of("ollama", "0.34.4") == "llama-server" and design_of("ollama", None) == "unknown"
    specs = probes_for_design(DESIGN_ALONE, None)
    assert specs and all(spec.library is not None for spec in specs)
    assert {spec.key for spec in specs} >= {"runner_handler", "decode", "sample"}
