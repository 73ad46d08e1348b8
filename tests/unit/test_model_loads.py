"""Why a model was loaded, from the runners' lives: which model each ran, when each exited."""

from __future__ import annotations

from ollama_tracer.attribution import diagnosis
from ollama_tracer.attribution.model_loads import COLD, RELOAD, load_reason, runners, scheduler_replaced
from ollama_tracer.clock import ClockModel, ClockOffset
from ollama_tracer.collectors.ebpf_events import EbpfRecords, ProbeEvent, parse_line

MS = 1_000_000
SERVER, A1, B1, A2 = 1, 10, 20, 30  # the server; model A's first runner, model B's, model A's second
BLOB_A, BLOB_B = "/m/blobs/sha256-aaaa", "/m/blobs/sha256-bbbb"


def _records(events: list[ProbeEvent], models: dict[int, str]) -> EbpfRecords:
    roles: dict[int, str | None] = {SERVER: "server", A1: "runner", B1: "runner", A2: "runner"}
    meta = {"runner_models": {str(k): v for k, v in models.items()}}
    return EbpfRecords(sorted(events, key=lambda e: e.time_ns), meta, roles)


def _life(pid: int, start_ms: int, exit_ms: int | None) -> list[ProbeEvent]:
    events = [ProbeEvent("A", start_ms * MS, pid, pid, 3)]
    if exit_ms is not None:
        events.append(ProbeEvent("E", exit_ms * MS, pid, pid, 0))
    return events


def test_exit_events_parse_and_give_each_runner_its_life() -> None:
    clock = ClockModel(start={"boottime": ClockOffset("boottime", 1_000, 100, 0)})
    assert parse_line("E 5000 10 10 0 0\n", clock, {}) == ProbeEvent("E", 6000, 10, 10, 0, 0)
    ebpf = _records(_life(A1, 5, 100) + _life(B1, 101, None), {A1: BLOB_A, B1: BLOB_B})
    lives = {r.pid: r for r in runners(ebpf)}
    assert (lives[A1].model, lives[A1].started_ns, lives[A1].exited_ns) == (BLOB_A, 5 * MS, 100 * MS)
    assert lives[B1].exited_ns is None and SERVER not in lives


def test_a_first_load_is_cold_and_a_reload_is_a_reload() -> None:
    ebpf = _records(_life(A1, 50, None), {A1: BLOB_A})
    assert load_reason(ebpf, 40 * MS, 900 * MS, reloaded=False)["reason"].startswith("cold load: no runner of this")
    assert load_reason(ebpf, 40 * MS, 900 * MS, reloaded=True)["reason"] == RELOAD


NEEDS_RELOAD = "github.com/ollama/ollama/server.(*runnerRef).needsReload"


def _check(at_ms: float, goroutine: int) -> ProbeEvent:
    return ProbeEvent("U", int(at_ms * MS), SERVER, SERVER, goroutine, 1, NEEDS_RELOAD)


def test_a_reload_is_checked_twice_and_a_runner_on_its_way_out_once() -> None:
    """Measured on both versions: every num_ctx reload had two needsReload hits before the load
    (the handler's GetRunner, then processPending's recheck, which expires the runner); a request
    that found a keep_alive-0 runner still loaded but already unloading had one (the scheduler
    found it gone and loaded), and its old runner exited 0.3-2.3 ms after that check."""
    window = [_check(1, 1956), _check(3, 22), ProbeEvent("U", 9 * MS, SERVER, SERVER, 22, 1, "other")]
    assert scheduler_replaced(window, {SERVER: "server"}, {NEEDS_RELOAD}, 8 * MS) is True
    assert scheduler_replaced(window[:1], {SERVER: "server"}, {NEEDS_RELOAD}, 8 * MS) is False
    assert scheduler_replaced(window, {SERVER: "server"}, {NEEDS_RELOAD}, 2 * MS) is False  # the recheck came after
    assert scheduler_replaced(window[2:], {SERVER: "server"}, {NEEDS_RELOAD}, 8 * MS) is None
    assert scheduler_replaced(window, {SERVER: "runner"}, {NEEDS_RELOAD}, 8 * MS) is None  # not the server's


def test_a_runner_that_exited_alone_expired() -> None:
    ebpf = _records(_life(A1, 5, 300) + _life(A2, 1_050, None), {A1: BLOB_A, A2: BLOB_A})
    why = load_reason(ebpf, 1_000 * MS, 2_000 * MS, reloaded=False)
    assert why["reason"].startswith("expired: this model's runner (pid 10) exited 700 ms before"), why
    assert (why["previous_runner_pid"], why["runner_pid"]) == (A1, A2)


def test_a_runner_stopped_for_another_model_was_evicted() -> None:
    # A's runner exits, B's starts 3 ms later (the scheduler made room for B); later A is needed again.
    ebpf = _records(_life(A1, 5, 300) + _life(B1, 303, 1_000) + _life(A2, 1_010, None),
                    {A1: BLOB_A, B1: BLOB_B, A2: BLOB_A})
    why = load_reason(ebpf, 1_005 * MS, 2_000 * MS, reloaded=False)
    assert why["reason"].startswith("evicted: this model's runner (pid 10)"), why
    assert why["evicted_for_runner_pid"] == B1 and "started 3 ms after it" in why["reason"]


def test_an_idle_runner_of_another_model_first_seen_after_the_exit_was_running_already() -> None:
    """Measured on v0.34 under load: B's runner, loaded before the capture and idle, printed its
    first event 2.9 s after A's keep_alive-0 exit, which read as "evicted for B". It was running
    when the capture began (children_at_start), so A's runner expired."""
    ebpf = _records(_life(A1, 5, 300) + _life(B1, 3_200, None) + _life(A2, 310, None),
                    {A1: BLOB_A, B1: BLOB_B, A2: BLOB_A})
    why = load_reason(ebpf, 305 * MS, 2_000 * MS, reloaded=False)
    assert why["reason"].startswith("evicted: "), why  # without knowing B was running already
    ebpf.meta["children_at_start"] = [A1, B1]
    assert load_reason(ebpf, 305 * MS, 2_000 * MS, reloaded=False)["reason"].startswith("expired: "), why
    assert {r.pid: r.started_ns for r in runners(ebpf)} == {A1: None, B1: None, A2: 310 * MS}


def test_without_the_runners_model_the_reason_stays_generic() -> None:
    ebpf = _records(_life(A1, 5, 300) + _life(A2, 1_050, None), {})  # a capture from before runner_models
    assert load_reason(ebpf, 1_000 * MS, 2_000 * MS, reloaded=False) == {"reason": COLD}


def _interval(index: int, reason: str) -> dict[str, object]:
    base = index * 10_000 * MS
    load = {"name": "server.model_load", "start_ns": base + MS, "end_ns": base + 401 * MS, "duration_ms": 400.0,
            "process": "server", "source": "ebpf", "attributes": {"reason": reason}}
    return {"index": index, "warmup": False, "kind": "interrupt", "duration_ms": 500.0, "phases": [load],
            "start_ns": base, "end_ns": base + 500 * MS}


def test_the_diagnosis_names_each_kind_of_load() -> None:
    for reason, cause in (("expired: this model's runner (pid 10) exited", "model_expired"),
                          ("evicted: this model's runner (pid 10) was stopped", "model_evicted"),
                          ("cold load: no runner of this model ran earlier", "cold_load"),
                          (RELOAD, "model_reload")):
        findings = diagnosis.diagnose({"intervals": [_interval(i, reason) for i in range(3)]}, {})
        assert [f["cause"] for f in findings] == [cause], (reason, findings)
        assert any(reason in e for e in findings[0]["evidence"]), findings[0]


def _log(second: float, msg: str, **attrs: str) -> str:
    pairs = " ".join(f'{k}="{v}"' if " " in v else f"{k}={v}" for k, v in attrs.items())
    return f'time=2026-12-02T01:54:{second:06.3f}Z level=DEBUG source=sched.go:1 msg="{msg}" {pairs}'


def test_without_ebpf_the_server_log_tells_the_reasons_apart() -> None:
    from ollama_tracer.attribution.log_source import load_reason
    from ollama_tracer.collectors.ollama_log import parse_line as parse_log

    start = _log(9, "starting runner", cmd=f"/bin/ollama runner --model {BLOB_A} --port 1")
    evicted = [_log(1, "max runners achieved, unloading one to make room", runner_count="1"),
               _log(1.001, "resetting model to expire immediately to make room", **{"runner.model": BLOB_A,
                                                                                     "runner.pid": "10"}),
               _log(1.002, "runner expired event received", **{"runner.model": BLOB_A, "runner.pid": "10"}), start]
    expired = [_log(1.002, "runner expired event received", **{"runner.model": BLOB_A, "runner.pid": "10"}), start]
    other = [_log(1.002, "runner expired event received", **{"runner.model": BLOB_B, "runner.pid": "20"}), start]
    for lines, want in ((evicted, "evicted: this model's runner (pid 10)"), (expired, "expired: this model's runner"),
                        (other, "cold load"), ([start], "cold load")):
        events = [e for e in map(parse_log, lines) if e is not None]
        assert load_reason(events, events[-1], reloaded=False).startswith(want), (want, lines)
    assert load_reason(events, events[-1], reloaded=True).startswith("reload")
