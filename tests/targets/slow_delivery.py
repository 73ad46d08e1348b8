"""A user's script, unmodified by tracer, whose own HTTP layer is slow to deliver: an httpx
transport (passed to ``ollama.Client``, as a user would for retries or proxies) holds the first
body chunk of every response for ``TARGET_DELIVERY_DELAY_MS`` after it arrived.

The time it really held each one (measured around the sleep) is appended, in ns, to the file
``TARGET_TRUTH`` names: the ground truth of ``client.first_token`` (bytes at the client → first
token handed to the caller).
"""

import os
import sys
import time
from collections.abc import Iterator

import httpx
import ollama


class HeldFirstChunk(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, delay_s: float, truth: list[int]) -> None:
        self.inner, self.delay_s, self.truth = inner, delay_s, truth

    def __iter__(self) -> Iterator[bytes]:
        first = True
        for chunk in self.inner:
            if first and self.delay_s > 0:
                start = time.perf_counter_ns()
                time.sleep(self.delay_s)
                self.truth.append(time.perf_counter_ns() - start)
            first = False
            yield chunk

    def close(self) -> None:
        self.inner.close()


class SlowTransport(httpx.BaseTransport):
    def __init__(self, delay_s: float, truth: list[int]) -> None:
        self.inner, self.delay_s, self.truth = httpx.HTTPTransport(), delay_s, truth

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path == "/api/generate" and isinstance(response.stream, httpx.SyncByteStream):
            response.stream = HeldFirstChunk(response.stream, self.delay_s, self.truth)
        return response

    def close(self) -> None:
        self.inner.close()


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    truth: list[int] = []
    transport = SlowTransport(float(os.environ.get("TARGET_DELIVERY_DELAY_MS", "40")) / 1000, truth)
    client = ollama.Client(timeout=float(os.environ.get("TARGET_TIMEOUT_S", "60")), transport=transport)
    try:
        for i in range(int(os.environ.get("TARGET_ITERATIONS", "3"))):
            stream = client.generate(model=model, prompt="tell me a story", stream=True)
            started = time.monotonic()
            for _part in stream:
                if time.monotonic() - started > 0.3:
                    break
            stream.close()  # type: ignore[attr-defined]
            for _part in client.generate(model=model, prompt=f"{i} and another", stream=True,
                                         options={"num_predict": 4}):
                pass
    finally:
        if os.environ.get("TARGET_TRUTH"):
            with open(os.environ["TARGET_TRUTH"], "a") as out:
                out.writelines(f"{ns}\n" for ns in truth)


if __name__ == "__main__":
    main()
