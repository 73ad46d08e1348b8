"""A port forwarder that holds each request ``DELAY_S`` before passing it on: the ground truth of
the forwarder's phase. ``python delay_forwarder.py UPSTREAM_PORT DELAY_S`` prints its port, and on
SIGTERM what it measured per POST /api/generate (JSON): how long it held each, and when it sent
each on (epoch ns).

It names itself ``delay-forwarder`` (its comm, what eBPF selects processes by) before any thread
starts, so that the tracer's forwarder filter picks exactly it and not every Python process."""

from __future__ import annotations

import ctypes
import json
import signal
import sys

PR_SET_NAME = 15
ctypes.CDLL(None).prctl(PR_SET_NAME, b"delay-forwarder", 0, 0, 0)

from ollama_tracer.testbed.relay import REQUEST, DelayRelay  # noqa: E402 (after the rename: its threads inherit it)

relay = DelayRelay(int(sys.argv[1]), float(sys.argv[2]), REQUEST)
print(relay.port, flush=True)


def _stop(*_: object) -> None:
    print(json.dumps({"held_ms": [ns / 1e6 for ns in relay.held_ns], "sent_ns": relay.sent_ns}), flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, _stop)
while True:
    signal.pause()
