"""A user's script, unmodified by tracer: the OpenAI Python SDK against Ollama's
OpenAI-compatible endpoint, streaming ``/v1/chat/completions`` (or ``/v1/completions`` with
``TARGET_ENDPOINT=completions``), closing the stream after 300 ms, and asking again.
"""

import os
import sys
import time

import openai


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    host = host if "://" in host else f"http://{host}"
    client = openai.OpenAI(base_url=f"{host}/v1", api_key="ollama",
                           timeout=float(os.environ.get("TARGET_TIMEOUT_S", "60")))
    chat = os.environ.get("TARGET_ENDPOINT", "chat") == "chat"

    def ask(prompt: str, **extra: object) -> object:
        if chat:
            return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  stream=True, **extra)  # type: ignore[call-overload]
        return client.completions.create(model=model, prompt=prompt, stream=True, **extra)  # type: ignore[call-overload]

    for _ in range(int(os.environ.get("TARGET_ITERATIONS", "3"))):
        started = time.monotonic()
        with ask("tell me a long story") as stream:  # type: ignore[attr-defined]
            for _chunk in stream:
                if time.monotonic() - started > 0.3:
                    break  # leaving the `with` closes the stream: the interrupt
        with ask("and another", max_tokens=4) as stream:  # type: ignore[attr-defined]
            for _chunk in stream:
                pass


if __name__ == "__main__":
    main()
