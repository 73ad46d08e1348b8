"""Each known cause: found from its evidence, silent without it or when it does not matter."""

from __future__ import annotations

from typing import Any

from ollama_tracer.attribution.diagnosis import cache_slots, diagnose
from ollama_tracer.collectors.ollama_log import parse_line

MS = 1_000_000


def _phase(name: str, start_ms: float, end_ms: float, **attributes: Any) -> dict[str, Any]:
    phase = {"name": name, "start_ns": int(start_ms * MS), "end_ns": int(end_ms * MS),
             "duration_ms": end_ms - start_ms, "source": "ebpf", "process": name.split(".")[0]}
    if attributes:
        phase["attributes"] = attributes
    return phase


def _interval(index: int, phases: list[dict[str, Any]], off: list[dict[str, Any]] | None = None,
              warmup: bool = False) -> dict[str, Any]:
    start, end = phases[0]["start_ns"], phases[-1]["end_ns"]
    return {"index": index, "warmup": warmup, "start_ns": start, "end_ns": end, "duration_ms": (end - start) / MS,
            "phases": phases, "off_critical_path": off or []}


def _gemma(index: int, scans: int = 3, scan_ms: float = 95.0) -> dict[str, Any]:
    base = index * 10_000
    return _interval(index, [
        _phase("client.interrupt", base, base + 0.4),
        _phase("server.model_lookup", base + 0.4, base + 100.4, gguf_scans=scans, gguf_scan_ms=scan_ms,
               blob_opens=scans),
        _phase("runner.admit", base + 100.4, base + 101),
        _phase("runner.prefill", base + 101, base + 121),
    ])


def _causes(intervals: list[dict[str, Any]], **context: Any) -> list[str]:
    return [f["cause"] for f in diagnose({"intervals": intervals}, context)]


def test_gguf_scans_are_named_with_their_evidence_and_the_fixed_version() -> None:
    findings = diagnose({"intervals": [_gemma(i) for i in range(4)]}, {"ollama_version": "0.13.5"})
    assert [f["cause"] for f in findings] == ["gguf_metadata_scans"]
    finding = findings[0]
    assert finding["impact_ms"] == 95.0 and finding["intervals"] == [0, 1, 2, 3]
    assert any("3 opens" in line for line in finding["evidence"]) and "0.32.15" in finding["remedy"]


def test_cheap_scans_and_warmups_are_not_findings() -> None:
    # llama's vocabulary: three scans of well under a millisecond do not matter
    assert _causes([_gemma(i, scan_ms=0.4) for i in range(4)]) == []
    # one scan per request is not "repeated"
    assert _causes([_gemma(i, scans=1) for i in range(4)]) == []
    # only the warm-up shows it
    assert _causes([_gemma(0) | {"warmup": True}, *[_gemma(i, scan_ms=0.4) for i in range(1, 4)]]) == []


def test_reload_and_cold_load_are_told_apart_by_their_recorded_reason() -> None:
    def loading(index: int, reason: str) -> dict[str, Any]:
        base = index * 10_000
        return _interval(index, [_phase("server.schedule", base, base + 1),
                                 _phase("server.model_load", base + 1, base + 301, reason=reason),
                                 _phase("runner.prefill", base + 301, base + 310)])

    assert _causes([loading(i, "reload: the loaded runner did not fit the request") for i in range(3)]) == [
        "model_reload"]
    assert _causes([loading(0, "cold load: no runner was loaded"), _gemma(1, scan_ms=0.1)]) == ["cold_load"]


def test_slot_wait_needs_the_admission_to_follow_the_teardown() -> None:
    def waiting(index: int, teardown_end_ms: float) -> dict[str, Any]:
        base = index * 10_000
        return _interval(index, [_phase("client.interrupt", base, base + 1),
                                 _phase("runner.admit", base + 1, base + 41),
                                 _phase("runner.prefill", base + 41, base + 50)],
                         off=[_phase("server.cancel", base + 0.5, base + teardown_end_ms)])

    findings = diagnose({"intervals": [waiting(i, 40.5) for i in range(4)]}, {"num_parallel": "1"})
    assert [f["cause"] for f in findings] == ["slot_wait"] and findings[0]["impact_ms"] == 40.0
    assert "OLLAMA_NUM_PARALLEL=1" in " ".join(findings[0]["evidence"])
    # the teardown ended before admission began: the wait was something else, not named here
    assert _causes([waiting(i, 0.8) for i in range(4)]) == []


def test_slot_wait_in_the_servers_semaphore_and_the_runners_is_one_wait() -> None:
    def waiting(index: int) -> dict[str, Any]:  # the server's semaphore 30 ms, then the runner's 6 ms
        base = index * 10_000
        return _interval(index, [_phase("client.interrupt", base, base + 1),
                                 _phase("server.runner_wait", base + 1, base + 31),
                                 _phase("server.runner_health", base + 31, base + 32),
                                 _phase("runner.admit", base + 32, base + 38),
                                 _phase("runner.prefill", base + 38, base + 45)],
                         off=[_phase("server.cancel", base + 0.5, base + 37)])

    findings = diagnose({"intervals": [waiting(i) for i in range(4)]}, {"ollama_version": "0.13.5"})
    assert [f["cause"] for f in findings] == ["slot_wait"] and findings[0]["impact_ms"] == 36.0
    assert findings[0]["summary"].startswith("server.runner_wait + runner.admit waited 36")


def test_prompt_cache_miss_reads_the_runners_cache_slot_lines() -> None:
    lines = [f'time=1970-01-01T00:00:{i * 10:02d}.005Z level=DEBUG source=cache.go:104 msg="loading cache slot" '
             f"id=0 cache=0 prompt=400 used={used} remaining={400 - used}" for i, used in enumerate((0, 0, 390))]
    slots = cache_slots(e for e in map(parse_line, lines) if e is not None)
    assert [s["used"] for s in slots] == [0, 0, 390]

    def prefilling(index: int) -> dict[str, Any]:
        base = index * 10_000
        return _interval(index, [_phase("runner.admit", base, base + 1), _phase("runner.prefill", base + 1, base + 81)])

    findings = diagnose({"intervals": [prefilling(i) for i in range(3)]}, {"cache_slots": slots})
    assert [f["cause"] for f in findings] == ["prompt_cache_miss"]
    assert findings[0]["intervals"] == [0, 1] and "reused 0" in findings[0]["evidence"][0]
    assert _causes([prefilling(i) for i in range(3)]) == []  # no log: no finding


def test_a_late_close_by_the_client() -> None:
    def closing(index: int, close_ms: float) -> dict[str, Any]:
        base = index * 10_000
        return _interval(index, [_phase("client.interrupt", base, base + close_ms),
                                 _phase("runner.prefill", base + close_ms, base + close_ms + 20)])

    assert _causes([closing(i, 30) for i in range(3)]) == ["late_close"]
    assert _causes([closing(i, 0.4) for i in range(3)]) == []


def test_findings_come_largest_first() -> None:
    both = [_gemma(i) for i in range(3)]
    for interval in both:
        interval["phases"][0]["end_ns"] = interval["phases"][0]["start_ns"] + 10 * MS
        interval["phases"][0]["duration_ms"] = 10.0
    assert [f["cause"] for f in diagnose({"intervals": both}, {})] == ["gguf_metadata_scans", "late_close"]


def test_prompt_cache_miss_on_llama_server_reads_the_responses_cached_count() -> None:
    """v0.30+: the final chunk's prompt_eval_cached_count says what llama-server took from its cache."""

    def prefilling(index: int) -> dict[str, Any]:
        base = index * 10_000
        return _interval(index, [_phase("runner.admit", base, base + 1), _phase("runner.prefill", base + 1, base + 81)])

    def request(index: int, cached: int) -> dict[str, Any]:
        return {"startTimeUnixNano": (index * 10_000 + 0.5) * MS,
                "attributes": {"ollama.prompt_eval_count": 400, "ollama.prompt_eval_cached_count": cached}}

    slots = cache_slots([], [request(0, 3), request(1, 3), request(2, 3)])
    assert [(s["prompt"], s["used"], s["source"]) for s in slots] == [(400, 3, "response")] * 3
    findings = diagnose({"intervals": [prefilling(i) for i in range(3)]}, {"cache_slots": slots})
    assert [f["cause"] for f in findings] == ["prompt_cache_miss"]
    assert findings[0]["evidence"][0].startswith("response: prompt_eval_count, prompt_eval_cached_count: prompt 400")
    reused = cache_slots([], [request(i, 396) for i in range(3)])  # the prefix came from the cache
    assert _causes([prefilling(i) for i in range(3)], cache_slots=reused) == []
    assert cache_slots([], [{"startTimeUnixNano": 0, "attributes": {"ollama.prompt_eval_count": 400}}]) == []


def test_round_trips_to_llama_server_are_named_when_material() -> None:
    def v034(index: int, health_ms: float, end_ms: float = 12) -> dict[str, Any]:
        base = index * 10_000
        return _interval(index, [
            _phase("server.model_lookup", base, base + 1),
            _phase("server.runner_health", base + 1, base + 1 + health_ms),
            _phase("server.tokenize", base + 1 + health_ms, base + 2 + health_ms),
            _phase("server.runner_wait", base + 2 + health_ms, base + 2.2 + health_ms),
            _phase("server.runner_health", base + 2.2 + health_ms, base + 2.2 + 2 * health_ms),
            _phase("runner.prefill", base + 2.2 + 2 * health_ms, base + end_ms),
        ])

    findings = diagnose({"intervals": [v034(i, 1.0) for i in range(3)]}, {})
    assert [f["cause"] for f in findings] == ["runner_round_trips"]
    # health twice, tokenize; the semaphore wait between them is slot_wait's, not a round trip
    assert findings[0]["impact_ms"] == 3.0 and "3 times" in findings[0]["summary"]
    # v0.13's one health check per completion is not this design's cost
    assert diagnose({"intervals": [v034(i, 1.0) for i in range(3)]}, {"ollama_version": "0.13.5"}) == []
    assert _causes([v034(i, 0.01, end_ms=100) for i in range(3)]) == []  # 1.2 ms of 100: immaterial
    assert _causes([_gemma(i, scans=0, scan_ms=0.0) for i in range(3)]) == []  # v0.13: no round trips
