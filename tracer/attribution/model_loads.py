"""Why a model was loaded: cold, expired, evicted or reloaded, from the runners' lives.

The eBPF collector records which model blob every runner was started with (``--model``, read
when the runner is first seen) and when each process of the server's tree exits (the
``sched_process_exit`` tracepoint). A load inside an interval starts a new runner; what happened
to the previous runner of the same model says why it was needed:

* ``reload``: the scheduler checked the loaded runner first (``needsReload``) and replaced it
  (the request's options, such as ``num_ctx``, differ; or its health check failed). A reload
  checks twice: ``GetRunner`` in the request's handler, then ``processPending``, which finds the
  runner still loaded, checks it again and expires it itself (:func:`scheduler_replaced`);
* ``expired``: this model's previous runner exited earlier in the capture, and no other model's
  runner was started right after it: its keep_alive ran out (``keep_alive: 0`` included), or an
  unload request ended it;
* ``evicted``: this model's previous runner exited and another model's runner started within
  :data:`EVICTION_WINDOW_NS` of it: the scheduler stopped it to make room
  (``OLLAMA_MAX_LOADED_MODELS``, or memory);
* ``cold load``: no runner of this model ran earlier in the capture.

Each reason comes with its evidence (the pids, and how long before the load the old runner went),
so the diagnosis can quote it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ollama_tracer.collectors.ebpf_events import EbpfRecords, ProbeEvent, Roles
from ollama_tracer.vocabulary import PROCESS_RUNNER, PROCESS_SERVER

# After the old runner exits, Ollama waits for its memory to come back (up to 5 s on a GPU)
# before starting the other model's runner.
EVICTION_WINDOW_NS = 6_000_000_000

RELOAD = ("reload: the loaded runner did not fit the request (options such as num_ctx changed, "
          "or its health check failed)")
COLD = "cold load: no runner was loaded"


@dataclass(frozen=True)
class Runner:
    pid: int
    model: str | None  # its model blob (None: not recorded, an older capture)
    started_ns: int | None  # its first event (None: it was running when the capture began)
    exited_ns: int | None  # None: still running when the capture stopped


def scheduler_replaced(window: list[ProbeEvent], roles: Roles, needs_reload: Collection[str],
                       load_ns: int) -> bool | None:
    """Did the scheduler replace a loaded runner for this request (a reload), from the
    ``needsReload`` hits before the load at ``load_ns``: True with two or more (the handler's
    check, then the scheduler's own, which expires the runner), False with one (the handler found
    the runner still loaded but already on its way out: its keep_alive ran out, ``keep_alive: 0``
    included, a moment before; the scheduler then found it gone and just loaded, so the reason is
    the old runner's exit, not a reload), None with none (needsReload was not probed, or no
    runner was loaded: the caller's other evidence decides). With other requests in the server
    the scheduler's hit may be set aside as theirs, so callers ask only when it was alone."""
    checks = sum(1 for e in window if e.kind == "U" and e.text in needs_reload and e.time_ns <= load_ns
                 and roles.get(e.pid) == PROCESS_SERVER)
    return None if checks == 0 else checks >= 2


def runners(ebpf: EbpfRecords) -> list[Runner]:
    """Every runner of the capture, in the order they were first seen."""
    first: dict[int, int] = {}
    exited: dict[int, int] = {}
    for event in ebpf.events:
        if ebpf.roles.get(event.pid) != PROCESS_RUNNER:
            continue
        first.setdefault(event.pid, event.time_ns)
        if event.kind == "E":
            exited[event.pid] = event.time_ns
    models = ebpf.meta.get("runner_models") or {}
    # Running when the capture began (recorded since children_at_start; before that, a runner
    # that already listened): its start is before the capture, not its first event.
    already = set(ebpf.meta.get("children_at_start") or []) | {
        int(s["pid"]) for s in ebpf.meta.get("sockets_at_start") or [] if isinstance(s, dict) and "pid" in s}
    return [Runner(pid, models.get(str(pid)), None if pid in already else started, exited.get(pid))
            for pid, started in first.items()]


def _short(blob: str | None) -> str:
    return (blob or "?").rsplit("/", 1)[-1][:19]


def load_reason(ebpf: EbpfRecords, load_ns: int, end_ns: int, *, reloaded: bool) -> dict[str, Any]:
    """``{"reason": ..., evidence...}`` for a model load that began at ``load_ns`` and had to be
    over by ``end_ns`` (the interval's end)."""
    if reloaded:
        return {"reason": RELOAD}
    lives = runners(ebpf)
    new = next((r for r in lives if r.started_ns is not None and load_ns <= r.started_ns <= end_ns), None)
    if new is None or new.model is None:
        return {"reason": COLD}  # which model was loaded is not known: nothing to compare with
    evidence: dict[str, Any] = {"runner_pid": new.pid, "runner_model": _short(new.model)}
    before = [r for r in lives if r.model == new.model and r.pid != new.pid
              and r.exited_ns is not None and r.exited_ns <= load_ns]
    if not before:
        return {"reason": "cold load: no runner of this model ran earlier in the capture", **evidence}
    old = max(before, key=lambda r: r.exited_ns or 0)
    assert old.exited_ns is not None
    ago_ms = round((load_ns - old.exited_ns) / 1e6, 3)
    evidence.update(previous_runner_pid=old.pid, previous_runner_exited_ms_before=ago_ms)
    window = (old.exited_ns, old.exited_ns + EVICTION_WINDOW_NS)
    successor = next((r for r in lives if r.model != new.model and r.started_ns is not None
                      and window[0] <= r.started_ns <= window[1]), None)
    if successor is not None and successor.started_ns is not None:
        after_ms = round((successor.started_ns - old.exited_ns) / 1e6, 3)
        evidence.update(evicted_for_runner_pid=successor.pid, evicted_for_model=_short(successor.model))
        return {"reason": (f"evicted: this model's runner (pid {old.pid}) was stopped {ago_ms:g} ms before this "
                           f"load to make room for another model, whose runner (pid {successor.pid}) started "
                           f"{after_ms:g} ms after it"), **evidence}
    return {"reason": (f"expired: this model's runner (pid {old.pid}) exited {ago_ms:g} ms before this load "
                       "(its keep_alive ran out, keep_alive 0 included, or an unload request ended it)"), **evidence}
