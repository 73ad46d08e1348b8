"""A user's script, unmodified by tracer: interrupt a stream on one model, ask the other.

With ``OLLAMA_MAX_LOADED_MODELS=1`` only one model fits, so every second request evicts the
interrupted one's runner (while that request is still being torn down) and loads its own model,
whose runner was itself evicted one round earlier: every interval holds an eviction and a load.
"""

import os
import sys
import time

import ollama


def main() -> None:
    models = (sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test,tracer-gemma3:test").split(",")
    client = ollama.Client(timeout=float(os.environ.get("TARGET_TIMEOUT_S", "60")))
    for i in range(int(os.environ.get("TARGET_ITERATIONS", "3"))):
        first, second = models[i % len(models)], models[(i + 1) % len(models)]
        stream = client.generate(model=first, prompt="tell me a story", stream=True)
        started = time.monotonic()
        for _part in stream:
            if time.monotonic() - started > 0.3:
                break
        stream.close()  # type: ignore[attr-defined]
        for _part in client.generate(model=second, prompt="and another", stream=True, options={"num_predict": 4}):
            pass


if __name__ == "__main__":
    main()
