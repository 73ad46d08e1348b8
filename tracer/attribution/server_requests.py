"""Requests as the server saw them, from eBPF events alone: all of them in ``tracer attach`` (no
client spans), and in ``capture`` and ``proxy`` the ones no client span recorded (an
uninstrumented client: node, curl, Go, plain sockets), merged with the client's by
:func:`merge_server_requests`.

Each client connection of the Ollama server (accepted sockets; not the server→runner hops) is
followed through its syscall events:

* a read that starts with ``POST`` and a generation endpoint (``/api/generate``, ``/api/chat``,
  ``/v1/chat/completions``, ``/v1/completions``) starts a request; any other request read
  (another endpoint) is counted by :func:`untracked_requests`, with the reason;
* the first response write (``HTTP/1.1 ...``) is its first token: Ollama sends the headers
  with the first chunk (an NDJSON line, or on ``/v1`` the first ``data:`` event);
* the chunked-encoding terminator (``0\\r\\n\\r\\n``) written back completes it;
* EOF or a reset read from the client before that, or the server closing the connection before
  it, is the client closing a stream it had not finished: an interrupt (``tracer.cancelled``);
* the next request on the connection, or a close after completion, ends it normally.

A non-streamed response has no terminator, so a client closing after one reads as cancelled;
the interrupt pattern (a cancelled stream, then a new request within seconds) is what makes
an interval, and a non-streamed request is not followed that way in practice.

The results are spans shaped like the client instrumentation's, so intervals and phases are
found by the same code. What the server cannot see (the client's own time) is not invented.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ollama_tracer.attribution.intervals import is_genai
from ollama_tracer.attribution.overlaps import Overlaps, Span
from ollama_tracer.collectors.ebpf_events import ProbeEvent, Roles
from ollama_tracer.vocabulary import (
    CLIENT_PORT,
    GEN_AI_PROVIDER_NAME,
    GENERATION_ENDPOINTS,
    PROCESS_PID,
    PROCESS_SERVER,
    PROVIDER_OLLAMA,
    SEEN_FROM_SERVER,
    SERVER_FD,
    SERVER_PID,
    SERVICE_NAME,
    SERVICE_SERVER,
    SOURCE_EBPF,
    SPAN_SERVER_REQUEST,
    TRACER_CANCELLED,
    TRACER_FIRST_TOKEN_NS,
    TRACER_LOCAL_PORT,
    TRACER_REQUEST_INDEX,
    TRACER_SEEN_FROM,
    TRACER_SOURCE,
)

TRACKED_PATHS = tuple(f"POST {path}" for path in GENERATION_ENDPOINTS)
REQUEST_HEADS = ("POST ", "GET ")  # what the eBPF program prints of a read (18 bytes of it)
_EAGAIN = -11
TERMINATOR = ("0\\x0d\\x0a", "0\r\n")  # as bpftrace's %r prints it, or raw


def _is_request(e: ProbeEvent) -> bool:
    """A generate/chat request's first read. Older captures kept 4 bytes ("POST"): any POST then."""
    if e.kind != "R" or e.value <= 0:
        return False
    head = e.text
    return any(path.startswith(head) if len(head) < len(path) else head.startswith(path) for path in TRACKED_PATHS)


def _id(*parts: object, size: int = 16) -> str:
    return hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=size // 2).hexdigest()


def server_request_spans(events: list[ProbeEvent], roles: Roles,
                         provider: str = PROVIDER_OLLAMA) -> list[dict[str, Any]]:
    """One span per request the server read from a client, in time order."""
    runner_hops: set[tuple[int, int]] = set()  # the server's connections to runners, while open
    peers: dict[tuple[int, int], int] = {}
    open_requests: dict[tuple[int, int], dict[str, Any]] = {}
    spans: list[dict[str, Any]] = []

    def finish(key: tuple[int, int], end_ns: int, cancelled: bool) -> None:
        request = open_requests.pop(key, None)
        if request is None:
            return
        attributes = request["attributes"]
        if cancelled:
            attributes[TRACER_CANCELLED] = True
        request["endTimeUnixNano"] = max(end_ns, request["startTimeUnixNano"])
        spans.append(request)

    for e in events:
        if roles.get(e.pid) != PROCESS_SERVER:
            continue
        key = (e.pid, e.fd)
        if e.kind == "C":
            runner_hops.add(key)
            continue
        if e.kind == "X":
            runner_hops.discard(key)  # the fd number may next be a client's connection
        if e.kind == "A":
            finish(key, e.time_ns, cancelled=False)  # a reused fd number: the old connection is gone
            runner_hops.discard(key)  # ... and so is a runner hop whose close was not seen
            peers[key] = e.value
            continue
        if key in runner_hops:
            continue
        if e.kind == "R" and _is_request(e):
            finish(key, e.time_ns, cancelled=False)
            index = len(spans) + len(open_requests)
            trace_id = _id("attach", e.pid, e.fd, e.time_ns, size=32)
            open_requests[key] = {
                "traceId": trace_id, "spanId": _id(trace_id, "request"), "parentSpanId": "",
                "name": SPAN_SERVER_REQUEST, "kind": 2, "startTimeUnixNano": e.time_ns, "endTimeUnixNano": e.time_ns,
                "attributes": {GEN_AI_PROVIDER_NAME: provider, TRACER_SOURCE: SOURCE_EBPF,
                               TRACER_REQUEST_INDEX: index, SERVER_PID: e.pid, SERVER_FD: e.fd,
                               **({CLIENT_PORT: peers[key]} if peers.get(key) else {})},
                "events": [], "status": {"code": 0, "message": ""},
                "resource": {SERVICE_NAME: SERVICE_SERVER, PROCESS_PID: e.pid},
                "service": SERVICE_SERVER,
            }
        elif e.kind == "W" and e.text.startswith("HTTP") and key in open_requests:
            open_requests[key]["attributes"].setdefault(TRACER_FIRST_TOKEN_NS, e.time_ns)
        elif e.kind == "W" and e.text.startswith(TERMINATOR) and key in open_requests:
            finish(key, e.time_ns, cancelled=False)
        elif e.kind == "R" and key in open_requests and (e.value == 0 or (e.value < 0 and e.value != _EAGAIN)):
            finish(key, e.time_ns, cancelled=True)
        elif e.kind == "X":
            # Closed before the terminator: the server gave up on a client that went away (Go
            # notices on a failed write as often as on a read of EOF), so the stream was cut short.
            finish(key, e.time_ns, cancelled=True)
            peers.pop(key, None)
    for key in list(open_requests):
        request = open_requests[key]
        finish(key, max(request["startTimeUnixNano"], request["attributes"].get(TRACER_FIRST_TOKEN_NS, 0)), False)
    spans.sort(key=lambda s: s["startTimeUnixNano"])
    return spans


def _endpoint(head: str) -> str:
    """``POST /api/embed HT`` → ``POST /api/embed``; a path cut at the 18 bytes printed ends in …."""
    method, _, rest = head.partition(" ")
    path, space, _ = rest.partition(" ")
    return f"{method} {path}" + ("" if space else "…")


def untracked_requests(events: list[ProbeEvent], roles: Roles, spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests the server read that give no interval, counted per endpoint and reason: other
    endpoints (not generation), and generation requests answered with no response bytes seen."""
    counts: dict[tuple[str, str], int] = {}
    runner_hops: set[tuple[int, int]] = set()
    for e in events:
        if roles.get(e.pid) != PROCESS_SERVER:
            continue
        if e.kind == "C":
            runner_hops.add((e.pid, e.fd))
        elif e.kind == "X":
            runner_hops.discard((e.pid, e.fd))
        elif (e.kind == "R" and e.value > 0 and (e.pid, e.fd) not in runner_hops and e.text.startswith(REQUEST_HEADS)
              and not _is_request(e)):
            key = (_endpoint(e.text), "not a generation endpoint (not followed)")
            counts[key] = counts.get(key, 0) + 1
    for span in spans:
        if TRACER_FIRST_TOKEN_NS not in span["attributes"]:
            key = ("generation", "no response bytes seen (the capture ended first, or the server failed the request)")
            counts[key] = counts.get(key, 0) + 1
    return [{"endpoint": endpoint, "reason": reason, "count": n} for (endpoint, reason), n in sorted(counts.items())]


# How far a server-side request may start outside its client span's time and still be its
# (clock alignment of eBPF to epoch time is well under a millisecond; a proxy adds its hop).
MATCH_SLACK_NS = 50_000_000


def _client_port(span: dict[str, Any]) -> int | None:
    port = span.get("attributes", {}).get(TRACER_LOCAL_PORT)
    return int(port) if port else None


def merge_server_requests(client_spans: list[dict[str, Any]],
                          server_spans: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The server-side requests (eBPF) that no client span recorded, marked ``tracer.seen_from:
    server``, and how each server request was decided.

    A server request is a client span's when the client's local port is the peer port the server
    accepted, and it started within the span (±``MATCH_SLACK_NS``). A client whose connection the
    server never saw by that port (behind a relay or proxy, or on a connection accepted before
    the capture) is matched by time alone: its span holds the server request's start. A server
    request that some unmatched client span holds is never added, so a request is counted once
    at most: when in doubt, the client's span wins."""
    genai = [s for s in client_spans if is_genai(s) and s.get("attributes", {}).get(TRACER_SOURCE) != SOURCE_EBPF]
    server_ports = {int(s["attributes"][CLIENT_PORT]) for s in server_spans if s["attributes"].get(CLIENT_PORT)}
    taken: set[int] = set()
    added: list[dict[str, Any]] = []
    counts = {"matched_by_port": 0, "matched_by_time": 0, "server_only": 0}

    # Each client span as the time it holds (± the slack), indexed once: a server request looks
    # only at the spans that hold its start.
    held = Overlaps([Span(i, int(s["startTimeUnixNano"]) - MATCH_SLACK_NS, int(s["endTimeUnixNano"]) + MATCH_SLACK_NS)
                     for i, s in enumerate(genai)])
    ports = [_client_port(s) for s in genai]

    def best(candidates: list[int], start: int) -> int:
        return min(candidates, key=lambda i: abs(start - int(genai[i]["startTimeUnixNano"])))

    for request in server_spans:
        start, port = int(request["startTimeUnixNano"]), request["attributes"].get(CLIENT_PORT)
        holding = sorted(span.key for span in held.reaching(start, start) if span.key not in taken)
        by_port = [i for i in holding if port and ports[i] == int(port)]
        if by_port:
            taken.add(best(by_port, start))
            counts["matched_by_port"] += 1
            continue
        by_time = [i for i in holding if ports[i] is None or ports[i] not in server_ports]
        if by_time:
            taken.add(best(by_time, start))
            counts["matched_by_time"] += 1
            continue
        request["attributes"][TRACER_SEEN_FROM] = SEEN_FROM_SERVER
        added.append(request)
        counts["server_only"] += 1
    return added, counts
