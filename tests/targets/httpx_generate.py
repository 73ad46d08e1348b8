"""A user's script, unmodified by tracer: plain ``httpx`` streaming ``/api/generate`` (no SDK),
closing the response after 300 ms, and asking again. ``TARGET_ASYNC=1`` does it with
``httpx.AsyncClient``.
"""

import asyncio
import json
import os
import sys
import time

import httpx


def _host() -> str:
    host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    return host if "://" in host else f"http://{host}"


def _body(model: str, prompt: str, **options: int) -> dict[str, object]:
    return {"model": model, "prompt": prompt, "options": options}


def run_sync(model: str, iterations: int, timeout: float) -> None:
    with httpx.Client(base_url=_host(), timeout=timeout) as client:
        for _ in range(iterations):
            started = time.monotonic()
            with client.stream("POST", "/api/generate", json=_body(model, "tell me a long story")) as response:
                for _line in response.iter_lines():
                    if time.monotonic() - started > 0.3:
                        break  # leaving the `with` closes the response: the interrupt
            with client.stream("POST", "/api/generate", json=_body(model, "and another", num_predict=4)) as response:
                for line in response.iter_lines():
                    if line and json.loads(line).get("done"):
                        break


async def run_async(model: str, iterations: int, timeout: float) -> None:
    async with httpx.AsyncClient(base_url=_host(), timeout=timeout) as client:
        for _ in range(iterations):
            started = time.monotonic()
            async with client.stream("POST", "/api/generate", json=_body(model, "tell me a long story")) as response:
                async for _line in response.aiter_lines():
                    if time.monotonic() - started > 0.3:
                        break
            async with client.stream("POST", "/api/generate",
                                     json=_body(model, "and another", num_predict=4)) as response:
                async for _line in response.aiter_lines():
                    pass


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    iterations = int(os.environ.get("TARGET_ITERATIONS", "3"))
    timeout = float(os.environ.get("TARGET_TIMEOUT_S", "60"))
    if os.environ.get("TARGET_ASYNC") == "1":
        asyncio.run(run_async(model, iterations, timeout))
    else:
        run_sync(model, iterations, timeout)


if __name__ == "__main__":
    main()
