"""llama.cpp inside the client's own process (llama-cpp-python): the call split by its libllama.

There is no server and no connection: the client hands the prompt to the library
(``tracer.request_written_ns``) and gets the first token back (``tracer.response_start_ns``), and
everything between is the library's, in the client process. The catalogue's ``IN_PROCESS``
probes fire in that process only (``collectors.ebpf_plan.build_in_process_script``): the call's
start (its sampler chain built), the first ``llama_decode`` after it (the prompt's evaluation)
and the first ``llama_sampler_sample`` after that (the first token's logits are ready). So:

=====================  ==============================================================================
``runner.admit``       prompt handed to the library → its first ``llama_decode`` (the call's own set-up:
                       the prompt-cache prefix match against the last call's tokens, the sampler chain)
``runner.prefill``     first ``llama_decode`` → first ``llama_sampler_sample`` (the prompt evaluated)
``runner.sample``      first ``llama_sampler_sample`` → the token handed back to the caller
=====================  ==============================================================================

All three are phases of the client process (``process: client``, ``in_process: true``): one
process, said so, never a runner that does not exist.
"""

from __future__ import annotations

from typing import Any

from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.collectors.ebpf_events import EbpfRecords, ProbeEvent, each_between
from ollama_tracer.collectors.probe_catalogue import IN_PROCESS
from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import (
    PROCESS_CLIENT,
    PROCESS_PID,
    RUNNER_ADMIT,
    RUNNER_PREFILL,
    RUNNER_SAMPLE,
    SOURCE_EBPF,
    TRACER_FIRST_TOKEN_NS,
    TRACER_REQUEST_WRITTEN_NS,
    TRACER_RESPONSE_START_NS,
)

_SYMBOL = {spec.key: spec.symbol for spec in IN_PROCESS}


def _attribute_ns(span: dict[str, Any], *keys: str) -> int | None:
    attributes = span.get("attributes") or {}
    for key in keys:
        if attributes.get(key) is not None:
            return int(attributes[key])
    return None


def _first(events: list[ProbeEvent], symbol: str, after_ns: int, before_ns: int, pid: int | None) -> ProbeEvent | None:
    for event in each_between(events, after_ns, before_ns):
        if event.kind == "U" and event.text == symbol and (pid is None or event.pid == pid):
            return event
    return None


def in_process_phases(interval: Interval, ebpf: EbpfRecords) -> tuple[list[Phase], dict[str, Any]]:
    """(the call's library phases, what was matched or missing) for one interval."""
    request = interval.request
    handed = _attribute_ns(request, TRACER_REQUEST_WRITTEN_NS)
    returned = _attribute_ns(request, TRACER_RESPONSE_START_NS, TRACER_FIRST_TOKEN_NS)
    pid = (request.get("resource") or {}).get(PROCESS_PID)
    pid = pid if isinstance(pid, int) else None
    outcome: dict[str, Any] = {"matched": 0, "missing": []}
    if handed is None or returned is None or returned <= handed:
        outcome["missing"].append({"interval": interval.index, "boundary": "the call's own times",
                                   "reason": "the client span has no request_written / first-token times"})
        return [], outcome
    events = ebpf.events
    decode = _first(events, _SYMBOL["decode"], handed, returned, pid)
    sample = _first(events, _SYMBOL["sample"], decode.time_ns, returned, pid) if decode is not None else None
    if decode is None or sample is None:
        absent = _SYMBOL["decode"] if decode is None else _SYMBOL["sample"]
        outcome["missing"].append({"interval": interval.index, "boundary": absent,
                                   "reason": f"no {absent} hit in the client process between the call and "
                                             "its first token (the probe did not attach, or another libllama "
                                             "was loaded)"})
        return [], outcome
    outcome["matched"] = 1
    facts = {"in_process": True, "pid": decode.pid}
    return [Phase(RUNNER_ADMIT, handed, decode.time_ns, SOURCE_EBPF, PROCESS_CLIENT, facts),
            Phase(RUNNER_PREFILL, decode.time_ns, sample.time_ns, SOURCE_EBPF, PROCESS_CLIENT, facts),
            Phase(RUNNER_SAMPLE, sample.time_ns, returned, SOURCE_EBPF, PROCESS_CLIENT, facts)], outcome
