"""Which functions bound which phase, per Ollama version (reference/ollama-v0.13-internals.md §9).

Entry uprobes only: Go moves goroutine stacks, so a uretprobe on Go code can crash the process.
Every entry is coarse (once per request, or once per token for the samplers) because a uprobe
hit costs ~10 µs on these VMs. Go's stack-growth prologue re-enters a function from its first
instruction, so an entry probe can fire twice per call; the parser keeps the first hit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollama_tracer.vocabulary import (
    DESIGN_GO_RUNNERS,
    DESIGN_IN_PROCESS,
    DESIGN_LLAMA_SERVER,
    DESIGN_LLAMA_SERVER_ALONE,
    LLAMA_SERVER,
    PROCESS_CLIENT,
    PROCESS_RUNNER,
    PROCESS_SERVER,
    RUNNER_ADMIT,
    RUNNER_PREFILL,
    RUNNER_SAMPLE,
    SERVER_DECODE,
    SERVER_HANDOFF,
    SERVER_MODEL_LOOKUP,
    SERVER_RECEIVE,
    SERVER_SCHEDULE,
    merged_name,
)


@dataclass(frozen=True)
class ProbeSpec:
    key: str  # the boundary it marks, as the attribution knows it
    symbol: str  # a C++ one is its demangled qualified name, without parameters
    process: str  # "server" or "runner"; "client" for llama.cpp inside the client (llama-cpp-python)
    language: str  # "go", "c" or "c++" (C symbols vanish from stripped binaries; Go ones stay in .gopclntab;
    # a shared library's exported ones stay in .dynsym)
    per_token: bool = False
    library: str | None = None  # a shared library in Ollama's lib/ollama directory; None: the ollama binary


_S = "github.com/ollama/ollama/server."
_R_NEW = "github.com/ollama/ollama/runner/ollamarunner."
_R_LLAMA = "github.com/ollama/ollama/runner/llamarunner."

V0_13 = (
    ProbeSpec("handler", _S + "(*Server).GenerateHandler", PROCESS_SERVER, "go"),
    ProbeSpec("handler", _S + "(*Server).ChatHandler", PROCESS_SERVER, "go"),
    ProbeSpec("lookup", _S + "getExistingName", PROCESS_SERVER, "go"),
    ProbeSpec("capabilities", _S + "(*Model).Capabilities", PROCESS_SERVER, "go"),
    ProbeSpec("gguf_open", "github.com/ollama/ollama/fs/gguf.Open", PROCESS_SERVER, "go"),
    ProbeSpec("get_runner", _S + "(*Scheduler).GetRunner", PROCESS_SERVER, "go"),
    ProbeSpec("needs_reload", _S + "(*runnerRef).needsReload", PROCESS_SERVER, "go"),
    ProbeSpec("load", _S + "(*Scheduler).load", PROCESS_SERVER, "go"),
    ProbeSpec("acquired", _S + "(*LlmRequest).useLoadedRunner", PROCESS_SERVER, "go"),
    ProbeSpec("template", _S + "chatPrompt", PROCESS_SERVER, "go"),
    ProbeSpec("completion", "github.com/ollama/ollama/llm.(*llmServer).Completion", PROCESS_SERVER, "go"),
    # new engine (gemma3 and friends)
    ProbeSpec("runner_handler", _R_NEW + "(*Server).completion", PROCESS_RUNNER, "go"),
    ProbeSpec("new_sequence", _R_NEW + "(*Server).NewSequence", PROCESS_RUNNER, "go"),
    ProbeSpec("cache_slot", _R_NEW + "(*InputCache).LoadCacheSlot", PROCESS_RUNNER, "go"),
    ProbeSpec("remove_sequence", _R_NEW + "(*Server).removeSequence", PROCESS_RUNNER, "go"),
    ProbeSpec("sample", "github.com/ollama/ollama/sample.(*Sampler).Sample", PROCESS_RUNNER, "go", per_token=True),
    # llama.cpp runner (llama and friends)
    ProbeSpec("runner_handler", _R_LLAMA + "(*Server).completion", PROCESS_RUNNER, "go"),
    ProbeSpec("new_sequence", _R_LLAMA + "(*Server).NewSequence", PROCESS_RUNNER, "go"),
    ProbeSpec("cache_slot", _R_LLAMA + "(*InputCache).LoadCacheSlot", PROCESS_RUNNER, "go"),
    ProbeSpec("remove_sequence", _R_LLAMA + "(*Server).removeSequence", PROCESS_RUNNER, "go"),
    # The Go wrapper (*SamplingContext).Sample is inlined at its call site and never fires; the C
    # function behind it cannot be inlined across cgo.
    ProbeSpec("sample", "common_sampler_csample", PROCESS_RUNNER, "c", per_token=True),
    ProbeSpec("decode", "llama_decode", PROCESS_RUNNER, "c", per_token=True),
)

_L = "github.com/ollama/ollama/llm."
_IMPL, _LLAMA, _COMMON = "libllama-server-impl.so", "libllama.so", "libllama-common.so"

# v0.30+: the runner is upstream llama.cpp's llama-server (C++). Its functions are exported from
# shared libraries (.dynsym), so they are found in the release build too. Checked against v0.34.4.
V0_30 = (
    ProbeSpec("handler", _S + "(*Server).GenerateHandler", PROCESS_SERVER, "go"),
    ProbeSpec("handler", _S + "(*Server).ChatHandler", PROCESS_SERVER, "go"),
    ProbeSpec("lookup", _S + "getExistingName", PROCESS_SERVER, "go"),
    ProbeSpec("get_model", _S + "GetModel", PROCESS_SERVER, "go"),
    ProbeSpec("metadata", _S + "readGGUFMetadata", PROCESS_SERVER, "go"),  # the sidecar; a miss scans the blob
    ProbeSpec("gguf_open", "github.com/ollama/ollama/fs/gguf.ReadFileMetadata", PROCESS_SERVER, "go"),
    ProbeSpec("schedule", _S + "(*Server).scheduleRunner", PROCESS_SERVER, "go"),
    ProbeSpec("get_runner", _S + "(*Scheduler).getRunner", PROCESS_SERVER, "go"),
    ProbeSpec("needs_reload", _S + "(*runnerRef).needsReload", PROCESS_SERVER, "go"),
    ProbeSpec("load", _S + "(*Scheduler).load", PROCESS_SERVER, "go"),
    ProbeSpec("start_runner", _L + "startLlamaServer", PROCESS_SERVER, "go"),
    ProbeSpec("wait_running", _L + "(*llamaServerRunner).WaitUntilRunning", PROCESS_SERVER, "go"),
    ProbeSpec("acquired", _S + "(*LlmRequest).useLoadedRunner", PROCESS_SERVER, "go"),
    ProbeSpec("template", _S + "chatPrompt", PROCESS_SERVER, "go"),
    ProbeSpec("tokenize", _L + "(*llamaServerRunner).tokenize", PROCESS_SERVER, "go"),
    ProbeSpec("completion", _L + "(*llamaServerRunner).Completion", PROCESS_SERVER, "go"),
    # llama-server: the HTTP thread takes the request, the main loop admits it into a slot.
    ProbeSpec("runner_handler", "server_routes::handle_completions_impl", PROCESS_RUNNER, "c++", library=_IMPL),
    # Once per request: the slot taking the task. No boundary is read from it, but as a probe that
    # is not per token it re-arms the per-token probes below, so the first llama_process printed
    # after it is this request's prefill, not a decode of the stream before.
    # (process_single_task and process_token, once probed too, run per token and no boundary read
    # them: 23 of v0.34's 57 uprobe hits per interval, at ~23 µs each, bought nothing.)
    ProbeSpec("slot", "server_context_impl::launch_slot_with_task", PROCESS_RUNNER, "c++", library=_IMPL),
    # llama_decode is never called by llama-server; llama_process is its batch entry (prefill, then a decode
    # per token).
    ProbeSpec("decode", "llama_process", PROCESS_RUNNER, "c", per_token=True, library=_LLAMA),
    ProbeSpec("sample", "common_sampler_sample", PROCESS_RUNNER, "c++", per_token=True, library=_COMMON),
)

# llama.cpp inside the client's own process (llama-cpp-python 0.3.x, checked against 0.3.36): each
# ``Llama.generate`` call builds its sampler chain first (llama_sampler_chain_init, once per call:
# it re-arms the per-token probes), evaluates the prompt (llama_decode, then once per token) and
# samples (llama_sampler_sample, once per token). All three are libllama's public C API, exported
# from any build of it.
IN_PROCESS = (
    ProbeSpec("call", "llama_sampler_chain_init", PROCESS_CLIENT, "c", library=_LLAMA),
    ProbeSpec("decode", "llama_decode", PROCESS_CLIENT, "c", per_token=True, library=_LLAMA),
    ProbeSpec("sample", "llama_sampler_sample", PROCESS_CLIENT, "c", per_token=True, library=_LLAMA),
)

# Keyed by "major.minor": the newest entry not newer than the server is used.
CATALOGUE: dict[str, tuple[ProbeSpec, ...]] = {"0.13": V0_13, "0.30": V0_30}


def design_for(version: str | None) -> str:
    """``go-runners`` (v0.13 … v0.29) or ``llama-server`` (v0.30+), or ``unknown``."""
    if not version:
        return "unknown"
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "unknown"
    if (major, minor) >= (0, 30):
        return DESIGN_LLAMA_SERVER
    return DESIGN_GO_RUNNERS


# llama.cpp's llama-server run alone, no Ollama in front (`tracer bench interrupt --backend
# llama-server`): the server is llama-server itself, and its own functions are the probes.
DESIGN_ALONE = DESIGN_LLAMA_SERVER_ALONE


def design_of(binary_name: str, version: str | None) -> str:
    """The design of a server whose binary is named ``binary_name``: llama-server alone, or Ollama's."""
    return DESIGN_ALONE if binary_name == LLAMA_SERVER else design_for(version)


def probes_for_design(design: str, version: str | None) -> tuple[ProbeSpec, ...]:
    """On llama-server alone, the runner functions of the llama-server design's entry, in the server."""
    if design == DESIGN_ALONE:
        return tuple(spec for spec in CATALOGUE["0.30"] if spec.library is not None)
    if design == DESIGN_IN_PROCESS:
        return IN_PROCESS
    return probes_for(version)


def probes_for(version: str | None) -> tuple[ProbeSpec, ...]:
    """The catalogue entry for this version; the newest older entry when there is no exact one."""
    if design_for(version) == "unknown" or version is None:
        return ()
    major_minor = ".".join(version.split(".")[:2])
    if major_minor in CATALOGUE:
        return CATALOGUE[major_minor]
    older = sorted((k for k in CATALOGUE if tuple(map(int, k.split("."))) <= tuple(map(int, major_minor.split(".")))),
                   key=lambda k: tuple(map(int, k.split("."))))
    return CATALOGUE[older[-1]] if older else ()


_RECEIVE_TO_LOOKUP = merged_name([SERVER_RECEIVE, SERVER_DECODE, SERVER_MODEL_LOOKUP])
_SCHEDULE_HANDOFF = merged_name([SERVER_SCHEDULE, SERVER_HANDOFF])
_ADMIT_TO_SAMPLE = merged_name([RUNNER_ADMIT, RUNNER_PREFILL, RUNNER_SAMPLE])
DESIGN_NOTES = {
    DESIGN_GO_RUNNERS: "v0.13-era design: Go runners (ollamarunner / llamarunner); every phase can be separated "
                  f"with symbols, and the syscall layer merges {_RECEIVE_TO_LOOKUP}, "
                  f"{_SCHEDULE_HANDOFF} and {_ADMIT_TO_SAMPLE}.",
    DESIGN_LLAMA_SERVER: "v0.30+ design: the runner is upstream llama-server. The Go server's probes and the functions "
                    "llama-server's shared libraries export split the phases, and each round trip to it (GET /health, "
                    f"POST /tokenize) is its own phase on the wire; without probes {_RECEIVE_TO_LOOKUP} stays merged, "
                    f"and so does {_ADMIT_TO_SAMPLE} inside the runner.",
    DESIGN_ALONE: "llama.cpp's llama-server alone: it is the server, and the functions its shared libraries "
                  f"export split {SERVER_RECEIVE}, {RUNNER_ADMIT}, {RUNNER_PREFILL} and {RUNNER_SAMPLE}; "
                  "without them they stay merged.",
    DESIGN_IN_PROCESS: "llama.cpp inside the client's own process (llama-cpp-python): ONE process, no server and no "
                       f"network hop. Its libllama's llama_decode and llama_sampler_sample split the call into "
                       f"{RUNNER_ADMIT} (call → prompt evaluation), {RUNNER_PREFILL} (→ first sample) and "
                       f"{RUNNER_SAMPLE} (→ the token handed back), all in the client process.",
    "unknown": "Ollama's version is unknown: only the syscall layer is used, and phases are merged as above.",
}
