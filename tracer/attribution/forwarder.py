"""The port forwarder's hops (a published container port: Docker's docker-proxy), from eBPF.

The forwarder holds two connections per client: the one it accepted from the client, and the one
it opened to the server. A request crosses it from its accepted connection to its onward one; the
response the other way. Its moves are seen as splice(2) (``S`` events: docker-proxy, Go's
io.Copy) or read/write (``R``/``W``: socat and other copying forwarders):

* ``forwarder.request``: from when the client wrote the request (its own span says; else when the
  forwarder read it) to the server's read of it (``R``): the request is in the forwarder's hands
  from the moment it is written to the forwarder's socket, unread while the forwarder is busy,
  connecting onward or waiting for a CPU, then held, then on the second loopback hop;
* ``forwarder.response``: from the server's first response write (``SW``) to the forwarder's
  first write of response bytes to a client after it.

Which client connection the forwarder moved is not followed (its two connections are not
paired), so the hops are this request's when it was the only one crossing the forwarder then;
otherwise the phases are left out, and the merged coarser phase keeps the time.
"""

from __future__ import annotations

from ollama_tracer.collectors.ebpf_events import ProbeEvent, Roles, between, since, timeline
from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import FORWARDER_REQUEST, FORWARDER_RESPONSE, PROCESS_FORWARDER, SOURCE_EBPF


def _accepted(events: list[ProbeEvent], roles: Roles) -> dict[tuple[int, int], list[tuple[int, bool]]]:
    """(pid, fd) -> [(time, accepted?)]: what each forwarder fd number was, over time (once per capture)."""
    line = timeline(events)

    def build() -> dict[tuple[int, int], list[tuple[int, bool]]]:
        opened: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for e in line.of_kind("AC"):
            if roles.get(e.pid) == PROCESS_FORWARDER:
                opened.setdefault((e.pid, e.fd), []).append((e.time_ns, e.kind == "A"))
        return opened

    return line.once("forwarder_fds", build, roles)


def _is_client_side(opened: dict[tuple[int, int], list[tuple[int, bool]]], e: ProbeEvent) -> bool:
    before = [accepted for t, accepted in opened.get((e.pid, e.fd), []) if t <= e.time_ns]
    return bool(before) and before[-1]


def _request_in(e: ProbeEvent) -> bool:
    return (e.kind == "S" and e.text == "in" and e.value > 0) or (e.kind == "R" and e.text.startswith("POST"))


def _response_out(e: ProbeEvent) -> bool:
    return (e.kind == "S" and e.text == "out" and e.value > 0) or (e.kind == "W" and e.text.startswith("HTTP"))


def forwarder_phases(events: list[ProbeEvent], roles: Roles, read: ProbeEvent | None, first_write: ProbeEvent | None,
                     since_ns: int, written_ns: int | None = None,
                     why: list[tuple[str, str]] | None = None) -> list[Phase]:
    """The forwarder's two hops around one request: ``read`` is the server's read of it (R),
    ``first_write`` its first response write (SW); ``since_ns``: when the request was built;
    ``written_ns``: when the client finished writing it, if its span says. ``why``: where to say
    why a hop is left out, as (its phase, the reason)."""
    if PROCESS_FORWARDER not in roles.values():
        return []
    opened = _accepted(events, roles)
    phases = []
    if read is not None:
        arrivals = [e for e in between(events, since_ns, read.time_ns)
                    if roles.get(e.pid) == PROCESS_FORWARDER and _request_in(e) and _is_client_side(opened, e)]
        if why is not None and len(arrivals) != 1:
            why.append((FORWARDER_REQUEST,
                        "no request was seen arriving at the forwarder between the request's start and the server's "
                        "read" if not arrivals else f"{len(arrivals)} requests crossed the forwarder between the "
                        "request's start and the server's read, and which is whose is unknown"))
        if len(arrivals) == 1:  # more: another client's request crossed too, and which is whose is unknown
            start = arrivals[0].time_ns
            if written_ns is not None and since_ns <= written_ns <= start:
                start = written_ns
            phases.append(Phase(FORWARDER_REQUEST, start, read.time_ns, SOURCE_EBPF, PROCESS_FORWARDER,
                                {"forwarder_pid": arrivals[0].pid, "forwarder_fd": arrivals[0].fd,
                                 "forwarder_read_ns": arrivals[0].time_ns}))
    if first_write is not None:
        out = next((e for e in since(events, max(since_ns, first_write.time_ns))
                    if roles.get(e.pid) == PROCESS_FORWARDER and _response_out(e) and _is_client_side(opened, e)), None)
        if out is None and why is not None:
            why.append((FORWARDER_RESPONSE, "the forwarder was not seen passing the response to a client"))
        if out is not None:
            phases.append(Phase(FORWARDER_RESPONSE, first_write.time_ns, out.time_ns, SOURCE_EBPF, PROCESS_FORWARDER,
                                {"forwarder_pid": out.pid, "forwarder_fd": out.fd}))
    return phases
