"""A stall mid-benchmark keeps what was measured: the JSON holds the iterations before it and says
where and why it stopped. The stall is injected: a loopback relay in front of the real testbed
forwards everything but the response to one chosen /api/generate, which it swallows, so the
client sees a server that accepted a request and then sent nothing (as in Ollama's own stalls)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import heal_testbed, run_tracer

pytestmark = pytest.mark.integration

MODEL = "tracer-llama:test"


class StallingRelay:
    """Forwards loopback TCP to Ollama; the response to the ``stall_at``-th generate is swallowed."""

    def __init__(self, upstream: tuple[str, int], stall_at: int) -> None:
        self.upstream, self.stall_at = upstream, stall_at
        self.generates = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client), contextlib.closing(socket.create_connection(self.upstream)) as server:
            swallow = threading.Event()
            back = threading.Thread(target=self._pipe, args=(server, client, swallow), daemon=True)
            back.start()
            while data := _recv(client):
                if data.startswith(b"POST /api/generate"):
                    with self._lock:
                        self.generates += 1
                        if self.generates == self.stall_at:
                            swallow.set()
                server.sendall(data)
            back.join(timeout=1)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, swallow: threading.Event) -> None:
        while data := _recv(source):
            if not swallow.is_set():
                with contextlib.suppress(OSError):
                    sink.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.fixture()
def relay(testbed: dict[str, Any]) -> Iterator[StallingRelay]:
    parts = urlsplit(testbed["ollama_host"])
    # Each iteration makes two generates (the interrupted first stage, then the second): the 6th
    # is iteration 2's second stage, so iterations 0 and 1 are measured before the stall.
    relay = StallingRelay((parts.hostname or "127.0.0.1", parts.port or 11434), stall_at=6)
    yield relay
    relay.close()


def test_a_stall_keeps_the_iterations_measured_before_it(relay: StallingRelay, testbed: dict[str, Any],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "bench.json"

    def bench() -> subprocess.CompletedProcess[str]:
        return run_tracer("bench", "interrupt", "--host", f"http://127.0.0.1:{relay.port}", "--model", MODEL,
                          "--client", "http", "--warmup", "1", "--iterations", "4", "--interrupt-after-ms", "200",
                          "--request-timeout", "5", "--json", str(out), timeout=180)

    proc = bench()
    if relay.generates < relay.stall_at:  # Ollama's own interrupt stall came first (README): heal, once more
        print(f"\nNOTE: Ollama stalled before the injected stall: {proc.stderr.strip()[-200:]}", file=sys.stderr)
        heal_testbed(testbed)
        relay.generates = 0
        proc = bench()
    assert proc.returncode == 11, proc.stderr  # SERVER_STALLED
    assert "accepted a request and then sent nothing for 5 s" in proc.stderr
    assert "Ollama 0.13.5 at" in proc.stderr and "v0.13.x" in proc.stderr  # what is known of this version's stalls
    result = json.loads(out.read_text())
    assert [it["index"] for it in result["iterations"]] == [0, 1]
    assert result["stopped"]["at_iteration"] == 2 and result["stopped"]["exit_code"] == 11
    assert result["summary"]["interrupt_to_first_token_ms"]["n"] == 1  # iteration 1 (0 is the warm-up)
    assert "interrupt benchmark" in proc.stdout  # the table of what was measured is printed too
