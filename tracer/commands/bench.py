"""Reproducible benchmarks against Ollama and the engines beside it.

`tracer bench interrupt` runs the seed's scenario: stream a first-stage completion,
interrupt it after N ms by closing the stream, immediately start a second-stage request and
time "interrupt sent → second stage's first token". Iteration 0 (and up to --warmup) is a
warm-up. It prints the per-iteration table, the interval's mean/median/min/max/stdev (n−1),
and the engine's own timing fields for the second stage (and, on Ollama, the server phases
rebuilt from the response, source=response). --backend runs the same scenario on Ollama, on
llama.cpp's llama-server alone (its /completion or its OpenAI API), or on llama-cpp-python
in this process. Client spans go wherever the OTEL_* variables say; with none set, nowhere.
No prompt or completion text is recorded unless --record-content is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import requests
from ollama_tracer import __version__
from ollama_tracer.bench.backends import (
    BACKEND_LLAMA_CPP_PYTHON,
    BACKEND_LLAMA_SERVER,
    BACKEND_OLLAMA,
    BACKENDS,
    CLIENTS,
    Backend,
    LlamaCppPythonBackend,
    LlamaServerBackend,
    OllamaBackend,
    StreamSettings,
    import_llama_cpp,
)
from ollama_tracer.bench.interrupt import SCHEMA, BenchOptions, Iteration, run_iteration, summary
from ollama_tracer.collectors.probe_catalogue import design_for
from ollama_tracer.commands.arguments import non_negative, positive
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.exporters import bench_table
from ollama_tracer.ollama_host import resolve_host
from ollama_tracer.otel_setup import configure_from_env
from ollama_tracer.testbed import runtime, standalone
from ollama_tracer.vocabulary import DESIGN_GO_RUNNERS, DESIGN_LLAMA_SERVER, SERVICE_CLIENT


class BenchCommand:
    """Run a built-in benchmark against Ollama (`tracer bench interrupt`)."""

    name = "bench"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        kinds = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
        p = kinds.add_parser(
            "interrupt", help="stream, interrupt after N ms, stream again; time interrupt → first token",
            description=(__doc__ or "").split("\n\n")[1],
        )
        p.add_argument("--backend", choices=BACKENDS, default=BACKEND_OLLAMA,
                       help="the engine: Ollama; llama.cpp's llama-server alone; llama-cpp-python in this process "
                            "(default: ollama)")
        p.add_argument("--host", help="the server's base URL (Ollama default: $OLLAMA_HOST or 127.0.0.1:11434; "
                                      "llama-server default: $LLAMA_SERVER_HOST, else the testbed's llama-server "
                                      "for --model)")
        p.add_argument("--model", required=True,
                       help="model name, e.g. gemma3:4b or tracer-gemma3:test (llama-server: its --alias; "
                            "llama-cpp-python: a GGUF file, or a testbed model's name)")
        p.add_argument("--client", choices=sorted({c for cs in CLIENTS.values() for c in cs}),
                       help="ollama: the ollama Python SDK (sdk, the default) or raw HTTP with requests (http); "
                            "llama-server: its own /completion (native, the default) or /v1/chat/completions "
                            "with the OpenAI SDK (openai)")
        p.add_argument("--interrupt-after-ms", type=positive(float), default=500.0,
                       help="close the first stream after this many ms (default: 500)")
        p.add_argument("--iterations", type=positive(int), default=4, help="measured iterations (default: 4)")
        p.add_argument("--warmup", type=non_negative, default=1, help="warm-up iterations (default: 1)")
        p.add_argument("--prompt", help="first-stage prompt (default: a long story request)")
        p.add_argument("--second-prompt", help="second-stage prompt; {iteration} in it is replaced by the iteration "
                                               "number (a prompt no prompt cache holds)")
        p.add_argument("--num-predict", type=positive(int), default=16,
                       help="second-stage num_predict, so it runs to done with timing fields (default: 16)")
        p.add_argument("--num-ctx", type=positive(int), help="options.num_ctx for both stages")
        p.add_argument("--second-num-ctx", type=positive(int),
                       help="options.num_ctx for the second stage only (overrides --num-ctx there): a size "
                            "different from the first stage's makes Ollama reload the runner in every interval")
        p.add_argument("--request-timeout", type=positive(float), default=120.0,
                       help="seconds to wait for Ollama's next byte before giving up (default: 120)")
        p.add_argument("--record-content", action="store_true",
                       help="record prompt and completion text in spans and JSON (off by default)")
        p.add_argument("--json", dest="json_path", type=Path, help="also write the results as JSON here")

    def run(self, args: argparse.Namespace) -> int:
        backend = args.backend
        client = args.client or CLIENTS[backend][0]
        if client not in CLIENTS[backend]:
            raise TracerError(f"--client {client} is not a {backend} client; use one of: "
                              f"{', '.join(CLIENTS[backend])}.", ExitCode.USAGE)
        if backend == BACKEND_LLAMA_SERVER and (args.num_ctx or args.second_num_ctx):
            raise TracerError("llama-server's context is fixed when it starts (--ctx-size); drop --num-ctx and "
                              "--second-num-ctx with --backend llama-server.", ExitCode.USAGE)
        if args.second_num_ctx and backend == BACKEND_LLAMA_CPP_PYTHON:
            raise TracerError("llama-cpp-python's context is fixed when the model loads; use --num-ctx only.",
                              ExitCode.USAGE)
        host = _host(backend, args.host, args.model)
        defaults = BenchOptions(host=host, model=args.model)
        options = BenchOptions(
            host=host, model=args.model, client=client, backend=backend, interrupt_after_ms=args.interrupt_after_ms,
            iterations=args.iterations, warmup=args.warmup, prompt=args.prompt or defaults.prompt,
            second_prompt=args.second_prompt or defaults.second_prompt, num_predict=args.num_predict,
            num_ctx=args.num_ctx, second_num_ctx=args.second_num_ctx, record_content=args.record_content,
            request_timeout_s=args.request_timeout,
        )
        version = _preflight(options)
        provider = configure_from_env(SERVICE_CLIENT)
        iterations: list[Iteration] = []
        try:
            failure = _run_all(options, iterations, version)
        finally:
            if provider is not None:
                provider.force_flush()
        ollama = backend == BACKEND_OLLAMA
        if ollama and failure is None and host is not None:
            version = _version(host) or version  # an upgrade mid-run shows
        result = {
            "schema": SCHEMA,
            "tracer_version": __version__,
            "backend": backend,
            "engine_version": version,
            "ollama_version": version if ollama else None,
            "model": options.model,
            "client": options.client,
            "options": options.to_json(),
            "iterations": [it.to_json() for it in iterations],
            "summary": _clean(summary(iterations)),
        }
        if failure is not None:
            # Nothing measured so far is lost: the table and the JSON hold the iterations before it.
            result["stopped"] = {"at_iteration": len(iterations), "exit_code": int(failure.exit_code),
                                 "reason": failure.message}
        if iterations:
            bench_table.render(sys.stdout, result)
        if args.json_path is not None:
            _write_json_atomically(args.json_path, result)
        if failure is not None:
            raise failure
        return int(ExitCode.OK)


def _version(host: str) -> str | None:
    try:
        return str(requests.get(f"{host}/api/version", timeout=5).json()["version"])
    except (requests.RequestException, ValueError, KeyError):
        return None


def _host(backend: str, given: str | None, model: str) -> str | None:
    if backend == BACKEND_OLLAMA:
        return resolve_host(given)
    if backend == BACKEND_LLAMA_CPP_PYTHON:
        if given:
            raise TracerError("llama-cpp-python runs in this process and has no --host; drop it.", ExitCode.USAGE)
        return None
    found = given or os.environ.get("LLAMA_SERVER_HOST") or standalone.host_for(runtime.testbed_dir(), model)
    if found is None:
        raise TracerError(f"no llama-server for {model!r} is known; pass --host (or set LLAMA_SERVER_HOST), or "
                          "start the testbed's with `tracer testbed up --llama-server`.", ExitCode.OLLAMA_UNREACHABLE)
    return found if "://" in found else f"http://{found}"


def _preflight(options: BenchOptions) -> str | None:
    """The engine's version, once it answers and has the model."""
    if options.backend == BACKEND_LLAMA_SERVER:
        return _llama_server_preflight(options)
    if options.backend == BACKEND_LLAMA_CPP_PYTHON:
        return _llama_cpp_python_preflight(options)
    assert options.host is not None
    version = _version(options.host)
    if version is None:
        raise TracerError(
            f"Ollama is not reachable at {options.host}; start it (`ollama serve` or `tracer testbed up`) "
            "or pass --host / set OLLAMA_HOST.",
            ExitCode.OLLAMA_UNREACHABLE,
        )
    try:
        response = requests.post(f"{options.host}/api/show", json={"model": options.model}, timeout=30)
    except requests.RequestException as err:
        raise TracerError(f"Ollama at {options.host} stopped answering ({err}).",
                          ExitCode.OLLAMA_UNREACHABLE) from err
    if response.status_code == 404:
        raise TracerError(
            f"model {options.model!r} is not on the Ollama at {options.host}; "
            f"pull or create it first (`ollama pull {options.model}`), or list models with `ollama list`.",
            ExitCode.MODEL_NOT_FOUND,
        )
    return version


def _llama_server_preflight(options: BenchOptions) -> str | None:
    try:
        models = requests.get(f"{options.host}/v1/models", timeout=10).json()
        props = requests.get(f"{options.host}/props", timeout=10).json()
    except (requests.RequestException, ValueError) as err:
        raise TracerError(f"llama-server is not reachable at {options.host}; start it (`llama-server -m MODEL.gguf` "
                          "or `tracer testbed up --llama-server`) or pass --host.",
                          ExitCode.OLLAMA_UNREACHABLE) from err
    served = [m.get("id") for m in models.get("data", [])]
    if options.model not in served:
        raise TracerError(f"the llama-server at {options.host} serves {', '.join(map(str, served)) or 'no model'}, "
                          f"not {options.model!r}; pass its --alias as --model.", ExitCode.MODEL_NOT_FOUND)
    return str(props.get("build_info") or "") or None


def _llama_cpp_python_preflight(options: BenchOptions) -> str | None:
    if _model_file(options.model) is None:
        raise TracerError(f"{options.model!r} is neither a GGUF file nor a testbed model; pass the path of a .gguf "
                          "file as --model.", ExitCode.MODEL_NOT_FOUND)
    try:
        llama_cpp = import_llama_cpp(_lib_dir())
    except ImportError as err:
        raise TracerError(f"llama-cpp-python is not installed or cannot load llama.cpp ({err}); install it "
                          "(scripts/bootstrap.sh builds it against the testbed's llama.cpp).",
                          ExitCode.MISSING_DEPENDENCY) from err
    return str(getattr(llama_cpp, "__version__", "")) or None


def _model_file(model: str) -> Path | None:
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    return standalone.model_file(model)


def _lib_dir() -> Path | None:
    built = standalone.lib_dir()
    return built if (built / "libllama.so").exists() else None


def _backend(options: BenchOptions) -> Backend:
    settings = StreamSettings(host=options.host, model=options.model, client=options.client,
                              record_content=options.record_content, request_timeout_s=options.request_timeout_s,
                              n_ctx=options.num_ctx)
    if options.backend == BACKEND_LLAMA_SERVER:
        return LlamaServerBackend(settings)
    if options.backend == BACKEND_LLAMA_CPP_PYTHON:
        model = _model_file(options.model)
        assert model is not None  # the preflight said so
        return LlamaCppPythonBackend(settings, model, _lib_dir())
    return OllamaBackend(settings)


def _run_all(options: BenchOptions, results: list[Iteration], version: str | None) -> TracerError | None:
    """Run every iteration into ``results``; the error that stopped them, if one did."""
    from opentelemetry import trace

    client = _backend(options)
    tracer = trace.get_tracer("tracer.bench")
    total = options.warmup + options.iterations
    for index in range(total):
        warmup = index < options.warmup
        try:
            iteration = run_iteration(client, options, index, warmup, tracer)
        except Exception as err:  # map client-library failures to one sentence
            failure = _as_tracer_error(err, options, version)
            failure.__cause__ = err
            return failure
        label = "warm-up" if warmup else f"{index - options.warmup + 1}/{options.iterations}"
        print(f"tracer: iteration {index} ({label}): interrupt → first token "
              f"{iteration.interrupt_to_first_token_ms:.2f} ms", file=sys.stderr, flush=True)
        results.append(iteration)
    return None


# What a stall after interrupts is known to be on each design (README, "The interrupt stall"). It is
# one Go-side bug on both: the stream's consumer stops reading when the client goes, and the
# producer's send blocks for good inside Completion, which holds the runner's only semaphore slot.
_STALLS = {
    DESIGN_GO_RUNNERS: "on Ollama v0.13.x this is the known interrupt stall (a cancelled stream's callback "
                       "blocks on `ch <- res` in GenerateHandler while holding the runner semaphore)",
    DESIGN_LLAMA_SERVER: "on Ollama v0.30+ this is the same interrupt stall as on v0.13 (GenerateHandler's "
                         "callback blocks on `ch <- res` inside llamaServerRunner.Completion, which holds the runner "
                         "semaphore; llama-server itself is idle and never sees the request)",
}
# The way out: a new runner has a new semaphore (tried on v0.34.4: the next request answered).
_REMEDIES = {DESIGN_LLAMA_SERVER: "unload the model (a request with keep_alive 0, or `ollama stop MODEL`) "
                                  "or restart Ollama"}


def _as_tracer_error(err: Exception, options: BenchOptions, version: str | None = None) -> TracerError:
    name = type(err).__name__
    text = str(err)
    engine = options.backend if options.backend != BACKEND_OLLAMA else None
    if engine is not None:
        if "Timeout" in name or "timed out" in text:
            return TracerError(f"{engine} at {options.host} accepted a request and then sent nothing for "
                               f"{options.request_timeout_s:g} s; read its log.", ExitCode.SERVER_STALLED)
        if "Connect" in name or "ConnectionError" in name:
            return TracerError(f"lost the connection to {engine} at {options.host} ({name}: {text[:200]}).",
                               ExitCode.OLLAMA_UNREACHABLE)
        return TracerError(f"the benchmark failed on {engine}: {name}: {text}", ExitCode.FAILURE)
    if "Timeout" in name or "timed out" in text:
        known = _STALLS.get(design_for(version), "on Ollama v0.13.x this is the known interrupt stall")
        return TracerError(
            f"Ollama {version or '(version unknown)'} at {options.host} accepted a request and then sent nothing "
            f"for {options.request_timeout_s:g} s; {known}: {_REMEDIES.get(design_for(version), 'restart Ollama')}.",
            ExitCode.SERVER_STALLED,
        )
    if "ConnectError" in name or "ConnectionError" in name or "Failed to connect" in text:
        return TracerError(f"lost the connection to Ollama at {options.host} ({name}).",
                           ExitCode.OLLAMA_UNREACHABLE)
    if "not found" in text:
        return TracerError(f"model {options.model!r} is not available: {text}", ExitCode.MODEL_NOT_FOUND)
    return TracerError(f"the benchmark failed: {name}: {text}", ExitCode.FAILURE)


def _clean(value: Any) -> Any:
    """JSON has no NaN: a one-sample stdev becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
