"""The seed's interrupt benchmark: stream, interrupt after N ms, immediately stream again.

Each iteration is one trace. The interval of interest runs from the moment the interrupt is
decided to the moment the second stage's first chunk is handed to the caller.

The interrupt is chunk-driven, as in the seed: after each first-stage chunk the loop checks
the elapsed time and, once it is past N ms, closes the stream (which closes the TCP
connection). ``first_stage_ms`` is therefore N plus up to one inter-token gap.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from ollama_tracer import netstat
from ollama_tracer.attribution.response import ResponseTimings, response_phases
from ollama_tracer.bench.backends import BACKEND_OLLAMA, Backend
from ollama_tracer.instrument import genai
from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import (
    CLIENT_INTERRUPT,
    GEN_AI_REQUEST_MODEL,
    SOURCE_CLIENT,
    SPAN_BENCH_ITERATION,
    TRACER_BENCH_BACKEND,
    TRACER_BENCH_CLIENT,
    TRACER_CLOCK,
    TRACER_INTERVAL_MS,
    TRACER_ITERATION_INDEX,
    TRACER_PROCESS,
    TRACER_SOURCE,
    TRACER_WARMUP,
)
from opentelemetry import trace
from opentelemetry.trace import Span

SCHEMA = "tracer.bench.interrupt/1"

DEFAULT_PROMPT = (
    "Write a long, detailed story about a river that runs through a mountain city. Describe the "
    "people who live along it, the history of every bridge, and the seasons, one after another."
)
DEFAULT_SECOND_PROMPT = "Now answer a different question: explain, in detail, how rivers shape cities."


@dataclass(frozen=True)
class BenchOptions:
    host: str | None  # None: an in-process engine (llama-cpp-python)
    model: str
    client: str = "sdk"  # bench.backends.CLIENTS: "sdk" (the ollama package), "http" (requests), ...
    backend: str = BACKEND_OLLAMA
    interrupt_after_ms: float = 500.0
    iterations: int = 4
    warmup: int = 1
    prompt: str = DEFAULT_PROMPT
    second_prompt: str = DEFAULT_SECOND_PROMPT
    num_predict: int = 16
    num_ctx: int | None = None
    # options.num_ctx for the second stage only: a runner loaded for one context size cannot serve
    # another, so Ollama reloads the runner inside every interval (a measurable model-load phase).
    second_num_ctx: int | None = None
    record_content: bool = False
    request_timeout_s: float = 120.0  # a stalled server becomes an error, never a hang

    def to_json(self) -> dict[str, Any]:
        payload = {
            "host": self.host, "backend": self.backend, "client": self.client,
            "interrupt_after_ms": self.interrupt_after_ms,
            "iterations": self.iterations, "warmup": self.warmup, "num_predict": self.num_predict,
            "num_ctx": self.num_ctx, "second_num_ctx": self.second_num_ctx, "record_content": self.record_content,
            "request_timeout_s": self.request_timeout_s,
            "prompt_chars": len(self.prompt), "second_prompt_chars": len(self.second_prompt),
        }
        if self.record_content:
            payload |= {"prompt": self.prompt, "second_prompt": self.second_prompt}
        return payload


@dataclass
class Iteration:
    index: int
    warmup: bool
    first_stage_ms: float
    second_stage_ms: float
    interrupt_to_first_token_ms: float
    second_stage_timings: dict[str, float]
    prompt_eval_count: int | None
    eval_count: int | None
    disconnect_verified: bool | None
    trace_id: str | None
    phases: list[Phase] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "warmup": self.warmup,
            "first_stage_ms": round(self.first_stage_ms, 3),
            "second_stage_ms": round(self.second_stage_ms, 3),
            "interrupt_to_first_token_ms": round(self.interrupt_to_first_token_ms, 3),
            "second_stage_timings": {k: round(v, 3) for k, v in self.second_stage_timings.items()},
            "prompt_eval_count": self.prompt_eval_count,
            "eval_count": self.eval_count,
            "disconnect_verified": self.disconnect_verified,
            "trace_id": self.trace_id,
            "phases": [p.to_json() for p in self.phases],
        }


def run_iteration(client: Backend, opts: BenchOptions, index: int, warmup: bool, tracer: trace.Tracer) -> Iteration:
    with tracer.start_as_current_span(
        SPAN_BENCH_ITERATION,
        attributes={TRACER_ITERATION_INDEX: index, TRACER_WARMUP: warmup,
                    GEN_AI_REQUEST_MODEL: opts.model, TRACER_BENCH_CLIENT: opts.client,
                    TRACER_BENCH_BACKEND: opts.backend},
    ) as root:
        first_start = time.time_ns()
        deadline = first_start + int(opts.interrupt_after_ms * 1e6)
        first = client.stream(opts.prompt, None, opts.num_ctx)
        interrupted = False
        open_ports: set[int] | None = None
        for _ in first:
            if open_ports is None and opts.host is not None:  # once, at the first chunk: outside the interval
                open_ports = netstat.own_client_ports(opts.host)
            if time.time_ns() >= deadline:
                interrupted = True
                break
        decided = time.time_ns()
        first.close()
        closed = time.time_ns()
        if not interrupted:
            raise RuntimeError(
                f"the first stage finished before the {opts.interrupt_after_ms:g} ms interrupt; "
                "use a longer --prompt or a shorter --interrupt-after-ms"
            )
        _span(tracer, CLIENT_INTERRUPT, decided, closed, {TRACER_SOURCE: SOURCE_CLIENT})

        second_start = time.time_ns()
        second_num_ctx = opts.second_num_ctx if opts.second_num_ctx is not None else opts.num_ctx
        # "{iteration}" in the prompt makes each one its own: no runner prompt cache can serve it.
        second = client.stream(opts.second_prompt.replace("{iteration}", str(index)), opts.num_predict,
                               second_num_ctx)
        recorder = genai.LAST_RECORDER.get()
        first_token: int | None = None
        final: dict[str, Any] = {}
        for part in second:
            if first_token is None:
                first_token = time.time_ns()
            if part.get("done"):
                final = part
        second_end = time.time_ns()
        if first_token is None:
            raise RuntimeError("the second stage returned no chunk")
        phases = _response_phases(recorder, final)
        for phase in phases:
            _span(tracer, phase.name, phase.start_ns, phase.end_ns,
                  {TRACER_SOURCE: phase.source, TRACER_PROCESS: phase.process,
                   TRACER_CLOCK: "server wall clock (same host)"})
        root.set_attribute(TRACER_INTERVAL_MS, (first_token - decided) / 1e6)
        trace_id = _trace_id(root)
    return Iteration(
        index=index,
        warmup=warmup,
        first_stage_ms=(decided - first_start) / 1e6,
        second_stage_ms=(second_end - second_start) / 1e6,
        interrupt_to_first_token_ms=(first_token - decided) / 1e6,
        second_stage_timings={
            f"{key}_ms": final.get(f"{key}_duration", 0) / 1e6
            for key in ("total", "load", "prompt_eval", "eval")
        },
        prompt_eval_count=final.get("prompt_eval_count"),
        eval_count=final.get("eval_count"),
        disconnect_verified=_verify_disconnect(opts.host, open_ports or set()) if opts.host is not None else None,
        trace_id=trace_id,
        phases=phases,
    )


def _verify_disconnect(host: str, open_during_first_stage: set[int]) -> bool | None:
    """Did the server close its end of the interrupted connection? None if it cannot be told."""
    closed_by_us = open_during_first_stage - netstat.own_client_ports(host)
    if not closed_by_us:
        return None
    verdicts = [netstat.server_saw_close(host, port) for port in closed_by_us]
    if any(v is None for v in verdicts):
        return None
    return all(verdicts)


def _span(tracer: trace.Tracer, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
    span = tracer.start_span(name, start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)


def _trace_id(span: Span) -> str | None:
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def _response_phases(recorder: genai.StreamRecorder | None, final: dict[str, Any]) -> list[Phase]:
    if (
        recorder is None
        or recorder.written_ns is None
        or recorder.first_chunk_created_ns is None
        or recorder.last_chunk_created_ns is None
        or not final.get("total_duration")
    ):
        return []
    timings = ResponseTimings(
        request_written_ns=recorder.written_ns,
        response_start_ns=recorder.response_start_ns or recorder.first_token_ns or recorder.written_ns,
        first_created_ns=recorder.first_chunk_created_ns,
        last_created_ns=recorder.last_chunk_created_ns,
        total_duration_ns=int(final["total_duration"]),
        load_duration_ns=int(final.get("load_duration", 0)),
        prompt_eval_duration_ns=int(final.get("prompt_eval_duration", 0)),
    )
    return response_phases(timings)


def summarize(values: list[float]) -> dict[str, float | None]:
    """mean, median, min, max and the *sample* standard deviation (n−1), as the seed reported."""
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None, "stdev": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else math.nan,
        "n": len(values),
    }


def summary(iterations: list[Iteration]) -> dict[str, dict[str, float | None]]:
    measured = [it for it in iterations if not it.warmup]
    figures: dict[str, list[float]] = {
        "first_stage_ms": [it.first_stage_ms for it in measured],
        "second_stage_ms": [it.second_stage_ms for it in measured],
        "interrupt_to_first_token_ms": [it.interrupt_to_first_token_ms for it in measured],
    }
    for key in ("total_ms", "load_ms", "prompt_eval_ms", "eval_ms"):
        figures[f"second_stage_{key}"] = [it.second_stage_timings[key] for it in measured]
    phase_names = [p.name for p in measured[0].phases] if measured else []
    for name in phase_names:
        figures[f"phase:{name}"] = [
            p.duration_ms for it in measured for p in it.phases if p.name == name
        ]
    return {name: summarize(values) for name, values in figures.items()}
