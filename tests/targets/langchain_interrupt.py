"""A user's script, unmodified by tracer: LangChain's ``ChatOllama`` streaming, leaving the
stream after 300 ms, and asking again (it calls Ollama's ``/api/chat`` through the ollama SDK).
"""

import os
import sys
import time

from langchain_ollama import ChatOllama


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    timeout = float(os.environ.get("TARGET_TIMEOUT_S", "60"))
    llm = ChatOllama(model=model, base_url=host if "://" in host else f"http://{host}",
                     client_kwargs={"timeout": timeout})
    short = ChatOllama(model=model, base_url=llm.base_url, num_predict=4, client_kwargs={"timeout": timeout})
    for _ in range(int(os.environ.get("TARGET_ITERATIONS", "3"))):
        started = time.monotonic()
        stream = llm.stream("tell me a long story")
        for _chunk in stream:
            if time.monotonic() - started > 0.3:
                break
        stream.close()  # the interrupt: closes the generator chain down to the HTTP response
        for _chunk in short.stream("and another"):
            pass


if __name__ == "__main__":
    main()
