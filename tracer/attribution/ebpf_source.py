"""Phases from the eBPF collector's events: the inside of the server and the runner.

A request's boundaries are found in order, each the first matching event after the previous
one, so Go's double entry hits (stack growth re-enters a function) and earlier requests'
events never confuse them. Each boundary has a symbol-layer event (a catalogue uprobe) and,
where one exists, a syscall-layer stand-in that works on stripped binaries:

========  ==================================  ===========================================
boundary  symbol layer                        syscall stand-in
========  ==================================  ===========================================
R         —                                   server reads the request ("POST")
GH        GenerateHandler / ChatHandler       —
GE        getExistingName                     —
NR        (*runnerRef).needsReload            server writes the /health ping ("GET ")
LD        (*Scheduler).load (only on a load)  —
UL        useLoadedRunner                     —
CP        (*llmServer).Completion             —
H2        —                                   server writes Completion's GET /health
                                              (after its semaphore: the wait for a slot)
H2R       —                                   server reads that health check's answer
RC        runner (*Server).completion         runner reads the POST /completion (or the
                                              server writes it: the same loopback hop)
LC        (*InputCache).LoadCacheSlot         —
SA        Sampler.Sample (first after LC)     —
RW        —                                   runner writes its first response bytes
SW        —                                   server writes the response to the client
========  ==================================  ===========================================

A missing boundary merges the phases on either side into one named phase
(``server.receive+decode+model_lookup``), never a guess. ``server.cancel`` (the interrupted
request's teardown: the server reads EOF → the runner removes the sequence) is off the
critical path and reported beside the interval.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ollama_tracer.attribution import ebpf_llama_server, model_loads
from ollama_tracer.attribution.ebpf_in_process import in_process_phases
from ollama_tracer.attribution.forwarder import forwarder_phases
from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.attribution.overlaps import Overlaps, Span
from ollama_tracer.attribution.request_chain import Broken, Chain, other_sequences, own_events, resolve
from ollama_tracer.attribution.sources import Found
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.collectors.ebpf_events import (
    EbpfRecords,
    ProbeEvent,
    Roles,
    between,
    each_between,
    latest_first,
    timeline,
)
from ollama_tracer.collectors.ollama_log import LogRecords
from ollama_tracer.collectors.probe_catalogue import DESIGN_ALONE
from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import (
    CLIENT_FIRST_TOKEN,
    DESIGN_IN_PROCESS,
    DESIGN_LLAMA_SERVER,
    FORWARDER_REQUEST,
    FORWARDER_RESPONSE,
    PROCESS_RUNNER,
    PROCESS_SERVER,
    RUNNER_ADMIT,
    RUNNER_PREFILL,
    RUNNER_SAMPLE,
    SERVER_CANCEL,
    SERVER_DECODE,
    SERVER_FD,
    SERVER_HANDOFF,
    SERVER_MODEL_LOAD,
    SERVER_MODEL_LOOKUP,
    SERVER_RECEIVE,
    SERVER_RUNNER_HEALTH,
    SERVER_RUNNER_WAIT,
    SERVER_SCHEDULE,
    SERVER_STREAM,
    SOURCE_EBPF,
    TRACER_FIRST_TOKEN_NS,
    TRACER_LOCAL_PORT,
    TRACER_REQUEST_WRITTEN_NS,
    merged_name,
    process_prefix,
)

SOURCE = SOURCE_EBPF
BLOB_MARKER = "/blobs/sha256-"
CANCEL_LIMIT_NS = 5_000_000_000  # a teardown noticed later than this after the EOF is not this interrupt's

Match = Callable[[ProbeEvent], bool]


@dataclass(frozen=True)
class Boundary:
    key: str
    starts: str | None  # the phase that starts here (None: the end of the last phase)
    optional: bool = False  # absent means "did not happen" (no merge), e.g. a model load


BOUNDARIES: tuple[Boundary, ...] = (
    Boundary("R", SERVER_RECEIVE),
    Boundary("GH", SERVER_DECODE),
    Boundary("GE", SERVER_MODEL_LOOKUP),
    Boundary("NR", SERVER_SCHEDULE),
    Boundary("LD", SERVER_MODEL_LOAD, optional=True),
    Boundary("UL", SERVER_HANDOFF),
    # llmServer.Completion: the server's own per-runner semaphore (weight OLLAMA_NUM_PARALLEL),
    # held by an interrupted request until the server has seen it go, then a GET /health.
    Boundary("CP", SERVER_RUNNER_WAIT),
    Boundary("H2", SERVER_RUNNER_HEALTH),
    Boundary("H2R", SERVER_HANDOFF),
    Boundary("RC", RUNNER_ADMIT),
    Boundary("LC", RUNNER_PREFILL),
    Boundary("SA", RUNNER_SAMPLE),
    Boundary("RW", SERVER_STREAM),
    Boundary("SW", None),
)
LLAMA_SERVER_BOUNDARIES: tuple[Boundary, ...] = tuple(
    Boundary(key, starts, optional) for key, starts, optional, _answers in ebpf_llama_server.BOUNDARIES)
ALONE_BOUNDARIES: tuple[Boundary, ...] = tuple(
    Boundary(key, starts, optional) for key, starts, optional, _answers in ebpf_llama_server.ALONE_BOUNDARIES)


def capture_design(meta: dict[str, Any] | None) -> str | None:
    return ((meta or {}).get("plan") or {}).get("design")


def _on_llama_server(meta: dict[str, Any] | None) -> bool:
    """Ollama's llama-server design, or llama-server alone: the boundaries of ebpf_llama_server."""
    return capture_design(meta) in (DESIGN_LLAMA_SERVER, DESIGN_ALONE)


def _written(interval: Interval) -> int | None:
    """When the client finished writing the request, if its span says."""
    value = interval.request.get("attributes", {}).get(TRACER_REQUEST_WRITTEN_NS)
    return int(value) if value else None


def connection_of(request: dict[str, Any], events: list[ProbeEvent], roles: Roles) -> int | None:
    """The server's fd of the request's client connection, by the TCP 4-tuple: the client's
    local port (recorded by the instrumentation or the proxy) is the peer port the server's
    accept saw. None when it is not known (a connection accepted before the capture)."""
    attributes = request.get("attributes", {})
    if attributes.get(SERVER_FD) is not None:  # a request the server side itself recorded (attach)
        return int(attributes[SERVER_FD])
    port = attributes.get(TRACER_LOCAL_PORT)
    if not port:
        return None
    # A new connection is accepted after the request was built (the client connects then); a
    # pooled one long before. Either way, before the response began: the latest such accept.
    answered = int(attributes.get(TRACER_FIRST_TOKEN_NS) or request["endTimeUnixNano"])
    accepted = next((e for e in latest_first(timeline(events).of_kind("A"), answered)
                     if e.value == int(port) and roles.get(e.pid) == PROCESS_SERVER), None)
    return accepted.fd if accepted is not None else None


def concurrent_requests(events: list[ProbeEvent], roles: Roles, found: dict[str, ProbeEvent]) -> int:
    """How many other client requests were between their read and their first response write
    while this one was (R..SW): then the boundaries in between belong to either. The server reads
    ``POST`` only from clients and writes ``HTTP`` only to them (it writes requests to runners),
    so no fd bookkeeping is needed, and reused fd numbers cannot confuse it."""
    if "R" not in found or "SW" not in found:
        return 0
    ours, start, end = found["R"].fd, found["R"].time_ns, found["SW"].time_ns
    overlapping = set()
    for span in _server_requests(events, roles).reaching(start, end):
        if span.key[1] == ours:
            continue
        if span.end_ns is None or span.end_ns > end or span.ended == ANSWERED:  # in flight at our answer, or
            overlapping.add(span.key)  # answered after our read
    return len(overlapping)


ANSWERED, LEFT, REPLACED = "answered", "left", "replaced"


def _server_requests(events: list[ProbeEvent], roles: Roles) -> Overlaps:
    """Every client request the server read, once per capture: its ``POST`` read → its first
    response write (answered), the client leaving before any answer (left), or the next ``POST``
    read on that connection (replaced: the earlier one's end was not seen)."""
    line = timeline(events)

    def build() -> Overlaps:
        pending: dict[tuple[int, int], int] = {}  # connection -> its POST read time
        spans = []
        for e in line:
            if roles.get(e.pid) != PROCESS_SERVER:
                continue
            key = (e.pid, e.fd)
            if e.kind == "R" and e.value > 0 and e.text.startswith("POST"):
                if key in pending:
                    spans.append(Span(key, pending[key], e.time_ns, REPLACED))
                pending[key] = e.time_ns
            elif e.kind == "W" and e.text.startswith("HTTP") and key in pending:
                spans.append(Span(key, pending.pop(key), e.time_ns, ANSWERED))
            elif e.kind in "RX" and key in pending and e.value <= 0:
                spans.append(Span(key, pending.pop(key), e.time_ns, LEFT))
        spans.extend(Span(key, read_at, None) for key, read_at in pending.items())
        return Overlaps(spans)

    return line.once("server_requests", build, roles)


def unknown_connection_others(window: list[ProbeEvent], roles: Roles, client_fd: int | None) -> int:
    """With the client's connection unknown (a proxy or relay in between, whose connection the
    server accepted, or no local port recorded), the first request read in the interval may be
    another client's: how many other requests the server read in it (0 when the connection is
    known, or only one request arrived)."""
    if client_fd is not None:
        return 0
    posts = sum(1 for e in window if e.kind == "R" and e.value > 0 and e.text.startswith("POST")
                and roles.get(e.pid) == PROCESS_SERVER)
    return max(0, posts - 1)


class EbpfSource:
    name = SOURCE
    rank = 10

    def phases(self, interval: Interval, records: CaptureRecords) -> list[Phase]:
        return self.find(interval, records).phases

    def find(self, interval: Interval, records: CaptureRecords) -> Found:
        ebpf = records.get(EbpfRecords)
        if ebpf is None or not ebpf.events:
            return Found([])
        events, roles = ebpf.events, ebpf.roles
        built = int(interval.request["startTimeUnixNano"])
        window = between(events, built, interval.end_ns)
        client_fd = connection_of(interval.request, events, roles)
        if capture_design(ebpf.meta) == DESIGN_IN_PROCESS:
            return Found(*in_process_phases(interval, ebpf))
        if _on_llama_server(ebpf.meta):
            return self._find_llama_server(interval, ebpf, window, client_fd, records.get(LogRecords))
        found = self._boundaries(window, roles, client_fd)
        seen = dict(found)  # before any hit is set aside as another request's or sequence's
        matching: dict[str, Any] = {"matched": 0, "matched_by_chain": 0, "unmatched": []}
        others = concurrent_requests(events, roles, found) or unknown_connection_others(window, roles, client_fd)
        chain: Chain | None = None
        try:
            # Follow the request by identity (connection, goroutine, runner connection) when the
            # goroutine layer allows; when another request was inside the server at the same time,
            # that is the only way: the first event after a boundary may be the other's, and
            # time order is never used to pick.
            if client_fd is None and others:
                raise Broken("its client connection is unknown (a proxy or relay in between, or the client "
                             "recorded no local port), and another request reached the server meanwhile")
            chain = self._chain(events, roles, found, interval, ebpf.meta)
        except Broken as why:
            if others:
                matching["unmatched"].append({"interval": interval.index, "concurrent_requests": others,
                                              "connection_matched": client_fd is not None, "reason": str(why)})
                return Found([], matching)
            # Alone in the server: the first event after each boundary is this request's own.
        whole_window = window
        sequences = 0
        shared_until: int | None = None
        if chain is not None:
            # Shared goroutines: the runner's batch loop samples every sequence of that runner, the
            # server's scheduler loads runners for whichever request is pending. Their hits are this
            # request's only when nothing else was in flight there (then the first after each
            # boundary, as without a chain).
            shared = other_sequences(events, chain, found["R"].time_ns, interval.end_ns)
            per_token = set(_symbol_keys()["sample"]) | set(_symbol_keys()["decode"]) if shared else set()
            # The cancelled sequence often leaves the runner after this request's POST arrived but
            # before its prefill: from then on the per-token probes are this request's again.
            shared_until = max((end for _, end in shared), default=None)
            window = own_events(window, chain, per_token, keep_shared_server=not others,
                                keep_shared_runner=not shared, runner_shared_until_ns=shared_until)
            found = self._boundaries(window, roles, chain.client_fd)
            # What is reported: the sequences still in the runner once this one was admitted, the
            # ones that could take its per-token boundaries.
            admission = found.get("LC") or found.get("RC")
            admitted = admission.time_ns if admission is not None else interval.start_ns
            sequences = sum(1 for _, end in shared if end > admitted)
            matching["matched_by_chain"] += 1
        if found:
            matching["matched"] += 1
        phases = self._phases(found)
        matching["missing"] = _missing(interval, found, seen, BOUNDARIES, shared_until,
                                       int(ebpf.meta.get("bpftrace_lost_events") or 0))
        if "LD" in found:
            # needsReload ran first: a runner was loaded but unusable for this request (different
            # options such as num_ctx, or a failed health check). Otherwise nothing was loaded.
            reloaded = "NR" in found and found["NR"].text not in _symbol_keys()["get_runner"]
            if reloaded and not others:
                reloaded = model_loads.scheduler_replaced(whole_window, roles, _symbol_keys()["needs_reload"],
                                                          found["LD"].time_ns) is not False
            load_facts = model_loads.load_reason(ebpf, found["LD"].time_ns, interval.end_ns, reloaded=reloaded)
            phases = [Phase(p.name, p.start_ns, p.end_ns, p.source, p.process, {**p.attributes, **load_facts})
                      if "model_load" in p.name else p for p in phases]
        if not others:  # alone in the server: every open of the model blob in the window is this request's
            evidence = blob_scans(whole_window, roles, found.get("R"), found.get("SW"),
                                  set(ebpf.meta.get("model_blobs", [])))
        else:  # other requests' file opens interleave; count this handler goroutine's gguf.Open calls
            evidence = {"gguf_scans": _entries(window, _symbol_keys()["gguf_open"])}
        if chain is not None:
            evidence.update({"matched_by": "chain", "concurrent_requests": others, "concurrent_sequences": sequences,
                             **chain.to_json()})
        evidence.update(_probe_counts(window, found))
        if phases:
            for i, phase in enumerate(phases):
                if "model_lookup" in phase.name:
                    phases[i] = Phase(phase.name, phase.start_ns, phase.end_ns, phase.source, phase.process,
                                      {**phase.attributes, **evidence})
        cancel = self._cancel(events, roles, interval, concurrent=bool(others), meta=ebpf.meta)
        if cancel is not None:
            phases.append(cancel)
        hops_why: list[tuple[str, str]] = []
        phases.extend(forwarder_phases(events, roles, found.get("R"), found.get("SW"), built, _written(interval),
                                       hops_why))
        matching["missing"].extend(_forwarder_missing(interval, hops_why, ebpf.meta))
        return Found(phases, matching)

    def _find_llama_server(self, interval: Interval, ebpf: EbpfRecords, window: list[ProbeEvent],
                           client_fd: int | None, records_log: LogRecords | None = None) -> Found:
        """Ollama v0.30+: the round trips to llama-server, found on the wire, and its exported functions.
        llama-server alone: its own read of the request, its functions, and its first write."""
        alone = capture_design(ebpf.meta) == DESIGN_ALONE
        order = ALONE_BOUNDARIES if alone else LLAMA_SERVER_BOUNDARIES
        found = ebpf_llama_server.boundaries(window, ebpf.roles, _symbol_keys(), client_fd, alone=alone)
        matching: dict[str, Any] = {"matched": 0, "matched_by_chain": 0, "unmatched": []}
        others = (concurrent_requests(ebpf.events, ebpf.roles, found)
                  or unknown_connection_others(window, ebpf.roles, client_fd))
        if others:
            # The first event after a boundary may be the other request's: no guess is made.
            matching["unmatched"].append({
                "interval": interval.index, "concurrent_requests": others, "connection_matched": client_fd is not None,
                "reason": "another request was in the server at the same time, and on the llama-server design "
                          "requests are not followed by goroutine and connection yet" if client_fd is not None else
                          "its client connection is unknown (a proxy or relay in between, or the client recorded no "
                          "local port), and another request reached the server meanwhile"})
            return Found([], matching)
        if found:
            matching["matched"] += 1
        phases = self._phases(found, order)
        why: list[tuple[str, str]] = []
        hops = forwarder_phases(ebpf.events, ebpf.roles, found.get("R"), found.get("SW"),
                                int(interval.request["startTimeUnixNano"]), _written(interval), why)
        if alone:
            phases = _alone_edges(phases, found, interval, hops)
        matching["missing"] = _missing(interval, found, found, order, None,
                                       int(ebpf.meta.get("bpftrace_lost_events") or 0))
        matching["missing"].extend(_forwarder_missing(interval, why, ebpf.meta))
        evidence = blob_scans(window, ebpf.roles, found.get("R"), found.get("SW") or found.get("RW"),
                              set(ebpf.meta.get("model_blobs", [])))
        evidence.update(_probe_counts(window, found))
        # A reload: needsReload ran (it asks llama-server's /health first unless the options alone
        # decide) before the load; a cold load has no runner to ask.
        replaced = (model_loads.scheduler_replaced(window, ebpf.roles, _symbol_keys()["needs_reload"],
                                                   found["LD"].time_ns) if "LD" in found else None)
        load_facts = (model_loads.load_reason(ebpf, found["LD"].time_ns, interval.end_ns,
                                              reloaded=replaced if replaced is not None else "H1" in found)
                      if "LD" in found else {"reason": model_loads.COLD})
        said = ebpf_llama_server.what_it_said(records_log, found.get("R"), found.get("SW"))
        out = []
        for phase in phases:
            extra: dict[str, Any] = {}
            if SERVER_MODEL_LOOKUP in phase.name.split("+") or phase.name.startswith(SERVER_MODEL_LOOKUP):
                extra = evidence
            if SERVER_MODEL_LOAD.split(".", 1)[1] in phase.name:
                extra = load_facts
            for part, facts in said.items():  # llama-server's own account, attached where it belongs
                if part in phase.name:
                    extra = {**extra, **facts}
            out.append(Phase(phase.name, phase.start_ns, phase.end_ns, phase.source, phase.process,
                             {**phase.attributes, **extra}) if extra else phase)
        # The interrupted request's teardown: the server reads the client's EOF, then llama-server
        # sees Ollama close that request's /completion connection.
        cancel = self._cancel(ebpf.events, ebpf.roles, interval, meta=ebpf.meta)
        if cancel is not None:
            out.append(cancel)
        out.extend(hops)
        return Found(out, matching)

    def last_boundary(self, interval: Interval, records: CaptureRecords) -> tuple[Boundary, ProbeEvent] | None:
        """How far a request that never got its first token came: the last boundary the server
        (and runner) reached inside ``interval``, and its event. None without eBPF events, or when
        another request was in the server at the same time (whose events are whose is unknown)."""
        ebpf = records.get(EbpfRecords)
        if ebpf is None or not ebpf.events:
            return None
        built = int(interval.request["startTimeUnixNano"])
        window = between(ebpf.events, built, interval.end_ns)
        client_fd = connection_of(interval.request, ebpf.events, ebpf.roles)
        if _on_llama_server(ebpf.meta):
            alone = capture_design(ebpf.meta) == DESIGN_ALONE
            found = ebpf_llama_server.boundaries(window, ebpf.roles, _symbol_keys(), client_fd, alone=alone)
            order = ALONE_BOUNDARIES if alone else LLAMA_SERVER_BOUNDARIES
        else:
            found, order = self._boundaries(window, ebpf.roles, client_fd), BOUNDARIES
        if not found or "R" not in found:
            return None
        # Until the client gave up, as if answered then: another request inside the server
        # meanwhile makes the boundaries ambiguous.
        until = found.get("SW") or ProbeEvent("W", interval.end_ns, found["R"].pid, 0, found["R"].fd, 0, "HTTP")
        if (concurrent_requests(ebpf.events, ebpf.roles, {**found, "SW": until})
                or unknown_connection_others(window, ebpf.roles, client_fd)):
            return None
        last = max((b for b in order if b.key in found), key=lambda b: found[b.key].time_ns)
        return last, found[last.key]

    @staticmethod
    def _chain(events: list[ProbeEvent], roles: Roles, found: dict[str, ProbeEvent], interval: Interval,
               meta: dict[str, Any]) -> Chain:
        if not (meta.get("plan") or {}).get("goroutines", {}).get("on"):
            note = (meta.get("plan") or {}).get("goroutines", {}).get("note", "off")
            raise Broken(f"the goroutine layer is {note.removeprefix('off: ') if note.startswith('off') else note}")
        if "R" not in found:
            raise Broken("its request read on the server was not seen")
        return resolve(events, roles, found["R"], interval.end_ns, _symbol_keys()["completion"],
                       meta.get("sockets_at_start") or [])

    @staticmethod
    def _boundaries(window: list[ProbeEvent], roles: Roles,
                    known_fd: int | None = None) -> dict[str, ProbeEvent]:
        def server(e: ProbeEvent) -> bool:
            return roles.get(e.pid) == PROCESS_SERVER

        def runner(e: ProbeEvent) -> bool:
            return roles.get(e.pid) == PROCESS_RUNNER

        def probe(*keys: str, proc: Callable[[ProbeEvent], bool] = server) -> Match:
            return lambda e: e.kind == "U" and e.text in keys and proc(e)

        keys = _symbol_keys()
        found: dict[str, ProbeEvent] = {}  # filled in below, in order; H2R's rule reads H2 from it
        rules: dict[str, list[Match]] = {
            "R": [lambda e: server(e) and e.kind == "R" and e.value > 0 and e.text.startswith("POST")],
            "GH": [probe(*keys["handler"])],
            "GE": [probe(*keys["lookup"])],
            "NR": [probe(*keys["needs_reload"]),
                   lambda e: server(e) and e.kind == "W" and e.text.startswith("GET ")],
            "LD": [probe(*keys["load"])],
            "UL": [probe(*keys["acquired"])],
            "CP": [probe(*keys["completion"])],
            "H2": [lambda e: server(e) and e.kind == "W" and e.text.startswith("GET ")],
            "H2R": [lambda e: server(e) and e.kind == "R" and e.value > 0 and e.text.startswith("HTTP")
                    and "H2" in found and (e.pid, e.fd) == (found["H2"].pid, found["H2"].fd)],
            "RC": [probe(*keys["runner_handler"], proc=runner),
                   lambda e: runner(e) and e.kind == "R" and e.value > 0 and e.text.startswith("POST"),
                   # the other end of the same hop, sub-millisecond earlier on loopback
                   lambda e: server(e) and e.kind == "W" and e.text.startswith("POST")],
            "LC": [probe(*keys["cache_slot"], proc=runner)],
            "SA": [probe(*keys["sample"], proc=runner)],
            "RW": [lambda e: runner(e) and e.kind == "W" and e.text.startswith("HTTP")],
            "SW": [lambda e: server(e) and e.kind == "W" and e.text.startswith("HTTP")],
        }
        after = 0
        client_fd: int | None = None
        for boundary in BOUNDARIES:
            hit: ProbeEvent | None = None
            for rule in rules[boundary.key]:  # the symbol layer first; the syscall stand-in if absent
                # (an event is one boundary at most: the needsReload ping is not Completion's)
                candidates = [e for e in window if e.time_ns >= after and rule(e)
                              and not any(e is used for used in found.values())]
                fd = client_fd if client_fd is not None else known_fd
                if boundary.key in ("R", "SW") and fd is not None:
                    candidates = [e for e in candidates if e.fd == fd]
                if candidates:
                    hit = candidates[0]
                    break
            if hit is None:
                continue
            if boundary.key == "LD" and "UL" in found:
                continue
            if boundary.key == "NR":
                load = next((e for e in window if after <= e.time_ns < hit.time_ns and rules["LD"][0](e)), None)
                if load is not None:
                    # A cold start: no loaded runner to check, so that GET /health was the new
                    # runner's start-up poll, after the load began. The schedule then starts
                    # where GetRunner was called, if that was seen.
                    get_runner = probe(*keys["get_runner"])
                    hit = next((e for e in window if after <= e.time_ns < load.time_ns and get_runner(e)), None)
                    if hit is None:
                        continue
            found[boundary.key] = hit
            after = hit.time_ns
            if boundary.key == "R":
                client_fd = hit.fd
        return found

    @staticmethod
    def _phases(found: dict[str, ProbeEvent], boundaries: tuple[Boundary, ...] = BOUNDARIES) -> list[Phase]:
        present = [b for b in boundaries if b.key in found]
        if len(present) < 2:
            return []
        phases = []
        pending: list[str] = []
        index = {b.key: i for i, b in enumerate(boundaries)}
        for here, nxt in itertools.pairwise(present):
            names = [b.starts for b in boundaries[index[here.key]:index[nxt.key]]
                     if b.starts is not None and (not b.optional or b.key in found)]
            names = pending + names
            pending = []
            start, end = found[here.key].time_ns, found[nxt.key].time_ns
            if not names:
                continue
            name = merged_name(names)
            process = PROCESS_RUNNER if name.startswith(process_prefix(PROCESS_RUNNER)) else PROCESS_SERVER
            phases.append(Phase(name, start, end, SOURCE, process,
                                {"from": here.key, "to": nxt.key} if len(names) > 1 else {}))
        return phases

    @staticmethod
    def _cancel(events: list[ProbeEvent], roles: Roles, interval: Interval, *, concurrent: bool = False,
                meta: dict[str, Any] | None = None) -> Phase | None:
        if interval.kind != "interrupt":
            return None
        start_window = interval.start_ns - 50_000_000
        # Off the critical path, the teardown may be noticed after the next first token (a llama
        # interval lasts ~10 ms): look up to a second past the interval's end.
        until = interval.end_ns + 1_000_000_000
        cancelled_fd = connection_of(interval.cancelled, events, roles) if interval.cancelled else None
        if concurrent and cancelled_fd is None:
            return None  # whose EOF is whose cannot be told apart
        eof = next((e for e in each_between(events, start_window, until) if roles.get(e.pid) == PROCESS_SERVER
                    and e.kind == "R" and _peer_gone(e) and (cancelled_fd is None or e.fd == cancelled_fd)), None)
        if eof is None:
            return None
        keys = _symbol_keys()
        if capture_design(meta) == DESIGN_ALONE:
            return None  # llama-server alone tears a request down inside its main loop: not followed yet
        if capture_design(meta) == DESIGN_LLAMA_SERVER:
            removed = ebpf_llama_server.completion_closed(events, roles, eof)
            end_note = "llama-server saw the request's /completion connection close"
        elif concurrent and interval.cancelled is not None:
            # The runner removes sequences on its batch goroutine, shared by all: follow the
            # cancelled request's own runner connection instead, and time its close there.
            try:
                read = next(e for e in each_between(events, int(interval.cancelled["startTimeUnixNano"]), eof.time_ns)
                            if e.kind == "R" and e.pid == eof.pid and e.fd == eof.fd
                            and e.value > 0 and e.text.startswith("POST"))
                chain = resolve(events, roles, read, eof.time_ns, keys["completion"],
                                (meta or {}).get("sockets_at_start") or [])
            except (StopIteration, Broken):
                return None
            removed = next((e for e in each_between(events, eof.time_ns, eof.time_ns + CANCEL_LIMIT_NS)
                            if e.pid == chain.runner_pid and e.fd == chain.runner_fd and e.kind == "R"
                            and _peer_gone(e)), None)
            end_note = "runner saw the connection close"
        else:
            removed = next((e for e in each_between(events, eof.time_ns, eof.time_ns + CANCEL_LIMIT_NS)
                            if e.kind == "U"
                            and e.text in keys["remove_sequence"] and roles.get(e.pid) == PROCESS_RUNNER), None)
            end_note = "runner removed the sequence"
            if removed is None:
                removed = next((e for e in each_between(events, eof.time_ns, eof.time_ns + CANCEL_LIMIT_NS)
                                if roles.get(e.pid) == PROCESS_RUNNER
                                and e.kind == "R" and _peer_gone(e)), None)
                end_note = "runner saw the connection close"
        if removed is None or removed.time_ns - eof.time_ns > CANCEL_LIMIT_NS:
            return None
        return Phase(SERVER_CANCEL, eof.time_ns, removed.time_ns, SOURCE, PROCESS_SERVER,
                     {"off_critical_path": True, "end": end_note})


def _alone_edges(phases: list[Phase], found: dict[str, ProbeEvent], interval: Interval,
                 hops: list[Phase]) -> list[Phase]:
    """llama-server alone, at its two edges with the client, on the client's clock (the same host):
    its receive starts when the client (or a forwarder in between) had written the request (the
    bytes wait in its socket until an HTTP thread of its pool reads them: its own queue), and its
    first event, written at RW, is in flight (``server.stream``) until the client reads it (the
    start of ``client.first_token``), or a forwarder in between does."""
    out = list(phases)
    forwarded = [p for p in hops if p.name == FORWARDER_REQUEST]
    written = max(p.end_ns for p in forwarded) if forwarded else _written(interval)
    if out and "R" in found and out[0].name.startswith(SERVER_RECEIVE) and written is not None \
            and out[0].start_ns > written >= int(interval.request["startTimeUnixNano"]):
        first = out[0]
        out[0] = Phase(first.name, written, first.end_ns, first.source, first.process,
                       {**first.attributes, "from": "the client's end of writing the request (it waited in the "
                                                    "server's socket until an HTTP thread read it)"})
    read = next((int(c["startTimeUnixNano"]) for c in interval.children if c.get("name") == CLIENT_FIRST_TOKEN), None)
    relayed = [p.start_ns for p in hops if p.name == FORWARDER_RESPONSE]
    if relayed:
        read = min(relayed)
    if "RW" in found and read is not None and read > found["RW"].time_ns:
        out.append(Phase(SERVER_STREAM, found["RW"].time_ns, read, SOURCE, PROCESS_SERVER,
                         {"to": "the client's first read of the answer"}))
    return out


def _forwarder_missing(interval: Interval, why: list[tuple[str, str]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The forwarder's hops left out of ``interval``, and why (``why``: what forwarder_phases said)."""
    lost = int(meta.get("bpftrace_lost_events") or 0)
    tail = f" (bpftrace lost {lost} events in this capture: it may be among them)" if lost else ""
    return [{"interval": interval.index, "boundary": "forwarder", "phase": phase, "why": reason + tail}
            for phase, reason in why]


def _missing(interval: Interval, found: dict[str, ProbeEvent], seen: dict[str, ProbeEvent],
             boundaries: tuple[Boundary, ...], shared_until_ns: int | None, lost: int = 0) -> list[dict[str, Any]]:
    """Each boundary that should have been found in this interval and was not, and why: its
    neighbours then merge (``a+b``). ``seen``: the boundaries before hits were set aside as another
    request's or sequence's; ``shared_until_ns``: until when another sequence shared the runner."""
    if len(found) < 2:
        return []  # the request was not seen at all: counted as unmatched, not as missing boundaries
    out = []
    for boundary in boundaries:
        if boundary.optional or boundary.key in found or boundary.starts is None:
            continue
        if boundary.key == "UL" and "LD" in found:
            continue  # a runner just loaded is handed over without useLoadedRunner: load+handoff, expected
        if boundary.key in seen:
            why = ("its hit was set aside: another sequence was in the runner's batch until "
                   f"{(shared_until_ns or 0) / 1e6 - interval.start_ns / 1e6:.2f} ms into the interval, so a "
                   "per-token hit before then may be that sequence's" if shared_until_ns else
                   "its hit was set aside as another request's")
        else:
            why = "no hit of its probe or syscall stand-in after the boundary before it"
            if lost:
                why += f" (bpftrace lost {lost} events in this capture: it may be among them)"
        out.append({"interval": interval.index, "boundary": boundary.key, "phase": boundary.starts, "why": why})
    return out


def _entries(window: list[ProbeEvent], symbols: tuple[str, ...]) -> int:
    """Calls of these functions in the window; Go's stack-growth prologue re-enters a function
    from its first instruction, so a hit on the same goroutine within 50 µs is the same call."""
    calls, last = 0, dict[int, int]()
    for e in window:
        if e.kind == "U" and e.text in symbols:
            if e.time_ns - last.get(e.goid, -10**12) > 50_000:
                calls += 1
            last[e.goid] = e.time_ns
    return calls


def blob_scans(window: list[ProbeEvent], roles: Roles, start: ProbeEvent | None,
               end: ProbeEvent | None, model_blobs: set[str] | None = None) -> dict[str, Any]:
    """Opens of the model's GGUF blob by the server during the request (``blob_opens``; the blob
    a runner was started with, or failing that the one opened most often), and of its other
    blobs (``other_blob_opens``: the small config and template layers, read on every request by
    every version). Each open of the GGUF blob is one metadata scan: v0.13 calls ``gguf.Open`` from
    ``Capabilities()`` three times per request; v0.34 reads its metadata sidecar instead."""
    if start is None:
        return {"blob_opens": 0, "other_blob_opens": 0, "gguf_scans": 0}
    stop = end.time_ns if end is not None else window[-1].time_ns if window else start.time_ns
    opened: dict[tuple[int, int], ProbeEvent] = {}
    opens: dict[str, int] = {}
    reads: list[tuple[str, int, int]] = []  # (path, open ns, close ns)
    for e in window:
        if not (start.time_ns <= e.time_ns <= stop) or roles.get(e.pid) != PROCESS_SERVER:
            continue
        if e.kind == "O" and BLOB_MARKER in e.text and e.fd >= 0:
            opens[e.text] = opens.get(e.text, 0) + 1
            opened[(e.pid, e.fd)] = e
        elif e.kind == "X" and (e.pid, e.fd) in opened:
            o = opened.pop((e.pid, e.fd))
            reads.append((o.text, o.time_ns, e.time_ns))
    known = [path for path in opens if model_blobs and path in model_blobs]
    if known:
        model: str | None = known[0]
    elif model_blobs:
        model = None  # the runner's blob is known and was not opened: no scan
    else:
        model = max(opens, key=lambda path: opens[path]) if opens else None
    scans = [r for r in reads if r[0] == model]
    return {
        "blob_opens": opens.get(model, 0) if model else 0,
        "other_blob_opens": sum(opens.values()) - (opens.get(model, 0) if model else 0),
        "gguf_scans": len(scans),
        "gguf_scan_ms": round(sum(c - o for _, o, c in scans) / 1e6, 3),
    }


def _peer_gone(event: ProbeEvent) -> bool:
    """A read that returned EOF, or an error other than EAGAIN (-11): e.g. -ECONNRESET after an RST."""
    return event.value == 0 or (event.value < 0 and event.value != -11)


def _probe_counts(window: list[ProbeEvent], found: dict[str, ProbeEvent]) -> dict[str, int]:
    """How many uprobe hits and syscall events the request caused, its read to its first answer."""
    if "R" not in found or "SW" not in found:
        return {}
    r, sw = found["R"].time_ns, found["SW"].time_ns
    inside = [e for e in window if r <= e.time_ns <= sw]
    return {"uprobe_hits": sum(1 for e in inside if e.kind == "U"),
            "syscall_events": sum(1 for e in inside if e.kind != "U")}


@functools.cache
def _symbol_keys() -> dict[str, tuple[str, ...]]:
    """Each boundary key → the symbols that mark it, in every catalogue entry (an event's text is
    its probe's symbol, so one table serves every version)."""
    from ollama_tracer.collectors.probe_catalogue import CATALOGUE

    keys: dict[str, tuple[str, ...]] = {}
    for specs in CATALOGUE.values():
        for spec in specs:
            if spec.symbol not in keys.get(spec.key, ()):
                keys[spec.key] = (*keys.get(spec.key, ()), spec.symbol)
    return keys
