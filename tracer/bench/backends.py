"""The engines `tracer bench interrupt` can run its scenario on, behind one interface.

Every backend starts a streamed completion and hands back its chunks in one shape, Ollama's
``/api/generate`` chunk: ``done`` on the last, and on it the second stage's timing fields in
nanoseconds (``prompt_eval_duration``, ``eval_duration``, ``total_duration``) and token counts,
when the engine reports them. The scenario (``bench.interrupt``) is the same on all of them:

* ``ollama``: the ``ollama`` SDK or raw HTTP with ``requests`` on ``/api/generate``.
* ``llama-server``: upstream llama.cpp's server alone, its own ``/completion`` (``native``,
  server-sent events with ``requests``) or its OpenAI-compatible ``/v1/chat/completions``
  (``openai``, the OpenAI SDK). The model is the one the server was started with; ``--model``
  must be its alias (``/v1/models``).
* ``llama-cpp-python``: in-process, no server. The interrupt is leaving the generator (its
  ``close()``), and the first token is the first chunk the second call yields.

A chunk that carries no text (the OpenAI stream's opening role-only delta) is not a token: a
backend skips it, so "first token" means the same thing on every one.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ollama_tracer.instrument.genai import StreamRecorder
from ollama_tracer.instrument.llama_cpp_client import IN_PROCESS_URL  # the address its spans carry: no server
from ollama_tracer.vocabulary import ENV_GENAI_PROVIDER, LLAMA_SERVER, PROVIDER_LLAMA_CPP
from opentelemetry import trace

BACKEND_OLLAMA = "ollama"
BACKEND_LLAMA_SERVER = LLAMA_SERVER
BACKEND_LLAMA_CPP_PYTHON = "llama-cpp-python"
BACKENDS = (BACKEND_OLLAMA, BACKEND_LLAMA_SERVER, BACKEND_LLAMA_CPP_PYTHON)
# Each backend's clients; the first is its default.
CLIENTS = {BACKEND_OLLAMA: ("sdk", "http"), BACKEND_LLAMA_SERVER: ("native", "openai"),
           BACKEND_LLAMA_CPP_PYTHON: ("library",)}
DEFAULT_N_CTX = 4096  # Ollama's default num_ctx, for the engines whose context is fixed at load


class StageStream:
    """One streamed request, as an iterator of chunk dicts, and how to interrupt it."""

    def __init__(self, opened: Iterator[dict[str, Any]], close: Callable[[], None]) -> None:
        self._iter = opened
        self.close = close

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iter


class Backend(Protocol):
    def stream(self, prompt: str, num_predict: int | None, num_ctx: int | None) -> StageStream: ...


@dataclass(frozen=True)
class StreamSettings:
    host: str | None
    model: str
    client: str
    record_content: bool
    request_timeout_s: float
    n_ctx: int | None = None


def final_chunk(prompt_ms: float | None, predicted_ms: float | None, prompt_n: int | None,
                predicted_n: int | None) -> dict[str, Any]:
    """An engine's own prefill and decode times, as Ollama's final-chunk fields (ns)."""
    prompt_ns, eval_ns = int((prompt_ms or 0.0) * 1e6), int((predicted_ms or 0.0) * 1e6)
    return {"done": True, "prompt_eval_duration": prompt_ns, "eval_duration": eval_ns,
            "total_duration": prompt_ns + eval_ns, "load_duration": 0,
            "prompt_eval_count": prompt_n, "eval_count": predicted_n}


class OllamaBackend:
    """Ollama's ``/api/generate``, through the SDK or ``requests``; both instrumented alike."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        if settings.client == "sdk":
            import ollama
            from ollama_tracer.instrument.ollama_client import OllamaInstrumentor

            OllamaInstrumentor().instrument(record_content=settings.record_content)
            self._sdk = ollama.Client(host=settings.host, timeout=settings.request_timeout_s)
        else:
            import requests
            from ollama_tracer.instrument.requests_client import RequestsInstrumentor

            RequestsInstrumentor().instrument(record_content=settings.record_content)
            self._session = requests.Session()

    def stream(self, prompt: str, num_predict: int | None, num_ctx: int | None) -> StageStream:
        options: dict[str, Any] = {}
        if num_predict is not None:
            options["num_predict"] = num_predict
        if num_ctx is not None:
            options["num_ctx"] = num_ctx
        if self.settings.client == "sdk":
            generator = self._sdk.generate(model=self.settings.model, prompt=prompt, stream=True,
                                           options=options or None)

            def sdk_chunks() -> Iterator[dict[str, Any]]:
                for part in generator:
                    yield part.model_dump()

            return StageStream(sdk_chunks(), generator.close)  # type: ignore[attr-defined]
        body: dict[str, Any] = {"model": self.settings.model, "prompt": prompt, "stream": True}
        if options:
            body["options"] = options
        response = self._session.post(f"{self.settings.host}/api/generate", json=body, stream=True,
                                      timeout=(10, self.settings.request_timeout_s))
        response.raise_for_status()

        def http_chunks() -> Iterator[dict[str, Any]]:
            for line in response.iter_lines():
                if line:
                    part = json.loads(line)
                    if "error" in part:
                        raise RuntimeError(str(part["error"]))
                    yield part

        return StageStream(http_chunks(), response.close)


class LlamaServerBackend:
    """llama.cpp's ``llama-server`` alone: ``/completion`` (native) or ``/v1/chat/completions`` (openai)."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        # The OpenAI-compatible calls' provider is not in their path (Ollama serves it too).
        os.environ.setdefault(ENV_GENAI_PROVIDER, PROVIDER_LLAMA_CPP)
        if settings.client == "openai":
            import openai
            from ollama_tracer.instrument.httpx_client import HttpxInstrumentor

            HttpxInstrumentor().instrument(record_content=settings.record_content)  # the OpenAI SDK's HTTP
            self._openai = openai.OpenAI(base_url=f"{settings.host}/v1", api_key="none",
                                         timeout=settings.request_timeout_s, max_retries=0)
        else:
            import requests
            from ollama_tracer.instrument.requests_client import RequestsInstrumentor

            RequestsInstrumentor().instrument(record_content=settings.record_content)
            self._session = requests.Session()

    def stream(self, prompt: str, num_predict: int | None, num_ctx: int | None) -> StageStream:
        if self.settings.client == "openai":
            return self._openai_stream(prompt, num_predict)
        body: dict[str, Any] = {"prompt": prompt, "stream": True, "n_predict": num_predict or -1}
        # One connection per request, as Ollama's own server calls llama-server (DisableKeepAlives).
        # With keep-alive, a second stage sometimes went out on the interrupted stream's connection
        # under eBPF (2 of 5 captures; never without eBPF, in 600 requests): llama-server read the
        # new POST in the middle of the old stream and closed the connection (RemoteDisconnected).
        response = self._session.post(f"{self.settings.host}/completion", json=body, stream=True,
                                      headers={"Connection": "close"},
                                      timeout=(10, self.settings.request_timeout_s))
        response.raise_for_status()

        def chunks() -> Iterator[dict[str, Any]]:
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                part = json.loads(line[6:])
                if "error" in part:
                    raise RuntimeError(str(part["error"]))
                if part.get("stop"):
                    timings = part.get("timings") or {}
                    yield final_chunk(timings.get("prompt_ms"), timings.get("predicted_ms"),
                                      timings.get("prompt_n"), timings.get("predicted_n"))
                elif part.get("content"):
                    yield {"done": False, "response": part["content"]}

        return StageStream(chunks(), response.close)

    def _openai_stream(self, prompt: str, num_predict: int | None) -> StageStream:
        stream = self._openai.chat.completions.create(
            model=self.settings.model, messages=[{"role": "user", "content": prompt}], stream=True,
            max_tokens=num_predict, stream_options={"include_usage": True})

        def chunks() -> Iterator[dict[str, Any]]:
            for chunk in stream:
                timings = (chunk.model_extra or {}).get("timings")
                if timings:  # llama-server's own, on the closing usage chunk
                    yield final_chunk(timings.get("prompt_ms"), timings.get("predicted_ms"),
                                      timings.get("prompt_n"), timings.get("predicted_n"))
                elif chunk.choices and chunk.choices[0].delta.content:
                    yield {"done": False, "response": chunk.choices[0].delta.content}

        return StageStream(chunks(), stream.close)


def import_llama_cpp(lib_dir: Path | None) -> Any:
    """``llama_cpp``, loading llama.cpp from ``lib_dir`` (``$LLAMA_CPP_LIB_PATH`` wins; None: the
    package's own copy), with its CPU backend: a library built with dynamic backends (Ollama's
    build, which the testbed's llama-cpp-python reuses) loads none until asked. ImportError when
    the package is not installed or cannot load the library."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        lib_dir = Path(os.environ["LLAMA_CPP_LIB_PATH"])
    if lib_dir is not None:
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lib_dir))
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as err:
        raise ImportError(str(err)) from err
    if lib_dir is not None and (lib_dir / "libggml.so").exists():
        ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
        if ggml.ggml_backend_dev_count() == 0:
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
    return llama_cpp


class LlamaCppPythonBackend:
    """llama-cpp-python in this process: the model is a GGUF file, loaded once."""

    def __init__(self, settings: StreamSettings, model_path: Path, lib_dir: Path | None) -> None:
        self.settings = settings
        llama_cpp = import_llama_cpp(lib_dir)
        self._lib = llama_cpp
        self._llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=settings.n_ctx or DEFAULT_N_CTX,
                                    verbose=False)

    def stream(self, prompt: str, num_predict: int | None, num_ctx: int | None) -> StageStream:
        """Token by token (``Llama.generate``), a chunk per token. Not ``create_completion``: it
        detokenizes the whole completion at every step and holds back text that is not yet valid
        UTF-8, so a model that samples byte tokens (the synthetic llama) yields nothing for
        thousands of tokens, and a chunk-driven interrupt never comes."""
        llm, context = self._llm, self._llm.ctx
        # The call's own GenAI span, as the HTTP instrumentations record one: `tracer capture`
        # finds the interrupt and the next call's first token from it (in-process: no connection).
        recorder = StreamRecorder(trace.get_tracer("tracer.bench.llama_cpp_python"), url=IN_PROCESS_URL,
                                  body={"model": self.settings.model, "prompt": prompt,
                                        "options": {"num_predict": num_predict}},
                                  stream=True, record_content=self.settings.record_content)
        self._lib.llama_perf_context_reset(context)
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        limit = num_predict if num_predict is not None else llm.n_ctx() - len(tokens)
        generator = llm.generate(tokens, top_k=40, top_p=0.95, min_p=0.05, temp=0.8, reset=True)  # llama-server's
        recorder.request_written()  # handed to the library: nothing is in flight before its first token

        def chunks() -> Iterator[dict[str, Any]]:
            for count, token in enumerate(generator):
                if count >= limit or llm.token_eos() == token:
                    break
                recorder.response_started()
                part = {"done": False, "response": llm.detokenize([token]).decode(errors="replace")}
                recorder.chunk(part)
                yield part
            perf = self._lib.llama_perf_context(context)
            final = final_chunk(perf.t_p_eval_ms, perf.t_eval_ms, perf.n_p_eval, perf.n_eval)
            # Its own timings, without a total: an Ollama total comes with the chunks' created_at times.
            recorder.chunk({key: value for key, value in final.items()
                            if key not in ("total_duration", "load_duration")})
            recorder.end()
            yield final

        def close() -> None:
            generator.close()
            recorder.end(cancelled=not recorder.done)

        return StageStream(chunks(), close)
