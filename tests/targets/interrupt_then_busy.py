"""A user's script, unmodified by tracer: interrupt a stream, do some CPU work, ask again.

The CPU work runs in a function with a name no library has, so a test can look for it in the
stacks of the phase during which it ran (``client.gap``) and nowhere else.
"""

import os
import sys
import time

import ollama


def busy_spin_between_requests(seconds: float) -> int:
    end = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < end:
        count += 1
    return count


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-gemma3:test"
    iterations = int(os.environ.get("TARGET_ITERATIONS", "3"))
    client = ollama.Client(timeout=float(os.environ.get("TARGET_TIMEOUT_S", "60")))
    for _ in range(iterations):
        stream = client.generate(model=model, prompt="tell me a story", stream=True)
        started = time.monotonic()
        for _part in stream:
            if time.monotonic() - started > 0.3:
                break
        stream.close()  # type: ignore[attr-defined]
        busy_spin_between_requests(0.2)
        for _part in client.generate(model=model, prompt="and another", stream=True, options={"num_predict": 4}):
            pass


if __name__ == "__main__":
    main()
