"""Several clients at once, each interrupting a stream and asking again, in lock-step.

Unmodified by tracer. ``argv[1]`` lists one model per client (comma-separated); every round
all clients start their first stream together (a barrier), so their requests overlap inside
the server: with ``OLLAMA_NUM_PARALLEL=2`` two run in one runner at the same time.
``TARGET_HOSTS`` (comma-separated, one per client) sends each client to its own address (say,
one through a delaying relay); by default all use ``OLLAMA_HOST``.
"""

import os
import sys
import threading
import time

import ollama


def client(model: str, host: str | None, rounds: int, barrier: threading.Barrier,
           failures: list[BaseException]) -> None:
    try:
        if os.environ.get("TARGET_TRUTH"):  # which thread asked which address: the harness's ground truth
            with open(os.environ["TARGET_TRUTH"], "a") as out:
                out.write(f"{threading.get_ident()} {host or ''}\n")
        session = ollama.Client(host=host, timeout=float(os.environ.get("TARGET_TIMEOUT_S", "60")))
        for _ in range(rounds):
            barrier.wait(timeout=120)
            stream = session.generate(model=model, prompt=f"story for {threading.get_ident()}", stream=True)
            started = time.monotonic()
            for _part in stream:
                if time.monotonic() - started > 0.3:
                    break
            stream.close()  # type: ignore[attr-defined]
            for _part in session.generate(model=model, prompt="and again", stream=True, options={"num_predict": 4}):
                pass
    except BaseException as err:  # report, and let the others finish their rounds
        failures.append(err)
        barrier.abort()


def main() -> int:
    models = sys.argv[1].split(",")
    rounds = int(os.environ.get("TARGET_ROUNDS", "3"))
    barrier = threading.Barrier(len(models))
    failures: list[BaseException] = []
    hosts = os.environ.get("TARGET_HOSTS", "").split(",") if os.environ.get("TARGET_HOSTS") else [None] * len(models)
    threads = [threading.Thread(target=client, args=(m, h or None, rounds, barrier, failures))
               for m, h in zip(models, hosts, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for failure in failures:
        print(f"client failed: {failure!r}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
