"""Following a request by identity (connection, goroutine, runner connection), on synthetic events
of two requests that interleave inside the server."""

from __future__ import annotations

import pytest
from ollama_tracer.attribution.request_chain import Broken, concurrent_sequences, other_sequences, own_events, resolve
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.ebpf_events import ProbeEvent, parse_line

SERVER, RUNNER = 100, 200
ROLES = {SERVER: "server", RUNNER: "runner"}
COMPLETION = ("github.com/ollama/ollama/llm.(*llmServer).Completion",)
LOOKUP = "github.com/ollama/ollama/server.getExistingName"
SAMPLE = "github.com/ollama/ollama/sample.(*Sampler).Sample"


def E(kind: str, t: int, pid: int, fd: int = -1, value: int = 0, text: str = "", goid: int = 0,
      parent: int = 0) -> ProbeEvent:
    return ProbeEvent(kind, t, pid, pid + 1, fd=fd, value=value, text=text, goid=goid, parent_goid=parent)


def _two_requests(*, with_getsockname: bool = True) -> list[ProbeEvent]:
    """A on client fd 10 (handler goroutine 1, completion 11, runner hop fd 20 from port 5001),
    B on client fd 12 (goroutines 2 and 12, runner hop fd 21 from port 5002), interleaved so
    that every "first event after" of A is B's."""
    events = [
        E("G", 0, SERVER, fd=10, goid=1), E("G", 1, SERVER, fd=12, goid=2),
        E("R", 10, SERVER, fd=10, value=200, text="POST /api/generate"),
        E("R", 11, SERVER, fd=12, value=200, text="POST /api/generate"),
        E("U", 12, SERVER, text=LOOKUP, goid=2), E("U", 13, SERVER, text=LOOKUP, goid=1),
        E("U", 20, SERVER, text=COMPLETION[0], goid=12, parent=2),
        E("U", 21, SERVER, text=COMPLETION[0], goid=11, parent=1),
        E("T", 22, SERVER, fd=30, goid=12), E("W", 23, SERVER, fd=30, value=100, text="GET /health HTTP/1"),
        E("T", 24, SERVER, fd=21, goid=12), E("T", 25, SERVER, fd=20, goid=11),
        E("W", 26, SERVER, fd=21, value=400, text="POST /completion H"),
        E("W", 27, SERVER, fd=20, value=400, text="POST /completion H"),
        E("G", 28, RUNNER, fd=7, goid=70), E("G", 29, RUNNER, fd=8, goid=80),
        E("R", 30, RUNNER, fd=8, value=400, text="POST /completion H"),
        E("R", 31, RUNNER, fd=7, value=400, text="POST /completion H"),
        E("U", 32, RUNNER, text="runner.completion", goid=80), E("U", 33, RUNNER, text="runner.completion", goid=70),
        E("U", 34, RUNNER, text=SAMPLE, goid=5),
        E("W", 40, RUNNER, fd=8, value=100, text="HTTP/1.1 200 OK"), E("W", 41, RUNNER, fd=7, value=100,
                                                                      text="HTTP/1.1 200 OK"),
        E("W", 50, SERVER, fd=12, value=100, text="HTTP/1.1 200 OK"), E("W", 51, SERVER, fd=10, value=100,
                                                                        text="HTTP/1.1 200 OK"),
    ]
    # The runner accepted A's hop (port 5001) on fd 7 and B's (port 5002) on fd 8.
    events += [E("A", -5, RUNNER, fd=7, value=5001), E("A", -4, RUNNER, fd=8, value=5002)]
    if with_getsockname:
        events += [E("N", -6, SERVER, fd=20, value=5001), E("N", -3, SERVER, fd=21, value=5002)]
    return sorted(events, key=lambda e: e.time_ns)


def test_each_request_gets_its_own_goroutines_and_runner_connection() -> None:
    events = _two_requests()
    reads = [e for e in events if e.kind == "R" and e.pid == SERVER]
    a = resolve(events, ROLES, reads[0], 60, COMPLETION, [])
    b = resolve(events, ROLES, reads[1], 60, COMPLETION, [])
    assert (a.client_fd, a.handler_goid, a.completion_goid, a.runner_fd, a.runner_goid) == (10, 1, 11, 7, 70)
    assert (b.client_fd, b.handler_goid, b.completion_goid, b.runner_fd, b.runner_goid) == (12, 2, 12, 8, 80)
    assert b.server_runner_fds == {30, 21}  # its ping went out on its own connection
    mine = own_events(events, a, {SAMPLE})
    assert [e.time_ns for e in mine] == [10, 13, 21, 27, 31, 33, 41, 51]  # the batch loop's Sample is no one's


def test_the_4_tuple_of_a_connection_made_before_the_capture_comes_from_the_start_snapshot() -> None:
    events = [e for e in _two_requests(with_getsockname=False) if e.kind != "A"]
    held = [{"pid": SERVER, "fd": 20, "local_port": 5001, "remote_port": 9000},
            {"pid": RUNNER, "fd": 7, "local_port": 9000, "remote_port": 5001}]
    read = next(e for e in events if e.kind == "R" and e.fd == 10)
    assert resolve(events, ROLES, read, 60, COMPLETION, held).runner_fd == 7
    with pytest.raises(Broken, match="port of its runner connection is unknown"):
        resolve(events, ROLES, read, 60, COMPLETION, [])


@pytest.mark.parametrize(("drop", "reason"), [
    (lambda e: e.kind == "G" and e.pid == SERVER and e.fd == 10, "accepted before the capture"),
    (lambda e: e.kind == "U" and e.goid == 11, "no runner call started by its handler goroutine"),
    (lambda e: e.kind == "T" and e.goid == 11, "runner connection of its POST /completion"),
    (lambda e: e.kind == "A" and e.fd == 7, "no runner accepted the connection from port 5001"),
])
def test_a_missing_link_is_named_not_filled_in(drop: object, reason: str) -> None:
    events = [e for e in _two_requests() if not drop(e)]  # type: ignore[operator]
    read = next(e for e in events if e.kind == "R" and e.fd == 10)
    with pytest.raises(Broken, match=reason):
        resolve(events, ROLES, read, 60, COMPLETION, [])


def test_goroutine_layer_lines_parse() -> None:
    clock = ClockModel.measure()
    probes = {3: LOOKUP}
    u = parse_line("U 1000 5 6 3 77 12\n", clock, probes)
    assert (u.text, u.goid, u.parent_goid) == (LOOKUP, 77, 12)
    assert parse_line("U 1000 5 6 3\n", clock, probes).goid == 0  # without the goroutine layer
    g = parse_line("G 1000 5 6 9 77\n", clock, probes)
    assert (g.kind, g.fd, g.goid) == ("G", 9, 77)
    n = parse_line("N 1000 5 6 9 \\xc2\\x08\n", clock, probes)
    assert (n.fd, n.value) == (9, 49672)
    for bad in ("G 1000 5 6 9\n", "U 1000 5 6 3 77\n", "T 1000 5 6 x 1\n"):
        with pytest.raises(ValueError):
            parse_line(bad, clock, probes)


def test_sequences_in_the_same_runner_overlap_until_one_finishes() -> None:
    events = _two_requests()
    read_a = next(e for e in events if e.kind == "R" and e.fd == 10)
    a = resolve(events, ROLES, read_a, 60, COMPLETION, [])
    assert concurrent_sequences(events, a, 0, 60) == 1  # B's sequence (runner fd 8) was in the runner too
    # B finished (its chunked terminator) before A's request reached the runner: A was alone there.
    finished = sorted([*events, E("W", 29, RUNNER, fd=8, value=5, text="0\\x0d\\x0a\\x0d\\x0a")],
                      key=lambda e: e.time_ns)
    early = [e if not (e.kind == "R" and e.fd == 8 and e.pid == RUNNER) else
             E("R", 28, RUNNER, fd=8, value=400, text="POST /completion H") for e in finished]
    assert concurrent_sequences(sorted(early, key=lambda e: e.time_ns), a, 0, 60) == 0


def test_per_token_probes_are_kept_once_the_other_sequence_left_the_runner() -> None:
    """The cancelled sequence (B, runner fd 8) leaves after A's POST reached the runner (31) but
    before A's prefill: A's Sample hits after that are A's alone, so they are kept; the one while B
    was still there (34) is no one's. (Under load B's teardown lasts longer, which is when this
    mattered: every per-token probe was dropped and runner.prefill+sample merged.)"""
    events = _two_requests()
    events += [E("W", 35, RUNNER, fd=8, value=5, text="0\\x0d\\x0a\\x0d\\x0a"), E("U", 38, RUNNER, text=SAMPLE, goid=5)]
    events.sort(key=lambda e: e.time_ns)
    read_a = next(e for e in events if e.kind == "R" and e.fd == 10)
    a = resolve(events, ROLES, read_a, 60, COMPLETION, [])
    shared = other_sequences(events, a, 0, 60)
    assert shared == [(30, 35)]
    mine = own_events(events, a, {SAMPLE}, runner_shared_until_ns=max(end for _, end in shared))
    assert [e.time_ns for e in mine if e.text == SAMPLE] == [38]
    assert [e.time_ns for e in own_events(events, a, {SAMPLE}) if e.text == SAMPLE] == []  # as before: dropped
