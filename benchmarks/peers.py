"""What our client-side instrumentation costs per request, beside the ones people already use.

The same streamed ``/api/generate`` (the ``ollama`` SDK, 4 tokens, the testbed's tracer-llama),
in separate processes, interleaved round by round (each round runs every arm once, in a rotated
order), with the spans of every instrumented arm exported to the same local OTLP/HTTP receiver:

* ``plain``: no instrumentation;
* ``openllmetry``: Traceloop's ``opentelemetry-instrumentation-ollama``;
* ``openlit``: ``openlit.init()`` (its metrics off: the receiver takes traces; content capture
  off, as ours is by default);
* ``ours``: what ``tracer capture`` installs in a Python client: the ``ollama`` SDK's GenAI span,
  its request-written and first-token moments as its attributes (one span per call), and our
  requests/httpx instrumentation (the maintained httpx span is left out of the SDK's calls);
* ``ours-run``: what ``tracer run`` installs: the same, with the two moments also as child spans
  (``client.request``, ``client.first_token``) for a backend that shows spans.

Per request it reports the client process's CPU time (all its threads, the exporters' included:
each arm flushes its spans before the clock stops) and the wall time, the median over rounds with
a 95 % interval, and each arm's cost over ``plain`` paired by round.

The peers need their own environments (OpenLIT needs an OpenTelemetry API older than ours):
``--setup`` makes them under ~/.cache/ollama-tracer/benchmarks/peers/ from PyPI.

    python3 benchmarks/peers.py --setup --rounds 8 --requests 80
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENVS = Path.home() / ".cache" / "ollama-tracer" / "benchmarks" / "peers"
CLIENT_PINS = ["ollama==0.6.3", "httpx==0.29.0"]  # the same client library in every environment
ENVIRONMENTS = {
    # ours and OpenLLMetry share one (OpenTelemetry as this project pins it); OpenLIT 1.45 imports
    # opentelemetry._events, which the API dropped after 1.39.
    "main": [*CLIENT_PINS, "opentelemetry-sdk==1.45.2", "opentelemetry-exporter-otlp-proto-http==1.45.2",
             "opentelemetry-instrumentation-ollama==0.62.4", "-e", str(REPO)],
    "openlit": [*CLIENT_PINS, "openlit==1.45.0", "opentelemetry-api==1.39.1", "opentelemetry-sdk==1.39.1"],
}
ARMS = {"plain": "main", "openllmetry": "main", "openlit": "openlit", "ours": "main", "ours-run": "main"}


def _python(env: str) -> Path:
    return VENVS / env / "bin" / "python"


def setup() -> None:
    for env, packages in ENVIRONMENTS.items():
        if _python(env).exists():
            continue
        print(f"peers: making the {env} environment ({' '.join(p for p in packages if p != '-e')}) ...",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENVS / env)], check=True)
        subprocess.run([str(_python(env)), "-m", "pip", "install", "-q", *packages], check=True)


# ------------------------------------------------------------------------------------------ worker


def _instrument(arm: str, endpoint: str) -> Any:
    """Install ``arm``'s instrumentation; the provider to flush at the end (None: nothing to flush)."""
    if arm == "plain":
        return None
    if arm == "openlit":
        import openlit

        openlit.init(otlp_endpoint=endpoint, disable_metrics=True, capture_message_content=False,
                     application_name="peers", environment="benchmark")
        from opentelemetry import trace

        return trace.get_tracer_provider()
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces")))
    trace.set_tracer_provider(provider)
    if arm == "openllmetry":
        from opentelemetry.instrumentation.ollama import OllamaInstrumentor as Traceloop

        Traceloop().instrument(tracer_provider=provider)
    elif arm in ("ours", "ours-run"):  # exactly what the auto-instrumentation installs
        from ollama_tracer.instrument.moments import ENV_CLIENT_MOMENTS, MOMENTS_AS_ATTRIBUTES

        if arm == "ours":  # as `tracer capture` runs it: one span per call
            os.environ[ENV_CLIENT_MOMENTS] = MOMENTS_AS_ATTRIBUTES
        from ollama_tracer.instrument.httpx_client import HttpxInstrumentor
        from ollama_tracer.instrument.ollama_client import OllamaInstrumentor
        from ollama_tracer.instrument.requests_client import RequestsInstrumentor

        OllamaInstrumentor().instrument()
        RequestsInstrumentor().instrument()
        HttpxInstrumentor().instrument()
    else:
        raise SystemExit(f"unknown arm {arm!r}")
    return provider


def worker(arm: str, host: str, model: str, requests: int, endpoint: str) -> dict[str, float]:
    provider = _instrument(arm, endpoint)
    import ollama

    client = ollama.Client(host=host)

    def one() -> None:
        for _ in client.generate(model=model, prompt="Count: one two three", stream=True,
                                 options={"num_predict": 4, "temperature": 0}):
            pass

    for _ in range(10):  # warm: connections, imports, the model resident
        one()
    if provider is not None:
        provider.force_flush()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        one()
    if provider is not None:
        provider.force_flush()  # the exporter's work is part of the cost
    return {"cpu_us": (time.process_time() - cpu) / requests * 1e6,
            "wall_us": (time.perf_counter() - wall) / requests * 1e6}


# -------------------------------------------------------------------------------------------- main


def _interval(values: list[float]) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median (fixed seed)."""
    rng = random.Random(18)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
    return medians[int(0.025 * len(medians))], medians[int(0.975 * len(medians)) - 1]


def _server(version: str, model: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "ollama_tracer", "testbed", "up", "--ollama", version, "--json"],
                          capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"testbed up --ollama {version} failed: {proc.stderr.strip()[-500:]}")
    return str(next(s for s in json.loads(proc.stdout)["servers"] if s["version"] == version)["host"])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--versions", default="0.13.5,0.34.4")
    parser.add_argument("--model", default="tracer-llama:test")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=80, help="measured requests per arm and round")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--setup", action="store_true", help="make the peers' environments first (PyPI)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.host, args.model, args.requests, args.endpoint)))
        return 0
    if args.setup:
        setup()
    arms = args.arms.split(",")
    missing = [env for env in {ARMS[a] for a in arms} if not _python(env).exists()]
    if missing:
        raise SystemExit(f"the peers' environments are missing ({', '.join(missing)}): run with --setup once")
    from ollama_tracer.collectors.otlp_receiver import OtlpReceiver

    results: dict[str, Any] = {}
    with OtlpReceiver() as receiver:
        for version in args.versions.split(","):
            host = _server(version, args.model)
            per: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
            for round_ in range(args.rounds):
                order = arms[round_ % len(arms):] + arms[:round_ % len(arms)]
                for arm in order:
                    proc = subprocess.run(
                        [str(_python(ARMS[arm])), __file__, "--worker", arm, "--host", host, "--model", args.model,
                         "--requests", str(args.requests), "--endpoint", receiver.http_endpoint],
                        capture_output=True, text=True, timeout=600, check=False,
                        env={**os.environ, "OTEL_SDK_DISABLED": "false"})
                    if proc.returncode != 0:
                        raise SystemExit(f"{arm} on {version} failed: {proc.stderr[-800:]}")
                    per[arm].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  {version} round {round_ + 1}/{args.rounds}: " + ", ".join(
                    f"{a} {per[a][-1]['cpu_us']:.0f} µs" for a in arms), file=sys.stderr, flush=True)
            results[version] = per
        spans = len(receiver.spans())
    for version, per in results.items():
        print(f"\nOllama {version}, {args.model}: streamed /api/generate of 4 tokens, {args.rounds} interleaved "
              f"rounds of {args.requests} requests per arm")
        print(f"{'arm':>12} {'CPU µs/request':>15} {'95% interval':>17} {'over plain µs':>14} {'95% interval':>17} "
              f"{'× plain':>8} {'wall µs':>8}")
        plain = [r["cpu_us"] for r in per.get("plain", [])]
        for arm in arms:
            cpu = [r["cpu_us"] for r in per[arm]]
            low, high = _interval(cpu)
            row = f"{arm:>12} {statistics.median(cpu):>15.0f} {f'[{low:.0f}, {high:.0f}]':>17}"
            if plain and arm != "plain":
                over = [c - p for c, p in zip(cpu, plain, strict=True)]
                olow, ohigh = _interval(over)
                ratio = statistics.median(c / p for c, p in zip(cpu, plain, strict=True))
                row += f" {statistics.median(over):>14.0f} {f'[{olow:.0f}, {ohigh:.0f}]':>17} {ratio:>8.2f}"
            else:
                row += f" {'':>14} {'':>17} {'':>8}"
            print(row + f" {statistics.median(r['wall_us'] for r in per[arm]):>8.0f}")
    print(f"\nspans received by the local OTLP receiver: {spans}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
