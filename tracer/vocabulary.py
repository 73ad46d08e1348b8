"""The project's vocabulary: every phase name, process, source, span name and attribute key.

Code names a phase or an attribute through these constants, never a string literal, so that a
typo is an ``ImportError``/``AttributeError`` instead of a new phase or a silently missing key.

The phases (the contract every part speaks, in critical-path order; docs/architecture.md, "The phases"):

=========================  =========================================================================
phase                      from → to
=========================  =========================================================================
``client.interrupt``       interrupt decided → first stream's connection closed
``client.gap``             (no ``client.interrupt`` span) cancelled stream closed → next request built
``client.request``         second request built → its bytes written to the socket
``server.receive``         request bytes at the server → handler entry (accept, HTTP parse, middleware)
``server.decode``          handler entry → JSON bound
``server.model_lookup``    manifests, model config, GGUF metadata scans (opens of the model blob)
``server.schedule``        scheduler → runner acquired
``server.model_load``      a runner is started (cold load, or a reload): inside the schedule, its own phase
``server.handoff``         templating, semaphore, ``/health``, POST to the runner → runner handler entry
``runner.admit``           tokenize, slot wait, prompt-cache lookup
``runner.prefill``         prompt evaluation until the first token's logits
``runner.sample``          first token sampled and flushed by the runner
``server.stream``          runner's first chunk → server writes it to the client socket
``client.first_token``     bytes at the client → first token parsed and handed to the caller
``proxy.request``          through ``tracer proxy``: the proxy's ``client.request`` hop (its added latency)
``proxy.first_token``      through ``tracer proxy``: the proxy's ``client.first_token`` hop
``server.cancel``          off the critical path: the interrupted request's teardown (the server reads
                           EOF → the runner removes the sequence)
=========================  =========================================================================

Ollama v0.30+ (the llama-server design) adds what is new there: the server calls its runner over a
new TCP connection per call before the completion, and each round trip is a phase of its own.

=========================  =========================================================================
``server.runner_health``   ``GET /health`` written to llama-server → its answer read (twice: in
                           ``needsReload``, and again inside ``Completion``)
``server.tokenize``        ``POST /tokenize`` written → its answer read (the truncation check)
``server.runner_wait``     ``Completion`` entered → the runner's semaphore acquired (queued behind
                           another request to the same runner)
=========================  =========================================================================
On that design ``server.handoff`` is the server's own work between the round trips (the prompt
template, building the request) and the ``POST /completion`` hop; ``runner.admit`` is llama-server's
HTTP thread taking the request → the main loop's first prefill batch (task queue, slot selection,
prompt-cache lookup).

A phase that a source cannot split is one merged phase named by :func:`merged_name`
(``server.decode+model_lookup``), never a guess at the split.

GenAI attribute names are the OpenTelemetry semantic conventions' own constants, re-exported
here, as the OpenTelemetry contrib instrumentations use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# Re-exported (``X as X``): the semantic conventions' names, for the modules that use them.
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_INPUT_MESSAGES as GEN_AI_INPUT_MESSAGES,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OPERATION_NAME as GEN_AI_OPERATION_NAME,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OUTPUT_MESSAGES as GEN_AI_OUTPUT_MESSAGES,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_PROVIDER_NAME as GEN_AI_PROVIDER_NAME,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_REQUEST_MAX_TOKENS as GEN_AI_REQUEST_MAX_TOKENS,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_REQUEST_MODEL as GEN_AI_REQUEST_MODEL,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_REQUEST_STREAM as GEN_AI_REQUEST_STREAM,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_RESPONSE_FINISH_REASONS as GEN_AI_RESPONSE_FINISH_REASONS,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_RESPONSE_MODEL as GEN_AI_RESPONSE_MODEL,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK as GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_USAGE_INPUT_TOKENS as GEN_AI_USAGE_INPUT_TOKENS,
)
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_USAGE_OUTPUT_TOKENS as GEN_AI_USAGE_OUTPUT_TOKENS,
)
from opentelemetry.semconv._incubating.attributes.process_attributes import PROCESS_PID as PROCESS_PID
from opentelemetry.semconv._incubating.attributes.thread_attributes import THREAD_ID as THREAD_ID
from opentelemetry.semconv.attributes.client_attributes import CLIENT_ADDRESS as CLIENT_ADDRESS
from opentelemetry.semconv.attributes.client_attributes import CLIENT_PORT as CLIENT_PORT
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE as ERROR_TYPE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS as SERVER_ADDRESS
from opentelemetry.semconv.attributes.server_attributes import SERVER_PORT as SERVER_PORT
from opentelemetry.semconv.attributes.service_attributes import SERVICE_INSTANCE_ID as SERVICE_INSTANCE_ID
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME as SERVICE_NAME

# -- processes (a phase's ``process``; the eBPF collector's pid roles) ----------------------------
PROCESS_CLIENT: Final = "client"
PROCESS_SERVER: Final = "server"
PROCESS_RUNNER: Final = "runner"
PROCESS_PROXY: Final = "proxy"
# A userland port forwarder in front of the server (Docker's docker-proxy for a published port).
PROCESS_FORWARDER: Final = "forwarder"
# An Ollama process of another server on the same machine (same comm, not this server's tree):
# its events are recorded by the comm filter and left out when the capture is read.
PROCESS_OTHER: Final = "other"
PROCESSES: Final = (PROCESS_CLIENT, PROCESS_PROXY, PROCESS_FORWARDER, PROCESS_SERVER, PROCESS_RUNNER)

# -- sources (a phase's ``source``: what measured it) ------------------------------------------------
SOURCE_CLIENT: Final = "client"
SOURCE_EBPF: Final = "ebpf"
SOURCE_LOG: Final = "log"
SOURCE_RESPONSE: Final = "response"
# How finely each source places a boundary, in ms: the client's and the response fields' clocks
# are nanosecond wall clocks on this host (µs in practice); an eBPF boundary is a bpftrace
# timestamp moved onto that clock (about 0.1 µs of alignment error) plus the ~10 µs a uprobe hit
# costs; Ollama v0.13's log lines carry millisecond timestamps (llama-server's carry none and are
# never used for time). Every phase in attribution.json says its own (``resolution_ms``).
SOURCE_RESOLUTION_MS: Final = {"client": 0.001, "ebpf": 0.01, "log": 1.0, "response": 0.001}
SOURCES: Final = (SOURCE_CLIENT, SOURCE_EBPF, SOURCE_LOG, SOURCE_RESPONSE)

# -- services (the OTel service.name of each process's spans) -----------------------------------------
SERVICE_CLIENT: Final = "ollama-client"
SERVICE_SERVER: Final = "ollama-server"
SERVICE_RUNNER: Final = "ollama-runner"
SERVICE_PROXY: Final = "ollama-proxy"
SERVICE_FORWARDER: Final = "ollama-forwarder"
SERVICE_BY_PROCESS: Final = {PROCESS_CLIENT: SERVICE_CLIENT, PROCESS_SERVER: SERVICE_SERVER,
                             PROCESS_RUNNER: SERVICE_RUNNER, PROCESS_PROXY: SERVICE_PROXY,
                             PROCESS_FORWARDER: SERVICE_FORWARDER}

# -- phases ---------------------------------------------------------------------------------------------
CLIENT_INTERRUPT: Final = "client.interrupt"
CLIENT_GAP: Final = "client.gap"
CLIENT_REQUEST: Final = "client.request"
SERVER_RECEIVE: Final = "server.receive"
SERVER_DECODE: Final = "server.decode"
SERVER_MODEL_LOOKUP: Final = "server.model_lookup"
SERVER_SCHEDULE: Final = "server.schedule"
SERVER_MODEL_LOAD: Final = "server.model_load"
SERVER_HANDOFF: Final = "server.handoff"
RUNNER_ADMIT: Final = "runner.admit"
RUNNER_PREFILL: Final = "runner.prefill"
RUNNER_SAMPLE: Final = "runner.sample"
SERVER_STREAM: Final = "server.stream"
CLIENT_FIRST_TOKEN: Final = "client.first_token"
PROXY_REQUEST: Final = "proxy.request"
PROXY_FIRST_TOKEN: Final = "proxy.first_token"
# The forwarder's hops (eBPF): from its read of the client's request to the server's; from the
# server's first response write to the forwarder's write of it to the client.
FORWARDER_REQUEST: Final = "forwarder.request"
FORWARDER_RESPONSE: Final = "forwarder.response"
SERVER_CANCEL: Final = "server.cancel"
SERVER_RUNNER_HEALTH: Final = "server.runner_health"  # a GET /health round trip to the runner
SERVER_TOKENIZE: Final = "server.tokenize"  # v0.30+: the POST /tokenize round trip
SERVER_RUNNER_WAIT: Final = "server.runner_wait"  # waiting for the server's per-runner semaphore
# A request only the server saw (an uninstrumented client): from the server reading the client's
# close to reading its next request, the server waits on the client; the client's own time and the
# network's are in it and cannot be told apart from the server's side. ``client.gap``'s stand-in.
SERVER_AWAITING_CLIENT: Final = "server.awaiting_client"

# The phases of an interrupt→first-token interval in critical-path order, as docs/architecture.md lists them.
# ``server.model_load`` (only when a runner is started) lies inside ``server.schedule``;
# ``client.gap`` stands in for ``client.interrupt``; ``server.cancel`` is off the critical path.
CRITICAL_PATH: Final = (
    CLIENT_INTERRUPT, CLIENT_REQUEST, SERVER_RECEIVE, SERVER_DECODE, SERVER_MODEL_LOOKUP, SERVER_SCHEDULE,
    SERVER_HANDOFF, RUNNER_ADMIT, RUNNER_PREFILL, RUNNER_SAMPLE, SERVER_STREAM, CLIENT_FIRST_TOKEN,
)
OFF_CRITICAL_PATH: Final = (SERVER_CANCEL,)
# A client hop as the proxy's own phase when the spans came through `tracer proxy`.
PROXY_PHASE_OF: Final = {CLIENT_REQUEST: PROXY_REQUEST, CLIENT_FIRST_TOKEN: PROXY_FIRST_TOKEN}
UNATTRIBUTED: Final = "unattributed"  # the remainder of an interval, always reported


def merged_name(names: Sequence[str]) -> str:
    """The one name of phases a source could not split, in order: a later name drops its process
    prefix when it is the first name's. ``server.receive`` + ``server.decode`` →
    ``server.receive+decode``; ``server.handoff`` + ``runner.admit`` → ``server.handoff+runner.admit``."""
    out = names[0]
    prefix = names[0].split(".", 1)[0]
    for i, name in enumerate(names[1:], 1):
        if name in names[:i]:
            continue  # a phase that comes twice (v0.30+'s two hand-off steps) is named once
        head, _, tail = name.partition(".")
        out += "+" + (tail if head == prefix else name)
    return out


def process_prefix(process: str) -> str:
    """``runner`` → ``runner.``: what the names of that process's phases start with."""
    return process + "."


# -- span names ------------------------------------------------------------------------------------------
SPAN_SERVER_REQUEST: Final = "server.request"  # a request the server read, as eBPF saw it (`tracer attach`)
SPAN_INTERVAL: Final = "tracer.interval"  # one attributed interval, parent of its phase spans
SPAN_BENCH_ITERATION: Final = "bench.interrupt.iteration"  # one `tracer bench` iteration (the trace's root)
STACK_EVENT_PREFIX: Final = "stack."  # span events ``stack.<process>``: the top stacks of a phase

# -- tracer.* span attributes ---------------------------------------------------------------------------
TRACER_PREFIX: Final = "tracer."  # a phase's own attributes, flattened onto its span as tracer.<key>
TRACER_GPU_PREFIX: Final = "tracer.gpu."  # tracer.gpu.<index>.<key>
# Set by the client instrumentation (and the proxy) on the GenAI request span:
TRACER_REQUEST_WRITTEN_NS: Final = "tracer.request_written_ns"  # request bytes written to the socket
TRACER_RESPONSE_START_NS: Final = "tracer.response_start_ns"  # response bytes at the client
TRACER_FIRST_TOKEN_NS: Final = "tracer.first_token_ns"  # first token handed to the caller
TRACER_LOCAL_PORT: Final = "tracer.local_port"  # the client's local TCP port (the server's peer port)
TRACER_CANCELLED: Final = "tracer.cancelled"  # the stream was closed early
TRACER_CHUNKS: Final = "tracer.chunks"  # chunks received
TRACER_CLIENT_KEY: Final = "tracer.client_key"  # which client of a proxy
# A request only the server's side recorded (eBPF): no client span matched it, so its interval has
# server and runner phases and no client ones. Value: SEEN_FROM_SERVER.
TRACER_SEEN_FROM: Final = "tracer.seen_from"
SEEN_FROM_SERVER: Final = "server"
SEEN_FROM_CLIENT: Final = "client"
TRACER_SOURCE: Final = "tracer.source"  # the source that measured a span or phase
# Set by `tracer bench` on its iteration root and its response phases:
TRACER_ITERATION_INDEX: Final = "tracer.iteration.index"
TRACER_WARMUP: Final = "tracer.warmup"
TRACER_BENCH_CLIENT: Final = "tracer.bench.client"
TRACER_BENCH_BACKEND: Final = "tracer.bench.backend"  # bench.backends: ollama, llama-server, llama-cpp-python
TRACER_PROCESS: Final = "tracer.process"
TRACER_CLOCK: Final = "tracer.clock"
TRACER_INTERVAL_MS: Final = "tracer.interval_ms"
# Set by attribution (`tracer attach`'s server request spans, the interval and phase spans):
TRACER_REQUEST_INDEX: Final = "tracer.request.index"
TRACER_INTERVAL_INDEX: Final = "tracer.interval.index"
TRACER_INTERVAL_KIND: Final = "tracer.interval.kind"
TRACER_UNATTRIBUTED_MS: Final = "tracer.unattributed_ms"
TRACER_COVERAGE: Final = "tracer.coverage"
TRACER_PHASE: Final = "tracer.phase"
TRACER_OFF_CRITICAL_PATH: Final = "tracer.off_critical_path"
TRACER_STACK_PROCESS: Final = "tracer.stack.process"
TRACER_STACK_RANK: Final = "tracer.stack.rank"
TRACER_STACK_SAMPLES: Final = "tracer.stack.samples"
TRACER_STACK_LEAF: Final = "tracer.stack.leaf"
TRACER_STACK_FRAMES: Final = "tracer.stack.frames"

# -- ollama.* span attributes: the server's own timing fields and chunk times ------------------------------
OLLAMA_PREFIX: Final = "ollama."
OLLAMA_CREATED_AT_FIRST_NS: Final = "ollama.created_at_first_ns"  # first chunk's created_at (server clock)
OLLAMA_CREATED_AT_LAST_NS: Final = "ollama.created_at_last_ns"  # last chunk's created_at (server clock)
OLLAMA_TOTAL_DURATION: Final = "ollama.total_duration"
OLLAMA_LOAD_DURATION: Final = "ollama.load_duration"
OLLAMA_PROMPT_EVAL_DURATION: Final = "ollama.prompt_eval_duration"
OLLAMA_EVAL_DURATION: Final = "ollama.eval_duration"
OLLAMA_PROMPT_EVAL_COUNT: Final = "ollama.prompt_eval_count"
OLLAMA_EVAL_COUNT: Final = "ollama.eval_count"
# v0.30+: the prompt tokens taken from llama-server's cache (prompt_eval_count counts them too)
OLLAMA_PROMPT_EVAL_CACHED_COUNT: Final = "ollama.prompt_eval_cached_count"
# The final chunk's field → its attribute.
OLLAMA_TIMING_ATTRIBUTES: Final = {
    "total_duration": OLLAMA_TOTAL_DURATION, "load_duration": OLLAMA_LOAD_DURATION,
    "prompt_eval_duration": OLLAMA_PROMPT_EVAL_DURATION, "eval_duration": OLLAMA_EVAL_DURATION,
    "prompt_eval_count": OLLAMA_PROMPT_EVAL_COUNT, "eval_count": OLLAMA_EVAL_COUNT,
    "prompt_eval_cached_count": OLLAMA_PROMPT_EVAL_CACHED_COUNT,
}

# -- keys of Ollama's own scheduler log lines (OLLAMA_DEBUG=1), read by the log source ---------------------
OLLAMA_LOG_RUNNER_MODEL: Final = "runner.model"  # the model blob of the runner a line is about
OLLAMA_LOG_RUNNER_PID: Final = "runner.pid"

# -- network attributes that are not in the semantic conventions -------------------------------------------
SERVER_FD: Final = "server.fd"  # the server's fd of the client connection (a request eBPF saw)
SERVER_PID: Final = "server.pid"  # the server process of that request

# -- GenAI attribute values --------------------------------------------------------------------------------
PROVIDER_OLLAMA: Final = "ollama"  # gen_ai.provider.name
PROVIDER_LLAMA_CPP: Final = "llama.cpp"  # llama.cpp's llama-server run alone, or llama-cpp-python in process
GENAI_PROVIDERS: Final = frozenset({PROVIDER_OLLAMA, PROVIDER_LLAMA_CPP})  # the calls an interval can start at
# Names the provider of the OpenAI-compatible calls (/v1/...), which both engines serve: a capture
# sets it to llama.cpp when the server it traces is llama-server alone.
ENV_GENAI_PROVIDER: Final = "TRACER_GENAI_PROVIDER"
# llama.cpp's server: its binary's and process's name (Ollama v0.30+'s runner, or run alone).
LLAMA_SERVER: Final = "llama-server"
# Ollama's designs (collectors.probe_catalogue.design_of): Go runners (v0.13 … v0.29), llama-server
# as the runner (v0.30+), or llama-server alone with no Ollama in front; or no server at all.
DESIGN_GO_RUNNERS: Final = "go-runners"
DESIGN_LLAMA_SERVER: Final = "llama-server"
DESIGN_LLAMA_SERVER_ALONE: Final = "llama-server-alone"
# llama.cpp inside the client's own process (llama-cpp-python): one process, no server; its libllama's
# calls split the call into runner.admit, runner.prefill and runner.sample, in the client process.
DESIGN_IN_PROCESS: Final = "in-process"
# The generation endpoints followed everywhere (instrumentations, proxy, the server-side request
# finder), with their gen_ai.operation.name: Ollama's own API (NDJSON streams), its
# OpenAI-compatible one (server-sent events), and llama.cpp's llama-server's own (server-sent
# events of {"content", "stop"} objects), for llama-server run alone.
LLAMA_SERVER_COMPLETION: Final = "/completion"
GENERATION_ENDPOINTS: Final = {"/api/generate": "text_completion", "/api/chat": "chat",
                               "/v1/chat/completions": "chat", "/v1/completions": "text_completion",
                               LLAMA_SERVER_COMPLETION: "text_completion"}
