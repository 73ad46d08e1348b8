"""Loopback TCP relays that inject known delays between a client and a real server (this kernel
has no netem): the ground truth of the accuracy harness (``benchmarks/accuracy.py``) and tests.

A :class:`DelayRelay` holds the bytes of one direction for ``delay_s`` (a delay line: each chunk
leaves that long after it arrived) and records, per
generation request (``POST /api/generate``, the OpenAI-compatible ones, llama-server's
``/completion``), when it really sent them on: on a busy machine a sleep overshoots and the
relay's own threads wait for the CPU too, so what is compared with the attribution is what was
injected, measured, not what was asked for.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ollama_tracer.instrument.genai import operation_for_path
from ollama_tracer.vocabulary import CLIENT_FIRST_TOKEN, CLIENT_REQUEST, SERVER_RECEIVE

REQUEST, RESPONSE = "request", "response"
CLOSE = "close"  # the client's end of a connection (EOF or reset), held before the server sees it


class DelayRelay:
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; holds each chunk of ``direction``
    (``request``: client → server, ``response``: server → client) for ``delay_s``; or, with
    ``close``, the client's closing of a connection: the server goes on streaming into the relay
    (which drops it) and learns of the interrupt ``delay_s`` late. With ``cycle_s``, each accepted
    connection takes the next of those delays in turn instead (``delay_s`` is then unused)."""

    def __init__(self, upstream_port: int, delay_s: float, direction: str = REQUEST,
                 cycle_s: Sequence[float] = ()) -> None:
        if direction not in (REQUEST, RESPONSE, CLOSE):
            raise ValueError(f"direction must be {REQUEST!r}, {RESPONSE!r} or {CLOSE!r}, not {direction!r}")
        self.delay_s, self.direction, self.upstream_port = delay_s, direction, upstream_port
        self._cycle = itertools.cycle(cycle_s or (delay_s,))
        self.held_ns: list[int] = []  # per generate: its request (or first response chunk) received → sent on
        self.sent_ns: list[int] = []  # per generate: when it was sent on (epoch ns; a request: its last chunk)
        self.received_ns: list[int] = []  # per generate: when the relay received it (epoch ns)
        self.closes_ns: list[tuple[int, int]] = []  # close: (client's close seen, passed on), epoch ns
        self.close_delays_s: list[float] = []  # close: the delay that connection was asked to hold it
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the server is gone (restarted elsewhere?): this client gets a reset
                client.close()
                continue
            generate = threading.Event()  # this connection's request is a generate: time its response
            held = next(self._cycle)
            threading.Thread(target=self._pump, args=(client, upstream, REQUEST, generate, held), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, RESPONSE, generate, held), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, generate: threading.Event,
              held: float) -> None:
        delay = held if direction == self.direction else 0.0
        hold_close = self.direction == CLOSE and held > 0
        # A delay line, not a sleep per chunk: every chunk leaves ``delay`` after it arrived, so
        # a request the client wrote in two sends (headers, then body) is late once, not twice.
        line: queue.Queue[tuple[int, int, bytes] | None] = queue.Queue()
        state: dict[str, int] = {}  # this connection's current generate request: its index in the lists
        sender = threading.Thread(target=self._send_later, args=(line, dst, direction, generate, delay, state),
                                  daemon=True)
        if delay:
            sender.start()
        client_gone = False
        try:
            while data := src.recv(65536):
                received_mono, received = time.monotonic_ns(), time.time_ns()
                if direction == REQUEST and data[:5] in (b"POST ", b"GET /", b"HEAD "):
                    (generate.set if generation_request(data) else generate.clear)()
                if hold_close and direction == RESPONSE:
                    if not client_gone:  # once the client is gone, drain the server and drop it
                        try:
                            dst.sendall(data)
                        except OSError:
                            client_gone = True
                    continue
                if delay:
                    line.put((received_mono, received, data))
                    continue
                dst.sendall(data)
                self._record(direction, data, generate, received_mono, received, state)
        except OSError:
            pass
        finally:
            if delay:
                line.put(None)
                sender.join(timeout=10 + delay)
            if direction == REQUEST and self.direction == CLOSE:  # the client closed (EOF or reset)
                seen = time.time_ns()
                time.sleep(held)
                with self._lock:
                    self.closes_ns.append((seen, time.time_ns()))
                    self.close_delays_s.append(held)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _send_later(self, line: queue.Queue[tuple[int, int, bytes] | None], dst: socket.socket, direction: str,
                    generate: threading.Event, delay: float, state: dict[str, int]) -> None:
        while (item := line.get()) is not None:
            received_mono, received, data = item
            time.sleep(max(0.0, (received_mono + delay * 1e9 - time.monotonic_ns()) / 1e9))
            try:
                dst.sendall(data)
            except OSError:
                return
            self._record(direction, data, generate, received_mono, received, state)

    def _record(self, direction: str, data: bytes, generate: threading.Event, received_mono: int,
                received: int, state: dict[str, int]) -> None:
        """What is timed, in the relay's own direction: the generate request itself (until its
        last chunk, the body, is sent on), or the first response bytes to one (the headers with
        the first chunk)."""
        if direction != self.direction:
            return
        with self._lock:
            if direction == REQUEST and not generation_request(data):
                if "index" in state and generate.is_set():  # the rest of the request (its body)
                    self.sent_ns[state["index"]] = time.time_ns()
                return
            if direction == RESPONSE and not (data.startswith(b"HTTP/") and generate.is_set()):
                return
            state["index"] = len(self.sent_ns)
            self.held_ns.append(time.monotonic_ns() - received_mono)
            self.sent_ns.append(time.time_ns())
            self.received_ns.append(received)

    def request_added_ns(self, began_ns: int, written_ns: int) -> int | None:
        """What the relay added to the generate request a client began at ``began_ns`` (the start
        of its ``client.request``) and finished writing at ``written_ns`` (its end): from that end to
        the relay's send of the request's last chunk, 0 when the relay had passed it on before the
        client's span ended. The request is the first the relay received from ``began_ns`` on, so a
        span that ends a moment after an undelayed forward is never matched with the next request.
        None when the relay received no request then."""
        with self._lock:
            entries = [(received, sent) for received, sent in zip(self.received_ns, self.sent_ns, strict=True)
                       if received >= began_ns]
        if not entries:
            return None
        _received, sent = min(entries)
        return max(0, sent - written_ns)

    def close(self) -> None:
        self.listener.close()


def generation_request(data: bytes) -> bool:
    """Does ``data`` start a generation request (``POST`` to any of vocabulary.GENERATION_ENDPOINTS:
    Ollama's, its OpenAI-compatible ones, llama-server's own ``/completion``)?"""
    if not data.startswith(b"POST "):
        return False
    return operation_for_path(data[5:].split(b" ", 1)[0].decode(errors="replace")) is not None


@dataclass(frozen=True)
class InjectedDelay:
    """One ground-truth case, in ms: how much ``phase`` grew, how much the relay really added, the
    delayed arm's median hold, and the phase's own noise (the larger interquartile range, in either
    arm, of the phase minus what the relay added)."""

    phase: str
    direction: str
    grew_ms: float
    injected_ms: float
    held_ms: float
    noise_ms: float
    intervals: int

    @property
    def error_ms(self) -> float:
        return self.grew_ms - self.injected_ms

    @property
    def bound_ms(self) -> float:
        return delay_bound_ms(self.injected_ms, self.noise_ms)


def measure_injected_delay(capture: Callable[[Path, str], dict[str, Any]], upstream_port: int, workdir: Path,
                           delay_ms: float = 40.0, phase: str = SERVER_RECEIVE,
                           direction: str = REQUEST) -> InjectedDelay:
    """``capture(out, host)`` runs a captured benchmark against ``host`` and returns its
    attribution: once through a relay with no delay, once with ``delay_ms`` on ``direction``.

    What the relay really added is timed on one clock, against the client's own spans: on the
    request path from the client's "request written" (the end of ``client.request``) to the
    relay's send; on the response path from the relay's receipt of the first response bytes to
    their arrival at the client (the start of ``client.first_token``). Both include the relay's
    threads waiting for the CPU, which on a busy machine is as much the injected delay as the sleep.
    """
    medians, added, held, spreads, counts = {}, {}, {}, [], []
    for label, delay in (("baseline", 0.0), ("delayed", delay_ms / 1000)):
        relay = DelayRelay(upstream_port, delay, direction)
        try:
            attribution = capture(workdir / label, relay.url)
        finally:
            relay.close()
        values, relayed = [], []
        for iv in (iv for iv in attribution["intervals"] if not iv["warmup"]):
            names = {p["name"]: p for p in iv["phases"]}
            if direction == REQUEST:
                if CLIENT_REQUEST not in names:
                    continue
                requests = [p for p in iv["phases"] if p["name"] == CLIENT_REQUEST]
                extra = relay.request_added_ns(min(p["start_ns"] for p in requests), max(p["end_ns"] for p in requests))
            else:
                if CLIENT_FIRST_TOKEN not in names:
                    continue
                arrived = min(p["start_ns"] for p in iv["phases"] if p["name"] == CLIENT_FIRST_TOKEN)
                got = max((t for t in relay.received_ns if t <= arrived), default=None)
                extra = None if got is None else arrived - got
            if extra is None:
                continue
            values.append(sum(p["duration_ms"] for p in iv["phases"] if p["name"] == phase))
            relayed.append(extra / 1e6)
        if len(values) < 3:
            raise ValueError(f"{label}: only {len(values)} interval(s) matched the relay's requests")
        medians[label], added[label] = statistics.median(values), statistics.median(relayed)
        quartiles = statistics.quantiles([v - r for v, r in zip(values, relayed, strict=True)], n=4)
        spreads.append(quartiles[2] - quartiles[0])
        held[label] = statistics.median(ns / 1e6 for ns in relay.held_ns) if relay.held_ns else 0.0
        counts.append(len(values))
    return InjectedDelay(phase, direction, medians["delayed"] - medians["baseline"],
                         added["delayed"] - added["baseline"], held["delayed"], max(spreads), min(counts))


def delay_bound_ms(injected_ms: float, noise_ms: float) -> float:
    """How far the attribution may be off: the harness's target (1 ms or 5 %, the larger), or three
    times the phase's own noise where a loaded machine makes that larger."""
    return max(1.0, 0.05 * injected_ms, 3 * noise_ms)
