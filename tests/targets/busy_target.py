"""A target for the py-spy tests: idle, one clearly named busy function, idle.

It prints the epoch-ns bounds of the busy function as one JSON line, so a test can check where
py-spy's (aligned) stacks put it.
"""

from __future__ import annotations

import json
import sys
import time

IDLE_S = 0.3
BUSY_S = 0.6


def busy_spin_for_test(duration_s: float) -> int:
    """Pure-Python work that holds the GIL: every sample in this window shows this frame."""
    deadline = time.perf_counter() + duration_s
    turns = 0
    while time.perf_counter() < deadline:
        turns += 1
    return turns


def main() -> int:
    busy_s = float(sys.argv[1]) if len(sys.argv) > 1 else BUSY_S
    time.sleep(IDLE_S)
    started = time.time_ns()
    busy_spin_for_test(busy_s)
    ended = time.time_ns()
    print(json.dumps({"busy_start_ns": started, "busy_end_ns": ended}), flush=True)
    time.sleep(IDLE_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
