"""Auto-instrumentation of Python programs with no code change (the sitecustomize pattern).

``tracer capture`` / ``tracer run`` put the ``bootstrap`` directory first on ``PYTHONPATH``;
Python imports its ``sitecustomize.py`` at start-up, which calls :func:`initialize`.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path

from ollama_tracer.instrument.clock_marker import ENV_MARKER_FILE, ENV_PYSPY_MARKER, start_clock_marker
from ollama_tracer.instrument.moments import ENV_CLIENT_MOMENTS, MOMENTS_AS_ATTRIBUTES
from ollama_tracer.vocabulary import SERVICE_CLIENT

log = logging.getLogger("tracer.autoinstrument")

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "bootstrap"
ENV_ACTIVE = "TRACER_AUTOINSTRUMENT"  # set by the launcher; "1" means instrument this process
ENV_RECORD_CONTENT = "TRACER_RECORD_CONTENT"

def _remove_bootstrap_from_pythonpath() -> None:
    """Grandchildren must not initialise twice: the first process takes the directory out."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    kept = [p for p in parts if Path(p).resolve() != BOOTSTRAP_DIR]
    if kept:
        os.environ["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        os.environ.pop("PYTHONPATH", None)


def initialize() -> None:
    """Install the OTel SDK (from OTEL_*) and instrument the ollama client, requests and httpx
    (with httpx2: the OpenAI SDK), and llama-cpp-python once the program imports it.

    Any failure is logged and swallowed: the traced program must run exactly as without us.
    """
    _remove_bootstrap_from_pythonpath()
    if os.environ.pop(ENV_ACTIVE, None) != "1":
        return
    if os.environ.get(ENV_PYSPY_MARKER) == "1":
        start_clock_marker()  # first: the OTel imports below take a while, py-spy is already sampling
    try:
        from ollama_tracer.instrument.httpx_client import HttpxInstrumentor
        from ollama_tracer.instrument.llama_cpp_client import LlamaCppInstrumentor
        from ollama_tracer.instrument.ollama_client import OllamaInstrumentor
        from ollama_tracer.instrument.requests_client import RequestsInstrumentor
        from ollama_tracer.otel_setup import configure_from_env

        record_content = os.environ.get(ENV_RECORD_CONTENT) == "1"
        provider = configure_from_env(os.environ.get("OTEL_SERVICE_NAME", SERVICE_CLIENT))
        OllamaInstrumentor().instrument(record_content=record_content)
        RequestsInstrumentor().instrument(record_content=record_content)
        HttpxInstrumentor().instrument(record_content=record_content)  # plain httpx, the OpenAI SDK
        LlamaCppInstrumentor().instrument(record_content=record_content)  # when it imports llama_cpp
        _write_marker()
        if provider is not None:
            atexit.register(provider.shutdown)  # flush what the program traced
    except Exception:
        print("tracer: auto-instrumentation failed; the program runs untraced", file=sys.stderr)
        log.debug("auto-instrumentation failed", exc_info=True)


def _write_marker() -> None:
    """Note (pid, time_ns) so the capture can align this process's clocks and stacks."""
    path = os.environ.get(ENV_MARKER_FILE)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write(f"{os.getpid()} {time.time_ns()} {time.monotonic_ns()}\n")


def child_env(
    base: dict[str, str],
    *,
    endpoint: str | None,
    protocol: str = "grpc",
    service_name: str = SERVICE_CLIENT,
    record_content: bool = False,
    marker_file: str | None = None,
    moments_as_attributes: bool = False,
) -> dict[str, str]:
    """The environment that makes a Python child export its Ollama spans to ``endpoint``.
    ``moments_as_attributes``: one span per call, its client moments as attributes (a capture,
    which rebuilds their spans when it reads its records: collectors.otlp)."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join([str(BOOTSTRAP_DIR), *filter(None, [base.get("PYTHONPATH")])])
    env[ENV_ACTIVE] = "1"
    env.setdefault("OTEL_SERVICE_NAME", service_name)
    if endpoint is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
        env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
        env.pop("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", None)
        # Proxies in the environment must not swallow spans bound for loopback.
        no_proxy = ",".join(filter(None, [base.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        # Spans reach the capture within 0.2 s of ending (the SDK default is 5 s): what a killed or
        # disk-full capture keeps is then what had happened, not what happened to be flushed.
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")
    if record_content:
        env[ENV_RECORD_CONTENT] = "1"
    if marker_file is not None:
        env[ENV_MARKER_FILE] = marker_file
    if moments_as_attributes:
        env[ENV_CLIENT_MOMENTS] = MOMENTS_AS_ATTRIBUTES
    return env
