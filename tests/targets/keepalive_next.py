"""Send the next request on a keep-alive connection while the previous response still streams.

Unmodified by tracer, and plain sockets: no client library, so nothing of its own is traced. It
writes a streamed /api/generate request, waits for the response's headers, then writes a second
request on the same connection (HTTP/1.1 pipelining) and reads both responses to their
terminators. Ollama's Go server reads the second request's first byte in the background while it
still streams the first, and the rest only after it: the capture must still see two requests.
A keep-alive client (a connection pool, a proxy) does the same by chance when its next request
arrives just as the server finishes a response.
"""

import json
import os
import socket
import sys
import time
from urllib.parse import urlparse


def _request(host: str, model: str, prompt: str, tokens: int) -> bytes:
    body = json.dumps({"model": model, "prompt": prompt, "options": {"num_predict": tokens}}).encode()
    return (f"POST /api/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "tracer-llama:test"
    address = urlparse(os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"))
    host, port = address.hostname or "127.0.0.1", address.port or 11434
    deadline = time.monotonic() + float(os.environ.get("TARGET_TIMEOUT_S", "60"))
    with socket.create_connection((host, port), timeout=5) as connection:
        connection.sendall(_request(host, model, "tell me a long story", 64))
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(65536)
        connection.sendall(_request(host, model, "and another", 4))
        while received.count(b"\r\n0\r\n\r\n") < 2:
            if time.monotonic() > deadline:
                began = received.count(b"HTTP/1.1 200")
                sys.exit(f"keepalive_next: both responses did not end in time ({began} began)")
            chunk = connection.recv(65536)
            if not chunk:
                sys.exit("keepalive_next: the server closed the connection before the second response ended")
            received += chunk
    print(f"keepalive_next: {received.count(b'HTTP/1.1 200 OK')} responses on one connection")


if __name__ == "__main__":
    main()
