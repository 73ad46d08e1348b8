"""Interrupt a stream that goes through one address, and ask again at another.

Unmodified by tracer. The streamed request goes to ``TARGET_INTERRUPT_HOST`` (for the accuracy
harness, a relay that holds the client's close, so the server learns of the interrupt late);
the next request goes straight to ``OLLAMA_HOST``. So the interval from the interrupt to the
next first token holds nothing of the relay's own: only what the late interrupt costs the server.
"""

import os
import sys
import time

import ollama


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    timeout = float(os.environ.get("TARGET_TIMEOUT_S", "60"))
    interrupted = ollama.Client(host=os.environ.get("TARGET_INTERRUPT_HOST"), timeout=timeout)
    direct = ollama.Client(timeout=timeout)
    for _ in range(int(os.environ.get("TARGET_ITERATIONS", "3"))):
        stream = interrupted.generate(model=model, prompt="tell me a long story", stream=True)
        started = time.monotonic()
        for _part in stream:
            if time.monotonic() - started > 0.3:
                break
        stream.close()  # type: ignore[attr-defined]
        for _part in direct.generate(model=model, prompt="and another", stream=True, options={"num_predict": 4}):
            pass


if __name__ == "__main__":
    main()
