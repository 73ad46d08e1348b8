"""Follow one request through the server and into the runner by identity, never by time order.

When requests overlap inside the server (``OLLAMA_NUM_PARALLEL`` > 1, several clients), the
first event after a boundary may belong to another request. The goroutine layer of the eBPF
collector gives the identities that tie a request's events together:

1. **client connection**: the server's fd of the request's TCP connection, from the 4-tuple
   (the client's local port is the peer port the server's accept saw);
2. **handler goroutine**: the goroutine ``net/http.(*conn).serve`` runs for that fd; Go's
   HTTP/1.1 server runs the handler (``GenerateHandler``, model lookup, scheduling) on it;
3. **completion goroutine**: the goroutine the handler starts to call the runner
   (``llmServer.Completion``: its parent goroutine is the handler's);
4. **runner connection**: the connection that goroutine's ``(*persistConn).roundTrip`` sent the
   ``POST /completion`` on (a ``/health`` ping before it goes out on its own connection);
5. **the runner's end**: the runner's fd of that connection, by the 4-tuple again (the server's
   local port from ``getsockname`` is the peer port the runner's accept saw, or both ends were
   already connected when the capture started), and the runner's handler goroutine on it.

:func:`resolve` returns the chain, or the first link that could not be made and why: a request
whose chain breaks is reported as unmatched, never filled in by time order. :func:`own_events`
keeps only the events of the chain. Per-token runner work (the batch loop's sampler and decode)
runs on one goroutine for every sequence and cannot be told apart, so it is left out and the
runner's phases after admission merge into ``runner.prefill+sample``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ollama_tracer.attribution.overlaps import Overlaps, Span
from ollama_tracer.attribution.server_requests import TERMINATOR
from ollama_tracer.collectors.ebpf_events import ProbeEvent, Roles, between, each_between, latest_first, since, timeline
from ollama_tracer.vocabulary import PROCESS_RUNNER


@dataclass(frozen=True)
class Chain:
    server_pid: int
    client_fd: int
    handler_goid: int
    completion_goid: int
    server_runner_fds: frozenset[int]  # every runner connection the two goroutines used (pings too)
    runner_pid: int
    runner_fd: int
    runner_goid: int

    def to_json(self) -> dict[str, Any]:
        return {"server_pid": self.server_pid, "client_fd": self.client_fd, "handler_goroutine": self.handler_goid,
                "completion_goroutine": self.completion_goid, "runner_pid": self.runner_pid,
                "runner_fd": self.runner_fd, "runner_goroutine": self.runner_goid}


class Broken(Exception):
    """A link of the chain that the evidence does not establish; the message says which."""


def _latest(events: list[ProbeEvent], kinds: str, before_ns: int, match: Any) -> ProbeEvent | None:
    """The latest event of ``kinds`` up to ``before_ns`` that ``match`` accepts."""
    return next((e for e in latest_first(timeline(events).of_kind(kinds), before_ns) if match(e)), None)


def _first(events: list[ProbeEvent], after_ns: int, match: Any, until_ns: int | None = None) -> ProbeEvent | None:
    """The first event from ``after_ns`` on (up to ``until_ns``, if given) that ``match`` accepts."""
    candidates = since(events, after_ns) if until_ns is None else each_between(events, after_ns, until_ns)
    return next((e for e in candidates if match(e)), None)


def resolve(events: list[ProbeEvent], roles: Roles, read: ProbeEvent, until_ns: int,
            completion_symbols: tuple[str, ...], sockets_at_start: list[dict[str, int]]) -> Chain:
    """The chain of the request whose first read on its client connection is ``read``.

    Raises :class:`Broken` naming the link that is missing."""
    server = read.pid
    serve = _latest(events, "G", read.time_ns, lambda e: e.pid == server and e.fd == read.fd)
    if serve is None:
        raise Broken("its client connection was accepted before the capture, so its handler goroutine is unknown")
    handler = serve.goid
    completion = _first(events, read.time_ns, lambda e: e.kind == "U" and e.pid == server
                        and e.parent_goid == handler and e.text in completion_symbols, until_ns)
    if completion is None or completion.time_ns > until_ns:
        raise Broken("no runner call started by its handler goroutine was seen")
    goroutines = {handler, completion.goid}
    trips = [e for e in between(timeline(events).of_kind("T"), read.time_ns, until_ns)
             if e.pid == server and e.goid in goroutines]
    runner_trip = None
    for trip in (t for t in trips if t.goid == completion.goid):
        # The request this round trip sent is the next message written on its connection.
        sent = _first(events, trip.time_ns, lambda e, fd=trip.fd: e.kind == "W" and e.pid == server
                      and e.fd == fd and e.text.startswith(("POST", "GET ")), until_ns)
        if sent is not None and sent.text.startswith("POST") and sent.time_ns <= until_ns:
            runner_trip = trip
            break
    if runner_trip is None:
        raise Broken("the runner connection of its POST /completion was not seen")
    port = _local_port(events, sockets_at_start, server, runner_trip.fd, runner_trip.time_ns)
    if port is None:
        raise Broken("the server's port of its runner connection is unknown (no getsockname seen)")
    runner_pid, runner_fd = _runner_end(events, roles, sockets_at_start, port, runner_trip.time_ns)
    if runner_pid is None or runner_fd is None:
        raise Broken(f"no runner accepted the connection from port {port}")
    received = _first(timeline(events).of_kind("R"), runner_trip.time_ns, lambda e: e.pid == runner_pid
                      and e.fd == runner_fd and e.value > 0 and e.text.startswith("POST"))
    runner_serve = _latest(events, "G", received.time_ns if received else until_ns,
                           lambda e: e.pid == runner_pid and e.fd == runner_fd)
    if runner_serve is None:
        raise Broken("the runner's connection was accepted before the capture, so its handler goroutine is unknown")
    return Chain(server, read.fd, handler, completion.goid, frozenset(t.fd for t in trips), runner_pid, runner_fd,
                 runner_serve.goid)


def _local_port(events: list[ProbeEvent], sockets_at_start: list[dict[str, int]], pid: int, fd: int,
                before_ns: int) -> int | None:
    named = _latest(events, "N", before_ns, lambda e: e.pid == pid and e.fd == fd and e.value)
    if named is not None:
        return named.value
    opened = _latest(events, "CX", before_ns, lambda e: e.pid == pid and e.fd == fd)
    if opened is not None:
        return None  # the fd was (re)connected or closed during the capture without a getsockname
    held = [s for s in sockets_at_start if s["pid"] == pid and s["fd"] == fd]
    return int(held[0]["local_port"]) if held else None


def _runner_end(events: list[ProbeEvent], roles: Roles, sockets_at_start: list[dict[str, int]],
                port: int, before_ns: int) -> tuple[int | None, int | None]:
    accepted = _latest(events, "A", before_ns, lambda e: roles.get(e.pid) == PROCESS_RUNNER and e.value == port)
    if accepted is not None:
        return accepted.pid, accepted.fd
    held = [s for s in sockets_at_start if roles.get(int(s["pid"])) == PROCESS_RUNNER and s["remote_port"] == port]
    return (int(held[0]["pid"]), int(held[0]["fd"])) if held else (None, None)


def concurrent_sequences(events: list[ProbeEvent], chain: Chain, after_ns: int, until_ns: int) -> int:
    """How many other sequences the chain's runner was serving while this request was in it."""
    return len(other_sequences(events, chain, after_ns, until_ns))


def other_sequences(events: list[ProbeEvent], chain: Chain, after_ns: int, until_ns: int) -> list[tuple[int, int]]:
    """(start, end) of each other sequence the chain's runner was serving while this request was in it
    (its POST /completion read → its first response write): other connections of that runner that
    had read a POST /completion and not yet finished (terminator written, EOF or close). One still
    in flight at this request's first response write ends there."""
    ours = [e for e in between(events, after_ns, until_ns) if e.pid == chain.runner_pid and e.fd == chain.runner_fd]
    start = next((e.time_ns for e in ours if e.kind == "R" and e.value > 0 and e.text.startswith("POST")), None)
    end = next((e.time_ns for e in ours if e.kind == "W" and e.text.startswith("HTTP")), until_ns)
    if start is None:
        return []
    overlapping: dict[int, tuple[int, int]] = {}  # other fd -> (its request read, its end or ours)
    for span in _sequences(events, chain.runner_pid).reaching(start, end):  # the latest read first
        if span.key == chain.runner_fd or span.key in overlapping:
            continue
        if span.end_ns is None or span.end_ns > end:
            overlapping[span.key] = (span.start_ns, end)  # still in flight at our first response write
        elif span.ended == FINISHED:
            overlapping[span.key] = (span.start_ns, span.end_ns)
    return sorted(overlapping.values())


FINISHED, REPLACED = "finished", "replaced"


def _sequences(events: list[ProbeEvent], runner_pid: int) -> Overlaps:
    """Every sequence runner ``runner_pid`` served, once per capture: a connection's
    ``POST /completion`` read → its terminator written, EOF or close (finished), or the next POST
    read on that connection (replaced: the earlier one's end was not seen)."""
    line = timeline(events)

    def build() -> Overlaps:
        active: dict[int, int] = {}  # fd -> when its request was read
        spans = []
        for e in line:
            if e.pid != runner_pid:
                continue
            if e.kind == "R" and e.value > 0 and e.text.startswith("POST"):
                if e.fd in active:
                    spans.append(Span(e.fd, active[e.fd], e.time_ns, REPLACED))
                active[e.fd] = e.time_ns
            elif e.fd in active and ((e.kind == "W" and e.text.startswith(TERMINATOR))
                                     or (e.kind == "R" and e.value <= 0 and e.value != -11) or e.kind == "X"):
                spans.append(Span(e.fd, active.pop(e.fd), e.time_ns, FINISHED))
        spans.extend(Span(fd, read_at, None) for fd, read_at in active.items())
        return Overlaps(spans)

    return line.once(f"sequences:{runner_pid}", build)


def own_events(window: list[ProbeEvent], chain: Chain, per_token_symbols: set[str], *,
               keep_shared_server: bool = False, keep_shared_runner: bool = False,
               runner_shared_until_ns: int | None = None) -> list[ProbeEvent]:
    """The events of ``window`` that belong to the chain's request. ``keep_shared_*``: also keep
    the uprobes on that process's other goroutines (the server's scheduler, the runner's batch
    loop), when nothing else was in flight there. ``runner_shared_until_ns``: when the last other
    sequence left the runner; after it the runner's batch loop and per-token probes are this
    request's alone again, so they are kept from then on."""
    server_goroutines = {chain.handler_goid, chain.completion_goid}
    server_fds = chain.server_runner_fds | {chain.client_fd}

    def ours(e: ProbeEvent) -> bool:
        if e.pid == chain.server_pid:
            return ((e.kind == "U" and (e.goid in server_goroutines or keep_shared_server))
                    or (e.kind in "RW" and e.fd in server_fds))
        if e.pid == chain.runner_pid:
            if e.kind == "U":
                after_shared = runner_shared_until_ns is not None and e.time_ns > runner_shared_until_ns
                alone = keep_shared_runner or after_shared
                return (e.goid == chain.runner_goid or alone) and (alone or e.text not in per_token_symbols)
            return e.kind in "RW" and e.fd == chain.runner_fd
        return False

    return [e for e in window if ours(e)]
