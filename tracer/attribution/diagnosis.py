"""Name the known causes of a slow interval, each with the evidence that shows it and the remedy.

Every rule reads only what the capture measured (phases, their attributes, the server log's
cache lines) and returns a finding only when the data shows the cause *and* it matters: at
least ``MATERIAL_MS`` and ``MATERIAL_SHARE`` of the median interval, in at least half of the
measured intervals. No data, no finding: a rule whose evidence is missing stays silent.

A finding (``attribution["diagnosis"]``, the terminal and the HTML report):
``{"cause", "title", "summary", "evidence": [str], "remedy", "impact_ms", "intervals": [int]}``;
``impact_ms`` is the median time the cause took in the intervals that show it.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from ollama_tracer.collectors.probe_catalogue import design_for
from ollama_tracer.units import format_ms
from ollama_tracer.vocabulary import (
    CLIENT_INTERRUPT,
    DESIGN_LLAMA_SERVER,
    OLLAMA_PROMPT_EVAL_CACHED_COUNT,
    OLLAMA_PROMPT_EVAL_COUNT,
    RUNNER_ADMIT,
    SERVER_CANCEL,
    SERVER_MODEL_LOAD,
    SERVER_MODEL_LOOKUP,
    SERVER_RUNNER_HEALTH,
    SERVER_RUNNER_WAIT,
    SERVER_TOKENIZE,
)

_ms = functools.partial(format_ms, digits=None, unit=True)

MATERIAL_MS = 1.0
MATERIAL_SHARE = 0.05
GGUF_CACHE_VERSION = (0, 32, 15)  # Ollama caches model metadata from this version on
SLOW_CLOSE_MS = 5.0  # client.interrupt above this: the client kept the stream open
CACHE_MISS_TOKENS = 32  # evaluated prompt tokens below this cost too little to matter

Finding = dict[str, Any]


def _measured(attribution: dict[str, Any]) -> list[dict[str, Any]]:
    return [iv for iv in attribution.get("intervals", []) if not iv.get("warmup")]


def _phases(interval: dict[str, Any], part: str) -> list[dict[str, Any]]:
    """The interval's phases whose (possibly merged) name contains ``part``."""
    return [p for p in interval.get("phases", []) if part in p["name"]]


def _median_interval(intervals: list[dict[str, Any]]) -> float:
    return statistics.median(iv["duration_ms"] for iv in intervals) if intervals else 0.0


def _material(impact_ms: float, interval_ms: float) -> bool:
    return impact_ms >= MATERIAL_MS and interval_ms > 0 and impact_ms / interval_ms >= MATERIAL_SHARE


def _enough(hit: int, total: int) -> bool:
    return total > 0 and hit * 2 >= total


def _version(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in (text or "").split("-")[0].split(".")[:3])
    except ValueError:
        return None


def gguf_scans(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    hits: list[tuple[int, int, float, float]] = []  # (interval, scans, scan ms, lookup ms)
    for iv in intervals:
        for phase in _phases(iv, "model_lookup"):
            attrs = phase.get("attributes", {})
            scans, scan_ms = attrs.get("gguf_scans"), attrs.get("gguf_scan_ms")
            # The time the scans took (open → close of the blob) is the evidence; without it (other
            # requests' opens interleaved) the count alone says nothing about the cost.
            if isinstance(scans, int) and scans >= 2 and isinstance(scan_ms, (int, float)):
                hits.append((iv["index"], scans, float(scan_ms), phase["duration_ms"]))
                break
    if not _enough(len(hits), len(intervals)):
        return None
    impact = statistics.median(h[2] for h in hits)
    interval_ms = _median_interval(intervals)
    if not _material(impact, interval_ms):
        return None
    scans = statistics.median(h[1] for h in hits)
    version = context.get("ollama_version")
    fixed = _version(version) is not None and _version(version) >= GGUF_CACHE_VERSION  # type: ignore[operator]
    evidence = [f"{scans:g} opens of the model's GGUF blob per request (eBPF openat on the server), "
                f"in {len(hits)} of {len(intervals)} intervals",
                f"reading them took {_ms(impact)} (median), {100 * impact / interval_ms:.0f} % of the "
                f"{_ms(interval_ms)} interval; {SERVER_MODEL_LOOKUP} {_ms(statistics.median(h[3] for h in hits))}"]
    if version:
        evidence.append(f"Ollama {version}")
    return {
        "cause": "gguf_metadata_scans", "title": "Repeated GGUF metadata scans on every request",
        "summary": (f"The server re-reads the model file's metadata {scans:g} times per request "
                    f"(capabilities, scheduling): {_ms(impact)} per request."),
        "evidence": evidence,
        "remedy": ("Unexpected on this version: check whether the model's metadata cache is bypassed." if fixed else
                   "Upgrade Ollama to 0.32.15 or newer, which caches model metadata. Until then the cost grows "
                   "with the vocabulary (gemma3: 262k tokens), so a model with a smaller vocabulary pays less."),
        "impact_ms": round(impact, 3), "intervals": [h[0] for h in hits],
    }


def _loads(intervals: list[dict[str, Any]], kind: str) -> list[tuple[int, float, str]]:
    out = []
    for iv in intervals:
        for phase in _phases(iv, "model_load"):
            reason = str(phase.get("attributes", {}).get("reason", ""))
            if reason.startswith(kind):
                out.append((iv["index"], phase["duration_ms"], reason))
                break
    return out


def _load_finding(intervals: list[dict[str, Any]], kind: str, describe: Callable[[int, float], dict[str, Any]]
                  ) -> Finding | None:
    """A finding for the model loads of one ``kind`` (by the reason the source recorded)."""
    loads = _loads(intervals, kind)
    if not loads:
        return None
    impact = statistics.median(d for _, d, _ in loads)
    if not _material(impact, _median_interval(intervals)):
        return None
    finding = describe(len(loads), impact)
    finding["evidence"].append(f"reason recorded: {loads[0][2]}")
    return {**finding, "impact_ms": round(impact, 3), "intervals": [i for i, _, _ in loads]}


def model_reload(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    return _load_finding(intervals, "reload", lambda n, impact: {
        "cause": "model_reload", "title": "The runner is reloaded because the request's options changed",
        "summary": (f"In {n} of {len(intervals)} intervals the loaded runner did not fit the request and "
                    f"was restarted: {_ms(impact)} (median)."),
        "evidence": [f"{SERVER_MODEL_LOAD} after the loaded runner's check (needsReload) in {n} of "
                     f"{len(intervals)} intervals, median {_ms(impact)}"],
        "remedy": ("Send the same runner options on every request (num_ctx, num_batch, num_gpu, main_gpu, use_mmap, "
                   "num_thread): any change restarts the runner. Set them once in the Modelfile (PARAMETER num_ctx) "
                   "or with OLLAMA_CONTEXT_LENGTH instead of per request."),
    })


def cold_load(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    return _load_finding(intervals, "cold", lambda n, impact: {
        "cause": "cold_load", "title": "The model was not loaded: a cold start",
        "summary": f"{n} interval(s) started a runner from scratch: {_ms(impact)} (median).",
        "evidence": [f"{SERVER_MODEL_LOAD} with no runner loaded in {n} of {len(intervals)} intervals, "
                     f"median {_ms(impact)}"],
        "remedy": ("Keep the model loaded: raise keep_alive on the request or OLLAMA_KEEP_ALIVE (default 5m; -1 keeps "
                   "it loaded), and pre-load it with an empty request before the latency-sensitive work."),
    })


def expired_load(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    return _load_finding(intervals, "expired", lambda n, impact: {
        "cause": "model_expired", "title": "The model had been unloaded: its keep_alive ran out",
        "summary": (f"In {n} of {len(intervals)} intervals the model's runner had exited before the request "
                    f"(keep_alive), and a new one was started: {_ms(impact)} (median)."),
        "evidence": [f"{SERVER_MODEL_LOAD} after this model's previous runner exited, with no other model "
                     f"started in its place, in {n} of {len(intervals)} intervals, median {_ms(impact)}"],
        "remedy": ("Keep the model loaded between requests: a longer keep_alive on the request (never 0 for a model "
                   "you use again) or OLLAMA_KEEP_ALIVE (default 5m; -1 keeps it loaded)."),
    })


def evicted_load(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    return _load_finding(intervals, "evicted", lambda n, impact: {
        "cause": "model_evicted", "title": "The model was evicted to make room for another",
        "summary": (f"In {n} of {len(intervals)} intervals the model's runner had been stopped to load another "
                    f"model, and was started again: {_ms(impact)} (median)."),
        "evidence": [f"{SERVER_MODEL_LOAD} after this model's previous runner exited and another model's runner "
                     f"started right after it, in {n} of {len(intervals)} intervals, median {_ms(impact)}"],
        "remedy": ("Let both models stay loaded: raise OLLAMA_MAX_LOADED_MODELS (default 3 per GPU, 3 on CPU) if "
                   "memory allows, use smaller models or a smaller num_ctx, or group the requests by model."),
    })


def slot_wait(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    hits: list[tuple[int, float, float | None]] = []  # (interval, wait ms, ms it ended after the teardown)
    names: set[str] = set()
    for iv in intervals:
        # Two semaphores hold a new request while the interrupted one keeps its slot: the server's
        # own per-runner one before it posts the completion (server.runner_wait; v0.13 and v0.30+)
        # and, on v0.13, the runner's (runner.admit).
        admits = [p for p in iv.get("phases", []) if p["name"] in (RUNNER_ADMIT, SERVER_RUNNER_WAIT)]
        cancels = [p for p in iv.get("off_critical_path", []) if p["name"] == SERVER_CANCEL]
        if not admits:
            continue
        names.update(p["name"] for p in admits)
        start, end = min(p["start_ns"] for p in admits), max(p["end_ns"] for p in admits)
        after = None
        if cancels and cancels[0]["end_ns"] >= start:
            after = (end - cancels[0]["end_ns"]) / 1e6
        hits.append((iv["index"], sum(p["duration_ms"] for p in admits), after))
    waits = [h for h in hits if h[2] is not None and h[2] >= -1.0]  # admitted once the old sequence was gone
    if not _enough(len(waits), len(intervals)):
        return None
    impact = statistics.median(h[1] for h in waits)
    if not _material(impact, _median_interval(intervals)):
        return None
    parallel = context.get("num_parallel")
    waited = " + ".join(sorted(names, reverse=True))
    return {
        "cause": "slot_wait", "title": "The new request waits for the interrupted one's slot",
        "summary": (f"{waited} waited {_ms(impact)} (median) until the runner removed the interrupted sequence "
                    "and freed its slot."),
        "evidence": [f"in {len(waits)} of {len(intervals)} intervals {waited} overlapped {SERVER_CANCEL} (the "
                     "interrupted request's teardown) and ended "
                     f"{_ms(max(0.0, statistics.median(h[2] or 0.0 for h in waits)))} after it (median)",
                     f"{waited} median {_ms(impact)}"
                     + (f"; OLLAMA_NUM_PARALLEL={parallel}" if parallel else "")],
        "remedy": ("Give the runner a second slot (OLLAMA_NUM_PARALLEL=2, at the cost of KV-cache memory) so the next "
                   "request does not wait for the cancelled one to be torn down, or close the first stream earlier "
                   "so that teardown is over before the next request arrives."),
        "impact_ms": round(impact, 3), "intervals": [h[0] for h in waits],
    }


WHERE_SAID = {"log": "server log 'loading cache slot'",
              "response": "response: prompt_eval_count, prompt_eval_cached_count"}


def prompt_cache_miss(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    slots: list[dict[str, Any]] = context.get("cache_slots") or []
    hits: list[tuple[int, int, int, float, str]] = []  # (interval, prompt tokens, reused, prefill ms, source)
    for iv in intervals:
        slot = next((s for s in slots if iv["start_ns"] - 1_000_000 <= s["time_ns"] <= iv["end_ns"] + 1_000_000),
                    None)
        if slot is None:
            continue
        prefill = sum(p["duration_ms"] for p in _phases(iv, "prefill"))
        if slot["prompt"] - slot["used"] >= CACHE_MISS_TOKENS and slot["used"] * 2 < slot["prompt"]:
            hits.append((iv["index"], slot["prompt"], slot["used"], prefill, slot.get("source", "log")))
    if not _enough(len(hits), len(intervals)):
        return None
    impact = statistics.median(h[3] for h in hits)
    if not _material(impact, _median_interval(intervals)):
        return None
    return {
        "cause": "prompt_cache_miss", "title": "Most of the prompt is evaluated again: little comes from the cache",
        "summary": (f"In {len(hits)} of {len(intervals)} intervals the runner took less than half of the prompt "
                    f"from its cache and evaluated the rest; prefill took {_ms(impact)} (median)."),
        "evidence": [f"{WHERE_SAID[h[4]]}: prompt {h[1]} tokens, reused {h[2]}, evaluated {h[1] - h[2]} "
                     f"(interval {h[0]})" for h in hits[:3]],
        "remedy": ("If consecutive requests share a prefix (system prompt, template, earlier turns), keep it "
                   "byte-identical and the num_ctx the same, and avoid truncation, so the runner reuses it; with "
                   "OLLAMA_NUM_PARALLEL > 1 a request may land in a slot whose cache holds another prefix. If they "
                   "share nothing, this prefill is the real cost of the new prompt: shorten it."),
        "impact_ms": round(impact, 3), "intervals": [h[0] for h in hits],
    }


def late_close(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    hits = [(iv["index"], p["duration_ms"]) for iv in intervals for p in iv.get("phases", [])
            if p["name"] == CLIENT_INTERRUPT and p["duration_ms"] >= SLOW_CLOSE_MS]
    if not _enough(len(hits), len(intervals)):
        return None
    impact = statistics.median(d for _, d in hits)
    if not _material(impact, _median_interval(intervals)):
        return None
    return {
        "cause": "late_close", "title": "The client closes the interrupted stream late",
        "summary": (f"From deciding to interrupt to closing the first stream's connection took {_ms(impact)} "
                    "(median); the server goes on generating until it sees the close."),
        "evidence": [f"{CLIENT_INTERRUPT} {_ms(impact)} (median) in {len(hits)} of {len(intervals)} intervals "
                     f"(over {SLOW_CLOSE_MS:g} ms)"],
        "remedy": ("Close the response as soon as you stop reading: `stream.close()` on the ollama client's "
                   "iterator, `response.close()` with requests, or leave the `with` block; do not drain the rest of "
                   "the stream or wait for the garbage collector."),
        "impact_ms": round(impact, 3), "intervals": [i for i, _ in hits],
    }


ROUND_TRIPS = (SERVER_RUNNER_HEALTH, SERVER_TOKENIZE)  # the semaphore wait before them is slot_wait's


def runner_round_trips(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    """v0.30+: the calls the server makes to llama-server before the completion, each on a new
    connection, when together they are a material part of the interval."""
    version = context.get("ollama_version")
    if version and design_for(str(version)) != DESIGN_LLAMA_SERVER:
        return None  # v0.13's one GET /health per completion goes over a kept-alive connection
    calls = ROUND_TRIPS
    per_interval = [(iv["index"], sum(p["duration_ms"] for p in iv.get("phases", []) if p["name"] in ROUND_TRIPS),
                     sum(1 for p in iv.get("phases", []) if p["name"] in calls)) for iv in intervals]
    hits = [(index, ms, n) for index, ms, n in per_interval if n]
    if not _enough(len(hits), len(intervals)):
        return None
    impact = statistics.median(ms for _, ms, _ in hits)
    if not _material(impact, _median_interval(intervals)):
        return None
    return {
        "cause": "runner_round_trips", "title": "The server's round trips to llama-server before each completion",
        "summary": (f"Before the completion the server calls llama-server {statistics.median(n for *_, n in hits):g} "
                    f"times (GET /health twice, POST /tokenize), each on a new connection: {_ms(impact)} "
                    "per request (median)."),
        "evidence": [f"{', '.join(ROUND_TRIPS)}: {_ms(impact)} (median) in {len(hits)} of {len(intervals)} intervals"],
        "remedy": ("This is Ollama's v0.30+ design (no keep-alive to its runner), not a setting: it costs most on a "
                   "loaded machine, where every new connection waits for the scheduler. Keep the machine's other load "
                   "off the cores Ollama runs on, or talk to llama-server directly where its API is enough."),
        "impact_ms": round(impact, 3), "intervals": [i for i, *_ in hits],
    }


def stalled_request(intervals: list[dict[str, Any]], context: dict[str, Any]) -> Finding | None:
    """A request that never got a first token, waiting in a known phase until the client gave up:
    in server.runner_wait it is the interrupt stall (the runner semaphore never released)."""
    from ollama_tracer.attribution.unanswered import stuck

    hits = stuck(context.get("unanswered") or [])
    if not hits:
        return None
    where = statistics.multimode(h["stuck_in"] for h in hits)[0]
    waited = statistics.median(h["stuck_ms"] for h in hits)
    semaphore = where == SERVER_RUNNER_WAIT
    return {
        "cause": "stalled_request", "title": "A request got no answer: the server is stuck",
        "summary": (f"{len(hits)} request(s) got no first token; the server reached {where} and waited there "
                    f"{_ms(waited)} (median) until the client gave up."
                    + (" That is the wait for the runner's semaphore, which an earlier interrupted request still "
                       "holds: Ollama's interrupt stall." if semaphore else "")),
        "evidence": [f"request {h['trace_id']} ({h['model']}): last boundary {h['last_boundary']}, then "
                     f"{_ms(h['stuck_ms'])} in {h['stuck_in']}" + (f"; the client said: {h['error']}" if h["error"]
                                                                  else "") for h in hits[:3]],
        "remedy": ("Unload the model (a request with keep_alive 0, or `ollama stop MODEL`) or restart Ollama; send "
                   "requests you may interrupt with \"stream\": false to avoid it (docs/interrupt-stall.md)."
                   if semaphore else f"Look at what the server does in {where} (native stacks: `--show stacks`)."),
        "impact_ms": round(waited, 3), "intervals": [],
    }


RULES: tuple[Callable[[list[dict[str, Any]], dict[str, Any]], Finding | None], ...] = (
    gguf_scans, model_reload, cold_load, expired_load, evicted_load, slot_wait, prompt_cache_miss, late_close,
    runner_round_trips, stalled_request)


def cache_slots(log_events: Iterable[Any], spans: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """How many prompt tokens the runner reused from its cache, per request: the v0.13 runner's
    'loading cache slot' lines, or the v0.30+ response's prompt_eval_cached_count (llama-server's
    own lines say it too, but carry no time to tie them to a request)."""
    out = []
    for event in log_events:
        if getattr(event, "msg", "") != "loading cache slot":
            continue
        try:
            out.append({"time_ns": int(event.time_ns), "prompt": int(event.attrs["prompt"]),
                        "used": int(event.attrs["used"]), "source": "log"})
        except (KeyError, ValueError, TypeError):
            continue
    for span in spans:
        attributes = span.get("attributes") or {}
        prompt, cached = attributes.get(OLLAMA_PROMPT_EVAL_COUNT), attributes.get(OLLAMA_PROMPT_EVAL_CACHED_COUNT)
        if isinstance(prompt, int) and isinstance(cached, int):
            out.append({"time_ns": int(span["startTimeUnixNano"]), "prompt": prompt, "used": cached,
                        "source": "response"})
    return out


def diagnose(attribution: dict[str, Any], context: dict[str, Any]) -> list[Finding]:
    """The findings, largest impact first. ``context``: ollama_version, num_parallel, cache_slots,
    unanswered (requests without a first token, ``attribution.unanswered``)."""
    intervals = _measured(attribution)
    findings = [f for rule in RULES if (f := rule(intervals, context)) is not None]
    return sorted(findings, key=lambda f: -(f.get("impact_ms") or 0.0))
