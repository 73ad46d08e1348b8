"""The boundaries of a request on Ollama's llama-server design (v0.30+), from eBPF events.

The server calls its runner, upstream llama.cpp's llama-server, over a new TCP connection per
call (``DisableKeepAlives``): ``GET /health`` (in needsReload), ``POST /tokenize`` (the truncation
check), ``GET /health`` again (inside Completion), then ``POST /completion``, answered as
server-sent events. Each round trip is found on the wire (the server's write of the request and
its read of the answer, on the same connection), so it works on a stripped binary too; the Go
server's uprobes and llama-server's exported functions split the rest.

========  ========================================  ==========================================
boundary  symbol layer                              syscall stand-in
========  ========================================  ==========================================
R         —                                         server reads the client's ``POST``
GH        GenerateHandler / ChatHandler             —
GE        getExistingName                           —
SR        (*Server).scheduleRunner                  —
H1        —                                         server writes ``GET /health``
H1R       —                                         server reads its answer (same connection)
LD        (*Scheduler).load (only on a load)        —
UL        useLoadedRunner                           —
TK        —                                         server writes ``POST /tokenize``
TKR       —                                         server reads its answer (same connection)
CP        (*llamaServerRunner).Completion           —
H2        —                                         server writes ``GET /health`` again
H2R       —                                         server reads its answer (same connection)
RC        server_routes::handle_completions_impl    llama-server reads ``POST /completion``
PF        llama_process (first after RC)            —
SA        common_sampler_sample (first after PF)    —
RW        —                                         llama-server writes its first event
SW        —                                         server writes the response to the client
========  ========================================  ==========================================
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ollama_tracer.collectors.ebpf_events import ProbeEvent, Roles, each_between, latest_first, since, timeline
from ollama_tracer.collectors.ollama_log import LogEvent, LogRecords
from ollama_tracer.vocabulary import (
    LLAMA_SERVER,
    PROCESS_RUNNER,
    PROCESS_SERVER,
    RUNNER_ADMIT,
    RUNNER_PREFILL,
    RUNNER_SAMPLE,
    SERVER_DECODE,
    SERVER_HANDOFF,
    SERVER_MODEL_LOAD,
    SERVER_MODEL_LOOKUP,
    SERVER_RECEIVE,
    SERVER_RUNNER_HEALTH,
    SERVER_RUNNER_WAIT,
    SERVER_SCHEDULE,
    SERVER_STREAM,
    SERVER_TOKENIZE,
)

EAGAIN = -11  # a non-blocking read with nothing to read: not the peer going away

# (key, the phase that starts there, optional, the boundary whose connection it answers)
Rule = tuple[str, "str | None", bool, "str | None"]
BOUNDARIES: tuple[Rule, ...] = (
    ("R", SERVER_RECEIVE, False, None),
    ("GH", SERVER_DECODE, False, None),
    ("GE", SERVER_MODEL_LOOKUP, False, None),
    ("SR", SERVER_SCHEDULE, False, None),
    # needsReload's health check runs only when a runner is loaded: absent on a cold start.
    ("H1", SERVER_RUNNER_HEALTH, True, None),
    ("H1R", SERVER_SCHEDULE, True, "H1"),
    ("LD", SERVER_MODEL_LOAD, True, None),
    ("UL", SERVER_HANDOFF, False, None),
    ("TK", SERVER_TOKENIZE, False, None),
    ("TKR", SERVER_HANDOFF, False, "TK"),
    ("CP", SERVER_RUNNER_WAIT, False, None),
    ("H2", SERVER_RUNNER_HEALTH, False, None),
    ("H2R", SERVER_HANDOFF, False, "H2"),
    ("RC", RUNNER_ADMIT, False, None),
    ("PF", RUNNER_PREFILL, False, None),
    ("SA", RUNNER_SAMPLE, False, None),
    ("RW", SERVER_STREAM, False, None),
    ("SW", None, False, None),
)

# llama-server alone (no Ollama in front): it reads the client's request itself, and its first
# write after the first sampled token is the first event the client gets. The stream to the
# client from there is the client's own first-token phase.
ALONE_BOUNDARIES: tuple[Rule, ...] = (
    ("R", SERVER_RECEIVE, False, None),
    ("RC", RUNNER_ADMIT, False, None),
    ("PF", RUNNER_PREFILL, False, None),
    ("SA", RUNNER_SAMPLE, False, None),
    ("RW", None, False, None),
)

Match = Callable[[ProbeEvent], bool]


def boundaries(window: list[ProbeEvent], roles: Roles, keys: dict[str, tuple[str, ...]],
               known_fd: int | None = None, *, alone: bool = False) -> dict[str, ProbeEvent]:
    """Each boundary's event: the first that matches after the previous boundary's, the symbol
    layer first. An answer must come on the connection its request went out on. ``alone``:
    llama-server without Ollama (``ALONE_BOUNDARIES``), the server and the runner one process."""

    def server(e: ProbeEvent) -> bool:
        return roles.get(e.pid) == PROCESS_SERVER

    def runner(e: ProbeEvent) -> bool:
        return roles.get(e.pid) == (PROCESS_SERVER if alone else PROCESS_RUNNER)

    def probe(key: str, proc: Callable[[ProbeEvent], bool] = server) -> Match:
        symbols = keys.get(key, ())
        return lambda e: e.kind == "U" and e.text in symbols and proc(e)

    def wrote(prefix: str) -> Match:
        return lambda e: server(e) and e.kind == "W" and e.text.startswith(prefix)

    def answer(e: ProbeEvent) -> bool:
        return server(e) and e.kind == "R" and e.value > 0 and e.text.startswith("HTTP")

    rules: dict[str, list[Match]] = {
        "R": [lambda e: server(e) and e.kind == "R" and e.value > 0 and e.text.startswith("POST")],
        "GH": [probe("handler")],
        "GE": [probe("lookup")],
        "SR": [probe("schedule")],
        "H1": [wrote("GET /health")],
        "H1R": [answer],
        "LD": [probe("load")],
        "UL": [probe("acquired")],
        "TK": [wrote("POST /tokenize")],
        "TKR": [answer],
        "CP": [probe("completion")],
        "H2": [wrote("GET /health")],
        "H2R": [answer],
        "RC": [probe("runner_handler", runner),
               lambda e: runner(e) and e.kind == "R" and e.value > 0 and e.text.startswith("POST /completion"),
               wrote("POST /completion")],
        "PF": [probe("decode", runner)],
        "SA": [probe("sample", runner)],
        # Its 200 headers go out when the slot launches, before the prefill: the first event after
        # the first sampled token is the first write after SA.
        "RW": [lambda e: runner(e) and e.kind == "W"],
        "SW": [lambda e: server(e) and e.kind == "W" and e.text.startswith("HTTP")],
    }
    found: dict[str, ProbeEvent] = {}
    after = 0
    client_fd = known_fd
    on_client = ("R", "RW") if alone else ("R", "SW")  # the boundaries on the client's own connection
    if alone:
        rules["RC"] = rules["RC"][:1]  # its handler's probe; no stand-in: the read is R itself
    slot = probe("slot", runner)
    for key, _starts, _optional, answers in ALONE_BOUNDARIES if alone else BOUNDARIES:
        hit: ProbeEvent | None = None
        if key == "PF":
            # The prefill is the first batch after the slot took this request's task: until the
            # interrupted stream's slot is released (its next token's write fails), llama-server
            # still decodes and samples for it, after this request's handler ran. Those are not
            # this request's; without the slot probe, the first batch after the handler is taken.
            launched = next((e for e in window if e.time_ns >= after and slot(e)), None)
            after = launched.time_ns if launched is not None else after
        for rule in rules[key]:
            candidates = [e for e in window if e.time_ns >= after and rule(e)]
            if key in on_client and client_fd is not None:
                candidates = [e for e in candidates if e.fd == client_fd]
            if answers is not None:
                asked = found.get(answers)
                candidates = [e for e in candidates if asked is not None and e.fd == asked.fd and e.pid == asked.pid]
            if candidates:
                hit = candidates[0]
                break
        if hit is None:
            continue
        if key == "LD" and "UL" in found:
            continue
        if key in ("H1", "H1R") and _loads_before(window, after, hit.time_ns, rules["LD"][0]):
            # A cold start: no runner to check, so the first GET /health is WaitUntilRunning's
            # poll of the llama-server being started, after the load began.
            continue
        found[key] = hit
        after = hit.time_ns
        if key == "R":
            client_fd = hit.fd
    return found


def _loads_before(window: list[ProbeEvent], after_ns: int, before_ns: int, load: Match) -> bool:
    return any(after_ns <= e.time_ns < before_ns and load(e) for e in window)


@dataclass
class _Said:
    """llama-server's lines in the log, indexed once per capture: each ``processing task`` line
    (its position among them, and its time), the ``selected slot`` line before each position, and
    per task the last line of each kind."""

    started: list[tuple[int, LogEvent]]
    started_times: list[int]
    last_selected: list[LogEvent | None]
    facts: dict[str, dict[str, dict[str, str]]]


def _llama_server_lines(log: LogRecords) -> _Said:
    if "llama_server" not in log.derived:
        lines = [e for e in log.events if e.source == LLAMA_SERVER]
        started = [(i, e) for i, e in enumerate(lines) if e.msg == "processing task"]
        last_selected: list[LogEvent | None] = []
        chosen: LogEvent | None = None
        facts: dict[str, dict[str, dict[str, str]]] = {}
        for line in lines:
            last_selected.append(chosen)  # the one before this line
            if line.msg == "selected slot":
                chosen = line
            if line.attrs.get("task") is not None:
                facts.setdefault(line.attrs["task"], {})[line.msg] = line.attrs
        log.derived["llama_server"] = _Said(started, [e.time_ns for _, e in started], last_selected, facts)
    return log.derived["llama_server"]  # type: ignore[no-any-return]


def what_it_said(log: LogRecords | None, read: ProbeEvent | None, answered: ProbeEvent | None
                 ) -> dict[str, dict[str, Any]]:
    """llama-server's own lines about this request's task, by the phase they describe: the slot it
    chose and how (``runner.admit``), the prompt tokens it took from its cache and the ones it
    evaluated, and its own prompt-eval timing (``runner.prefill``). Its lines have no time, so the
    task is the one it started to process between the request's read and its first answer."""
    if log is None or read is None or answered is None:
        return {}
    said = _llama_server_lines(log)
    # the last task it started to process in [read, answered]
    i = bisect.bisect_right(said.started_times, answered.time_ns) - 1
    if i < 0 or said.started_times[i] < read.time_ns:
        return {}
    position, started = said.started[i]
    task = started.attrs["task"]
    chosen = said.last_selected[position]
    facts = said.facts.get(task, {})
    admit: dict[str, Any] = {"runner_slot": int(started.attrs["slot"]), "runner_task": int(task),
                             "runner_log": "llama-server's lines: what it did, not when"}
    if chosen is not None:
        admit["slot_selected_by"] = chosen.attrs.get("by")
    prefill: dict[str, Any] = {}
    if "new prompt" in facts:
        prompt = int(facts["new prompt"]["prompt_tokens"])
        cached = int(facts.get("cached tokens", {}).get("cached_tokens", 0))
        prefill.update({"prompt_tokens": prompt, "cached_tokens": cached, "evaluated_tokens": prompt - cached})
    if "prompt eval time" in facts:
        prefill["runner_prompt_eval_ms"] = float(facts["prompt eval time"]["prompt_eval_ms"])
    return {RUNNER_ADMIT: admit, **({RUNNER_PREFILL: prefill} if prefill else {})}


def completion_closed(events: list[ProbeEvent], roles: Roles, eof: ProbeEvent) -> ProbeEvent | None:
    """llama-server reading EOF on the interrupted request's own ``/completion`` connection, after
    the server read the client's EOF ``eof``: the end of ``server.cancel`` on this design.

    The connection is followed by its bytes, not by time alone: the last ``POST /completion`` the
    server wrote before ``eof`` (alone in the server, that is the interrupted request's), and the
    read of that many bytes of ``POST /completion`` by llama-server right after it, whose socket it
    is. (llama-server accepts without asking for the peer's address, so the port cannot link them.)
    Any link missing: None, never another connection's close (each ``/health`` and ``/tokenize``
    call also closes one).
    """
    posted = next((e for e in latest_first(timeline(events).of_kind("W"), eof.time_ns)
                   if e.pid == eof.pid and e.text.startswith("POST /completion")), None)
    if posted is None:
        return None
    read = next((e for e in each_between(timeline(events).of_kind("R"), posted.time_ns, eof.time_ns)
                 if roles.get(e.pid) == PROCESS_RUNNER and e.value == posted.value
                 and e.text.startswith("POST /completion")), None)
    if read is None:
        return None
    return next((e for e in since(timeline(events).of_kind("R"), eof.time_ns) if e.pid == read.pid
                 and e.fd == read.fd and (e.value == 0 or (e.value < 0 and e.value != EAGAIN))), None)
