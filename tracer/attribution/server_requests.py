"""Requests as the server saw them, from eBPF events alone (``tracer attach``: no client spans).

Each client connection of the Ollama server (accepted sockets; not the server→runner hops) is
followed through its syscall events:

* a read that starts with ``POST /api/generate`` or ``POST /api/chat`` starts a request;
* the first response write (``HTTP/1.1 ...``) is its first token: Ollama sends the headers
  with the first chunk;
* the chunked-encoding terminator (``0\\r\\n\\r\\n``) written back completes it;
* EOF or a reset read from the client before that is the client closing a stream it had not
  finished: an interrupt (``tracer.cancelled``);
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

from ollama_tracer.collectors.ebpf_events import ProbeEvent, Roles
from ollama_tracer.vocabulary import (
    CLIENT_PORT,
    GEN_AI_PROVIDER_NAME,
    PROCESS_PID,
    PROCESS_SERVER,
    PROVIDER_OLLAMA,
    SERVER_FD,
    SERVER_PID,
    SERVICE_NAME,
    SERVICE_SERVER,
    SOURCE_EBPF,
    SPAN_SERVER_REQUEST,
    TRACER_CANCELLED,
    TRACER_FIRST_TOKEN_NS,
    TRACER_REQUEST_INDEX,
    TRACER_SOURCE,
)

TRACKED_PATHS = ("POST /api/generate", "POST /api/chat")
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


def server_request_spans(events: list[ProbeEvent], roles: Roles) -> list[dict[str, Any]]:
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
                "attributes": {GEN_AI_PROVIDER_NAME: PROVIDER_OLLAMA, TRACER_SOURCE: SOURCE_EBPF,
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
            finish(key, e.time_ns, cancelled=False)
            peers.pop(key, None)
    for key in list(open_requests):
        request = open_requests[key]
        finish(key, max(request["startTimeUnixNano"], request["attributes"].get(TRACER_FIRST_TOKEN_NS, 0)), False)
    spans.sort(key=lambda s: s["startTimeUnixNano"])
    return spans
