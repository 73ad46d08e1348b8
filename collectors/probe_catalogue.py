"""Which functions bound which phase, per Ollama version (reference/ollama-v0.13-internals.md §9).

Entry uprobes only: Go moves goroutine stacks, so a uretprobe on Go code can crash the process.
Every entry is coarse (once per request, or once per token for the samplers) because a uprobe
hit costs ~10 µs on these VMs. Go's stack-growth prologue re-enters a function from its first
instruction, so an entry probe can fire twice per call; the parser keeps the first hit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeSpec:
    key: str  # the boundary it marks, as the attribution knows it
    symbol: str
    process: str  # "server" or "runner"
    language: str  # "go" or "c" (C symbols vanish from stripped binaries; Go ones stay in .gopclntab)
    per_token: bool = False


_S = "github.com/ollama/ollama/server."
_R_NEW = "github.com/ollama/ollama/runner/ollamarunner."
_R_LLAMA = "github.com/ollama/ollama/runner/llamarunner."

V0_13 = (
    ProbeSpec("handler", _S + "(*Server).GenerateHandler", "server", "go"),
    ProbeSpec("handler", _S + "(*Server).ChatHandler", "server", "go"),
    ProbeSpec("lookup", _S + "getExistingName", "server", "go"),
    ProbeSpec("capabilities", _S + "(*Model).Capabilities", "server", "go"),
    ProbeSpec("gguf_open", "github.com/ollama/ollama/fs/gguf.Open", "server", "go"),
    ProbeSpec("get_runner", _S + "(*Scheduler).GetRunner", "server", "go"),
    ProbeSpec("needs_reload", _S + "(*runnerRef).needsReload", "server", "go"),
    ProbeSpec("load", _S + "(*Scheduler).load", "server", "go"),
    ProbeSpec("acquired", _S + "(*LlmRequest).useLoadedRunner", "server", "go"),
    ProbeSpec("template", _S + "chatPrompt", "server", "go"),
    ProbeSpec("completion", "github.com/ollama/ollama/llm.(*llmServer).Completion", "server", "go"),
    # new engine (gemma3 and friends)
    ProbeSpec("runner_handler", _R_NEW + "(*Server).completion", "runner", "go"),
    ProbeSpec("new_sequence", _R_NEW + "(*Server).NewSequence", "runner", "go"),
    ProbeSpec("cache_slot", _R_NEW + "(*InputCache).LoadCacheSlot", "runner", "go"),
    ProbeSpec("remove_sequence", _R_NEW + "(*Server).removeSequence", "runner", "go"),
    ProbeSpec("sample", "github.com/ollama/ollama/sample.(*Sampler).Sample", "runner", "go", per_token=True),
    # llama.cpp runner (llama and friends)
    ProbeSpec("runner_handler", _R_LLAMA + "(*Server).completion", "runner", "go"),
    ProbeSpec("new_sequence", _R_LLAMA + "(*Server).NewSequence", "runner", "go"),
    ProbeSpec("cache_slot", _R_LLAMA + "(*InputCache).LoadCacheSlot", "runner", "go"),
    ProbeSpec("remove_sequence", _R_LLAMA + "(*Server).removeSequence", "runner", "go"),
    # The Go wrapper (*SamplingContext).Sample is inlined at its call site and never fires; the C
    # function behind it cannot be inlined across cgo.
    ProbeSpec("sample", "common_sampler_csample", "runner", "c", per_token=True),
    ProbeSpec("decode", "llama_decode", "runner", "c", per_token=True),
)

# Keyed by "major.minor". v0.30+ runs upstream llama-server as its runner: the Go runner
# symbols are gone, and only the syscall layer, logs and response fields apply there.
CATALOGUE: dict[str, tuple[ProbeSpec, ...]] = {"0.13": V0_13}


def design_for(version: str | None) -> str:
    """``go-runners`` (v0.13 … v0.29) or ``llama-server`` (v0.30+), or ``unknown``."""
    if not version:
        return "unknown"
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "unknown"
    if (major, minor) >= (0, 30):
        return "llama-server"
    return "go-runners"


def probes_for(version: str | None) -> tuple[ProbeSpec, ...]:
    """The catalogue entry for this version; the newest older entry when there is no exact one."""
    if design_for(version) != "go-runners" or version is None:
        return ()
    major_minor = ".".join(version.split(".")[:2])
    if major_minor in CATALOGUE:
        return CATALOGUE[major_minor]
    older = sorted((k for k in CATALOGUE if tuple(map(int, k.split("."))) <= tuple(map(int, major_minor.split(".")))),
                   key=lambda k: tuple(map(int, k.split("."))))
    return CATALOGUE[older[-1]] if older else ()


DESIGN_NOTES = {
    "go-runners": "v0.13-era design: Go runners (ollamarunner / llamarunner); every phase can be separated "
                  "with symbols, and the syscall layer merges server.receive+decode+model_lookup, "
                  "server.schedule+handoff and runner.admit+prefill+sample.",
    "llama-server": "v0.30+ design: the runner is upstream llama-server, so the Go runner probes do not apply. "
                    "The syscall layer, the log and the response fields still work; inside the server, "
                    "server.receive+decode+model_lookup and server.schedule+handoff stay merged, and inside "
                    "the runner runner.admit+prefill+sample cannot be separated.",
    "unknown": "Ollama's version is unknown: only the syscall layer is used, and phases are merged as above.",
}
