"""The seed's other engines, measured: interrupt → first token on each, in one interleaved run.

Runs `tracer bench interrupt` (same prompts, same interrupt time, same num_predict) on:

* ``ollama 0.13.5`` and ``ollama 0.34.4``: the testbed's servers (the ``ollama`` SDK);
* ``llama-server native`` and ``llama-server openai``: llama.cpp's server alone, the testbed's
  (`tracer testbed up --llama-server`, built from the same llama.cpp as Ollama v0.34.4), through
  its own ``/completion`` and through the OpenAI SDK on ``/v1/chat/completions``;
* ``llama-cpp-python``: in-process, loading that same llama.cpp build.

Every round runs each engine once per model, in an order that rotates, so drift and noise hit
every engine alike. It prints, per engine and model, the median and p95 of the interval over all
measured iterations, its largest parts, and the ratio of its median to Ollama v0.13.5's and
v0.34.4's, with a 95 % bootstrap interval. The parts: on Ollama, the server phases rebuilt from
its response (source=response); on the other engines, the engine's own prefill time and the rest
of the interval (HTTP, tokenizing, the first decode, the client).

A v0.13.5 interrupt stall (docs/interrupt-stall.md) restarts that server (`tracer testbed up`)
and runs the engine once more; a stall is counted and said.

    python3 benchmarks/engines.py --rounds 5 --iterations 4 [--models tracer-gemma3:test] [--json F]

It starts the testbed it needs (`tracer testbed up --ollama 0.13.5,0.34.4 --llama-server`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import ratio_ci  # the benchmarks share one bootstrap

MODELS = ("tracer-gemma3:test", "tracer-llama:test")
# engine -> (backend, client, Ollama version or None)
ENGINES: dict[str, tuple[str, str, str | None]] = {
    "ollama 0.13.5": ("ollama", "sdk", "0.13.5"),
    "ollama 0.34.4": ("ollama", "sdk", "0.34.4"),
    "llama-server native": ("llama-server", "native", None),
    "llama-server openai": ("llama-server", "openai", None),
    "llama-cpp-python": ("llama-cpp-python", "library", None),
}
BASELINES = ("ollama 0.13.5", "ollama 0.34.4")
# Its own prompt every iteration, from its first token on: no engine's prompt cache (Ollama's
# runner, llama-server's slot, llama-cpp-python's) can serve the second stage's prefill. The run,
# round and engine are in it too: llama-server keeps earlier prompts' states in RAM for its whole
# life (its --cache-ram), and restored "{iteration}: ..." of an earlier round or run instead of
# evaluating it (prompt_eval_count 1), which once made its prefill look shorter than it is.
SECOND_PROMPT = "{run}-{round}-{engine}-{{iteration}}: now answer a different question: explain, in detail, how " \
                "rivers shape cities."
RUN = time.time_ns()
STALLED = 11


def _tracer(*args: str, timeout: float = 3000) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollama_tracer", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def testbed() -> dict[str, Any]:
    proc = _tracer("testbed", "up", "--ollama", "0.13.5,0.34.4", "--llama-server", "--json")
    if proc.returncode != 0:
        raise SystemExit(f"engines: `tracer testbed up` failed (exit {proc.returncode}): {proc.stderr[-600:]}")
    return dict(json.loads(proc.stdout))


def hosts(description: dict[str, Any], engine: str, model: str) -> list[str]:
    backend, _client, version = ENGINES[engine]
    if backend == "ollama":
        return ["--host", next(s["host"] for s in description["servers"]
                               if s["version"] == version and s["layout"] == "plain")]
    if backend == "llama-server":
        return ["--host", next(s["host"] for s in description["llama_servers"] if s["model"] == model)]
    return []


def run_engine(description: dict[str, Any], engine: str, model: str, iterations: int, interrupt_ms: float,
               out: Path, round_index: int = 0) -> tuple[list[dict[str, Any]], bool]:
    """The measured iterations of one bench run, and whether the server stalled first."""
    backend, client, version = ENGINES[engine]
    prompt = SECOND_PROMPT.format(run=RUN, round=round_index, engine=list(ENGINES).index(engine))
    args = ["bench", "interrupt", "--backend", backend, "--client", client, "--model", model,
            "--iterations", str(iterations), "--warmup", "1", "--interrupt-after-ms", str(interrupt_ms),
            "--num-predict", "16", "--second-prompt", prompt, "--request-timeout", "30", "--json", str(out)]
    proc = _tracer(*args, *hosts(description, engine, model), timeout=600)
    stalled = proc.returncode == STALLED and version is not None
    if stalled:  # the v0.13 interrupt deadlock: `testbed up` restarts that server on the same port
        _tracer("testbed", "up", "--ollama", str(version))
        proc = _tracer(*args, *hosts(description, engine, model), timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"engines: {engine} on {model} failed (exit {proc.returncode}): {proc.stderr[-600:]}")
    return [it for it in json.loads(out.read_text())["iterations"] if not it["warmup"]], stalled


def parts(backend: str, iterations: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The interval's largest parts, medians in ms, largest first."""
    named: dict[str, list[float]] = {}
    for it in iterations:
        if backend == "ollama":
            for phase in it["phases"]:
                named.setdefault(phase["name"], []).append(phase["duration_ms"])
        else:
            prefill = it["second_stage_timings"]["prompt_eval_ms"]
            named.setdefault("engine prefill", []).append(prefill)
            named.setdefault("rest (HTTP, tokenize, first decode, client)", []).append(
                max(0.0, it["interrupt_to_first_token_ms"] - prefill))
    medians = [(name, statistics.median(values)) for name, values in named.items() if values]
    return sorted(medians, key=lambda item: -item[1])


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def rotate(items: list[str], by: int) -> Iterable[str]:
    by %= len(items)
    return items[by:] + items[:by]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--iterations", type=int, default=4, help="measured iterations per run (default: 4)")
    parser.add_argument("--interrupt-after-ms", type=float, default=300.0, help="(default: 300)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: both synthetic)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    models, engines = args.models.split(","), args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    description = testbed()
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {(e, m): [] for e in engines for m in models}
    stalls: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for model in models:
                for engine in rotate(engines, round_index):
                    out = Path(tmp) / f"{engine.replace(' ', '_')}-{model.replace(':', '_')}-{round_index}.json"
                    measured, stalled = run_engine(description, engine, model, args.iterations,
                                                   args.interrupt_after_ms, out, round_index)
                    samples[(engine, model)] += measured
                    stalls[engine] = stalls.get(engine, 0) + int(stalled)
            print(f"engines: round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = []
    for model in models:
        for engine in engines:
            iterations = samples[(engine, model)]
            values = [it["interrupt_to_first_token_ms"] for it in iterations]
            row: dict[str, Any] = {"engine": engine, "model": model, "n": len(values),
                                   "median_ms": statistics.median(values), "p95_ms": p95(values),
                                   "parts": parts(ENGINES[engine][0], iterations), "stalls": stalls.get(engine, 0)}
            for baseline in BASELINES:
                if baseline in engines:
                    base = [it["interrupt_to_first_token_ms"] for it in samples[(baseline, model)]]
                    row[f"ratio_to {baseline}"] = statistics.median(values) / statistics.median(base)
                    row[f"ci_to {baseline}"] = ratio_ci(values, base)
            rows.append(row)
    print("| engine | model | n | median | p95 | largest parts (median) | ÷ Ollama 0.13.5 | ÷ Ollama 0.34.4 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        top = ", ".join(f"{name} {ms:.1f}" for name, ms in row["parts"][:2])
        ratios = [f"{row[f'ratio_to {b}']:.2f} [{row[f'ci_to {b}'][0]:.2f}, {row[f'ci_to {b}'][1]:.2f}]"
                  if f"ratio_to {b}" in row else "-" for b in BASELINES]
        print(f"| {row['engine']} | {row['model']} | {row['n']} | {row['median_ms']:.1f} ms | {row['p95_ms']:.1f} ms "
              f"| {top} | {ratios[0]} | {ratios[1]} |")
    if any(stalls.values()):
        print(f"\nstalls (server restarted, run again): {stalls}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "rounds": args.rounds, "iterations": args.iterations,
                                         "interrupt_after_ms": args.interrupt_after_ms}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
