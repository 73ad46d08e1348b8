"""The forwarder's hops from eBPF events: which events bound them, and when they are left out."""

from __future__ import annotations

from ollama_tracer.attribution.forwarder import forwarder_phases
from ollama_tracer.collectors.ebpf_events import ProbeEvent

FW, SERVER = 10, 20
ROLES = {FW: "forwarder", SERVER: "server"}


def _ev(kind: str, t: int, pid: int, fd: int, value: int = 0, text: str = "") -> ProbeEvent:
    return ProbeEvent(kind, t, pid, pid, fd=fd, value=value, text=text)


def _splicing(extra: list[ProbeEvent] | None = None) -> list[ProbeEvent]:
    """docker-proxy: accepts the client on fd 5, connects onward on fd 6, splices both ways."""
    events = [
        _ev("A", 100, FW, 5, 40000), _ev("C", 110, FW, 6, -115),
        _ev("S", 200, FW, 5, 180, "in"), _ev("S", 210, FW, 6, 180, "out"),
        _ev("A", 220, SERVER, 9, 50000), _ev("R", 300, SERVER, 9, 180, "POST /api/generate"),
        _ev("W", 900, SERVER, 9, 120, "HTTP/1.1 200 OK"),
        _ev("S", 950, FW, 6, 120, "in"), _ev("S", 990, FW, 5, 120, "out"),
        *(extra or []),
    ]
    return sorted(events, key=lambda e: e.time_ns)


def test_the_two_hops_of_a_splicing_forwarder() -> None:
    events = _splicing()
    read, first_write = events[5], events[6]
    assert (read.pid, first_write.pid) == (SERVER, SERVER)
    request, response = forwarder_phases(events, ROLES, read, first_write, since_ns=50)
    assert (request.name, request.start_ns, request.end_ns, request.process) == ("forwarder.request", 200, 300,
                                                                               "forwarder")
    assert (response.name, response.start_ns, response.end_ns) == ("forwarder.response", 900, 990)


def test_the_request_hop_starts_when_the_client_wrote_it_if_the_forwarder_read_it_later() -> None:
    events = _splicing()
    request, _ = forwarder_phases(events, ROLES, events[5], events[6], since_ns=50, written_ns=150)
    assert (request.start_ns, request.attributes["forwarder_read_ns"]) == (150, 200)
    # a "written" after the forwarder's read (another clock's slip) is not used
    request, _ = forwarder_phases(events, ROLES, events[5], events[6], since_ns=50, written_ns=250)
    assert request.start_ns == 200


def test_two_requests_crossing_the_forwarder_leave_the_request_hop_out() -> None:
    other = [_ev("A", 120, FW, 7, 40001), _ev("S", 205, FW, 7, 180, "in")]
    events = _splicing(other)
    read = next(e for e in events if e.kind == "R")
    first_write = next(e for e in events if e.kind == "W")
    names = [p.name for p in forwarder_phases(events, ROLES, read, first_write, since_ns=50)]
    assert names == ["forwarder.response"]  # whose request the server read first is not known


def test_a_copying_forwarder_is_seen_by_its_reads_and_writes() -> None:
    events = [_ev("A", 100, FW, 5, 40000), _ev("R", 200, FW, 5, 180, "POST /api/generate"),
              _ev("C", 205, FW, 6, 0), _ev("W", 210, FW, 6, 180, "POST /api/generate"),
              _ev("R", 300, SERVER, 9, 180, "POST /api/generate"), _ev("W", 900, SERVER, 9, 120, "HTTP/1.1 200"),
              _ev("R", 950, FW, 6, 120, "HTTP/1.1 200"), _ev("W", 990, FW, 5, 120, "HTTP/1.1 200")]
    request, response = forwarder_phases(events, ROLES, events[4], events[5], since_ns=50)
    assert (request.start_ns, request.end_ns) == (200, 300)
    assert (response.start_ns, response.end_ns) == (900, 990)  # its write to the client, not its read


def test_no_forwarder_no_hops() -> None:
    events = _splicing()
    assert forwarder_phases(events, {SERVER: "server"}, events[5], events[6], since_ns=50) == []
