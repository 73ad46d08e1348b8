"""A user's script, unmodified by tracer: ``requests`` streaming Ollama's OpenAI-compatible
``/v1/chat/completions`` as server-sent events, closing after 300 ms, and asking again.
"""

import os
import sys
import time

import requests


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    url = (host if "://" in host else f"http://{host}") + "/v1/chat/completions"
    timeout = float(os.environ.get("TARGET_TIMEOUT_S", "60"))
    with requests.Session() as session:
        for _ in range(int(os.environ.get("TARGET_ITERATIONS", "3"))):
            started = time.monotonic()
            body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "tell me a long story"}]}
            with session.post(url, json=body, stream=True, timeout=timeout) as response:
                for _line in response.iter_lines():
                    if time.monotonic() - started > 0.3:
                        break  # leaving the `with` closes the response: the interrupt
            body = {"model": model, "stream": True, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "and another"}]}
            with session.post(url, json=body, stream=True, timeout=timeout) as response:
                for line in response.iter_lines():
                    if line == b"data: [DONE]":
                        break


if __name__ == "__main__":
    main()
