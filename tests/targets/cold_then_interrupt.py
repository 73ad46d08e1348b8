"""A user's script, unmodified by tracer: stream with ``keep_alive: 0``, interrupt, ask again.

``keep_alive: 0`` unloads the model as soon as its request ends (Ollama's documented way to
free memory), and an interrupted request ends at the interrupt: the next request starts the
runner from scratch, inside the interrupt interval (a cold start). ``TARGET_KEEP_ALIVE`` sets
another keep_alive (the harness's warm baseline: ``5m``).
"""

import os
import sys
import time

import ollama


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    client = ollama.Client(timeout=float(os.environ.get("TARGET_TIMEOUT_S", "60")))
    setting = os.environ.get("TARGET_KEEP_ALIVE", "0")
    keep_alive: int | str = int(setting) if setting.lstrip("-").isdigit() else setting
    for _ in range(int(os.environ.get("TARGET_ITERATIONS", "2"))):
        stream = client.generate(model=model, prompt="tell me a story", stream=True, keep_alive=keep_alive)
        started = time.monotonic()
        for _part in stream:
            if time.monotonic() - started > 0.3:
                break
        stream.close()  # type: ignore[attr-defined]
        try:
            for _part in client.generate(model=model, prompt="and another", stream=True, options={"num_predict": 4}):
                pass
        except ollama.ResponseError as err:
            # Ollama v0.13's own race: keep_alive 0 kills the runner while the scheduler has just
            # handed it this request ("llama runner process no longer running", 500). Once more.
            if "no longer running" not in str(err):
                raise
            print(f"target: Ollama failed the request ({err}); asking once more", file=sys.stderr)
            for _part in client.generate(model=model, prompt="and another", stream=True, options={"num_predict": 4}):
                pass


if __name__ == "__main__":
    main()
