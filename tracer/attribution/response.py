"""Server-side phases rebuilt from the response stream alone (``source=response``).

Ollama's chunks carry server timestamps: ``created_at`` on every chunk (the server's wall clock
when the chunk came back from the runner, ns precision) and, on the final chunk,
``total_duration``, ``load_duration`` and ``prompt_eval_duration`` (reference §4):

* handler start   = final ``created_at`` − ``total_duration``
* runner acquired = handler start + ``load_duration``
* first chunk at the server = first ``created_at``
* prefill         = ``prompt_eval_duration``, placed to end at the first chunk at the server

On Ollama v0.30+ (llama-server) ``load_duration`` still ends right after ``scheduleRunner``, but
what follows before the prefill is longer: the ``POST /tokenize`` and ``GET /health`` round trips
to llama-server and the wait for the runner's semaphore come before llama-server admits the task.
The merged phase there is named with them (``llama_server=True``), never as a bare hand-off.

Clock assumption: the server's wall clock is this machine's (same host). For a remote server,
pass ``server_offset_ns`` (server clock − client clock) and every server time is shifted.
Sampling the first token and the runner→server hop (sub-millisecond on loopback) fall between
the end of ``prompt_eval_duration`` and the first ``created_at``; with this placement they are
folded into ``server.handoff+runner.admit``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import (
    PROCESS_RUNNER,
    PROCESS_SERVER,
    RUNNER_ADMIT,
    RUNNER_PREFILL,
    SERVER_DECODE,
    SERVER_HANDOFF,
    SERVER_MODEL_LOOKUP,
    SERVER_RECEIVE,
    SERVER_RUNNER_HEALTH,
    SERVER_RUNNER_WAIT,
    SERVER_SCHEDULE,
    SERVER_STREAM,
    SERVER_TOKENIZE,
    SOURCE_RESPONSE,
    merged_name,
)

SOURCE = SOURCE_RESPONSE


@dataclass(frozen=True)
class ResponseTimings:
    """What a client saw of one streamed request (client clock, epoch ns)."""

    request_written_ns: int
    response_start_ns: int  # response bytes (headers + first chunk) at the client
    first_created_ns: int  # server clock
    last_created_ns: int  # server clock
    total_duration_ns: int
    load_duration_ns: int
    prompt_eval_duration_ns: int


def response_phases(t: ResponseTimings, server_offset_ns: int = 0, *, llama_server: bool = False) -> list[Phase]:
    """The server phases between the request leaving the client and its response arriving."""
    after_acquired = ([SERVER_HANDOFF, SERVER_TOKENIZE, SERVER_RUNNER_WAIT, SERVER_RUNNER_HEALTH, RUNNER_ADMIT]
                      if llama_server else [SERVER_HANDOFF, RUNNER_ADMIT])
    handler_start = t.last_created_ns - t.total_duration_ns - server_offset_ns
    acquired = handler_start + t.load_duration_ns
    first_chunk = t.first_created_ns - server_offset_ns
    prefill_start = max(acquired, first_chunk - t.prompt_eval_duration_ns)
    bounds = [
        (SERVER_RECEIVE, t.request_written_ns, handler_start),
        (merged_name([SERVER_DECODE, SERVER_MODEL_LOOKUP, SERVER_SCHEDULE]), handler_start, acquired),
        (merged_name(after_acquired), acquired, prefill_start),
        (RUNNER_PREFILL, prefill_start, first_chunk),
        (SERVER_STREAM, first_chunk, t.response_start_ns),
    ]
    process = {SERVER_RECEIVE: PROCESS_SERVER, RUNNER_PREFILL: PROCESS_RUNNER}
    phases = []
    previous_end = t.request_written_ns
    for name, start, end in bounds:
        # Two clocks read at different points can disagree by a fraction of a millisecond
        # (the client notes "written" after its send call returns, which can be after the
        # server's handler began). Tile instead of overlapping: never count a moment twice.
        start = max(start, previous_end)
        end = max(start, end)
        phases.append(Phase(name=name, start_ns=start, end_ns=end, source=SOURCE,
                            process=process.get(name, PROCESS_SERVER)))
        previous_end = end
    return phases
