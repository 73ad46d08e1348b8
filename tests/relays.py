"""Loopback TCP relays that inject known delays between a client and a real server (this kernel
has no netem): the ground truth of the accuracy tests."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DelayProxy:
    """A loopback TCP proxy that holds each client→server chunk for ``delay_s``: a known delay
    on the wire between the client and the server (this kernel has no netem). It measures how
    long it really held each request (``held_ns``): on a busy machine a sleep overshoots, and the
    ground truth is what was injected, not what was asked for."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.delay_s = delay_s
        self.upstream_port = upstream_port
        self.held_ns: list[int] = []  # per POST /api/generate: its bytes received → sent on
        self.sent_ns: list[int] = []  # per POST /api/generate: when it was sent on (epoch ns, the client's clock)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b, delay in ((client, upstream, self.delay_s), (upstream, client, 0.0)):
                threading.Thread(target=self._pump, args=(a, b, delay), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(65536):
                received = time.monotonic_ns()
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
                if data.startswith(b"POST /api/generate"):
                    self.held_ns.append(time.monotonic_ns() - received)
                    self.sent_ns.append(time.time_ns())
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def measure_injected_delay(capture: Callable[[Path, str], dict[str, Any]], upstream_port: int, tmp_path: Path,
                           delay_ms: float = 40.0, phase: str = "server.receive"
                           ) -> tuple[float, float, float, float]:
    """(how much ``phase`` grew, how much the relay really added, the delayed arm's median hold, the
    phase's own noise), all in ms. ``capture(out, bench_host)`` runs a captured benchmark against
    ``bench_host`` and returns its attribution, once through a relay with no delay and once with
    ``delay_ms`` on the request.

    What the relay really added to a request is timed from the client's own "request written"
    (the end of its ``client.request``) to the relay's send, on the same clock: on a busy machine
    the relay's threads wait for the CPU too, before and after the sleep, and that is as much the
    injected delay as the sleep. The noise is the larger interquartile range of ``phase`` minus that
    in either arm."""
    medians, added, held, spreads = {}, {}, {}, []
    for label, delay in (("baseline", 0.0), ("delayed", delay_ms / 1000)):
        proxy = DelayProxy(upstream_port, delay)
        try:
            attribution = capture(tmp_path / label, f"http://127.0.0.1:{proxy.port}")
        finally:
            proxy.close()
        values, relayed = [], []
        for iv in (iv for iv in attribution["intervals"] if not iv["warmup"]):
            written = max(p["end_ns"] for p in iv["phases"] if p["name"] == "client.request")
            sent = min((t for t in proxy.sent_ns if t >= written), default=None)
            if sent is None:
                continue
            values.append(sum(p["duration_ms"] for p in iv["phases"] if p["name"] == phase))
            relayed.append((sent - written) / 1e6)
        assert len(values) >= 3, f"{label}: too few intervals matched the relay's requests"
        medians[label] = statistics.median(values)
        added[label] = statistics.median(relayed)
        quartiles = statistics.quantiles([v - r for v, r in zip(values, relayed, strict=True)], n=4)
        spreads.append(quartiles[2] - quartiles[0])
        held[label] = statistics.median(ns / 1e6 for ns in proxy.held_ns)
    return (medians["delayed"] - medians["baseline"], added["delayed"] - added["baseline"], held["delayed"],
            max(spreads))


def delay_bound_ms(injected_ms: float, noise_ms: float) -> float:
    """How far the attribution may be off: the harness's target (1 ms or 5 %, the larger), or three
    times the phase's own noise where a loaded machine makes that larger."""
    return max(1.0, 0.05 * injected_ms, 3 * noise_ms)
