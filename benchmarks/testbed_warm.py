"""Warm, uninterrupted streamed requests to each testbed model: client time to first token and
Ollama's load_duration and prompt_eval_duration (median of N).

    python3 benchmarks/testbed_warm.py [--requests 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import requests

MODELS = ("tracer-gemma3:test", "tracer-llama:test")


def one(host: str, model: str) -> dict[str, float]:
    body = {"model": model, "prompt": "Tell me a long story about the river", "stream": True,
            "options": {"num_predict": 8}}
    start = time.perf_counter()
    first = None
    final: dict = {}
    with requests.post(f"{host}/api/generate", json=body, stream=True, timeout=120) as response:
        for line in response.iter_lines():
            if not line:
                continue
            if first is None:
                first = time.perf_counter()
            part = json.loads(line)
            if part.get("done"):
                final = part
    assert first is not None
    return {"ttft_ms": (first - start) * 1e3, "load_ms": final["load_duration"] / 1e6,
            "prompt_eval_ms": final["prompt_eval_duration"] / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"))
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {}
    for model in MODELS:
        one(args.host, model)  # warm it
        runs = [one(args.host, model) for _ in range(args.requests)]
        result[model] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for model, stats in result.items():
            print(f"{model}: TTFT {stats['ttft_ms']:.2f} ms, load_duration {stats['load_ms']:.2f} ms, "
                  f"prompt_eval_duration {stats['prompt_eval_ms']:.2f} ms (median of {args.requests})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
