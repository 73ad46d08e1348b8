"""GPU evidence: one NVML sampler thread, written as ``raw/gpu_samples.jsonl`` plus ``raw/gpu_meta.json``.

Why each choice:

* ``nvmlInit`` runs once, in ``available()``, and ``nvmlShutdown`` once, in ``stop()``: init costs
  milliseconds and re-initialising per sample would dominate the sampler (scalene's habit: probe
  once, degrade to "no GPU" on any failure, say why in one sentence).
* Utilization comes from the driver's ring buffer (``nvmlDeviceGetSamples``) where it has entries:
  those are stamped by the driver at its own, finer cadence, so the timeline does not depend on
  when this thread woke up. The buffer runs dry when the GPU idles; after ``RING_STALE_NS`` (or two
  of the ring's own periods, if longer) with no new ring entry the point query
  ``nvmlDeviceGetUtilizationRates`` (a 1/6–1 s duty-cycle average) fills in, stamped with
  ``time.time_ns()`` at the midpoint of the call (the call's cost is in the meta, ``call_cost_ns``).
* One NVML query costs about 0.3 ms, so the per-tick cost is bounded by cadence: the ring buffer and
  the fallback are read every tick (``rate_hz``, default 100), per-process utilization every
  ``PROCESS_EVERY`` ticks and the slow metrics (memory used, SM/memory clocks, power, which on
  Ampere and newer is itself a 1 s average) every ``SLOW_EVERY`` ticks. Ring buffers are read with
  ``lastSeenTimeStamp``, so a slower cadence loses no entries, only latency.
* The clock domain of NVML's µs timestamps is not documented and differs between APIs and drivers
  (epoch µs for process samples in public reports, CLOCK_BOOTTIME on some Linux drivers for
  ``nvmlDeviceGetSamples``). It is decided per API from the first fresh batch by
  ``detect_clock_domain`` and recorded with its evidence; entries that cannot be placed on the
  epoch timeline are counted as ``unplaced``, never guessed.
* A per-sample driver error is counted per NVML function and never stops the thread; a function
  that answers "Not Supported" is recorded once and not called again.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files
from ollama_tracer.capture_files import GPU_META as RAW_META
from ollama_tracer.capture_files import GPU_SAMPLES as RAW_SAMPLES
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.base import SessionInfo

META_SCHEMA = "tracer.gpu/1"

SOURCES = ("samples", "query", "process")
# The vocabulary of the "metric" field: a consumer meets no other from this collector.
METRICS = ("gpu_util", "mem_util", "mem_used_bytes", "sm_clock_mhz", "mem_clock_mhz", "power_w",
           "proc_sm_util", "proc_mem_util")

CLOCK_DOMAIN_TOLERANCE_NS = 5_000_000_000
RING_STALE_NS = 250_000_000  # longer than the ring's cadence when busy, short enough to catch the idle edge
RING_STALE_MAX_NS = 1_000_000_000  # the point query's own averaging window at most
PROCESS_EVERY = 5
SLOW_EVERY = 10
PID_REFRESH_NS = 1_000_000_000  # runners start after the capture does
BEFORE_START_SLACK_NS = 1_000_000_000  # ring history older than this before start is not part of the capture
FLUSH_EVERY_NS = 500_000_000  # a killed capture loses at most this much; no fsync per row
MAX_RING_DELTAS = 4096

# pynvml's constants, used when an injected module lacks one (values from nvml.h).
_DEFAULTS = {
    "NVML_SUCCESS": 0, "NVML_ERROR_NOT_SUPPORTED": 3, "NVML_ERROR_NOT_FOUND": 6, "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9, "NVML_GPU_UTILIZATION_SAMPLES": 1, "NVML_MEMORY_UTILIZATION_SAMPLES": 2,
    "NVML_CLOCK_SM": 1, "NVML_CLOCK_MEM": 2,
}
# nvmlValueType_t -> the field of the c_nvmlValue_t union that holds the value.
_VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def detect_clock_domain(stamp_us: int, epoch_ns: int, boottime_ns: int, monotonic_ns: int,
                        tolerance_ns: int = CLOCK_DOMAIN_TOLERANCE_NS) -> str:
    """The clock an NVML µs timestamp was read from: the nearest of the three, or ``unknown``.

    Pass the newest stamp of a batch and the clocks read right after the call: a fresh entry is at
    most one ring period old, far less than the tolerance, while the domains are apart by the
    machine's uptime (epoch vs boottime) or its time suspended (boottime vs monotonic).
    """
    stamp_ns = stamp_us * 1000
    candidates = {"epoch": epoch_ns, "boottime": boottime_ns, "monotonic": monotonic_ns}
    name, distance = min(((n, abs(stamp_ns - v)) for n, v in candidates.items()), key=lambda item: item[1])
    return name if distance <= tolerance_ns else "unknown"


def sample_value(value_type: int, union: Any) -> float:
    """Read a ``c_nvmlValue_t`` union through the field its ``nvmlValueType_t`` names."""
    return float(getattr(union, _VALUE_FIELDS.get(int(value_type), "uiVal")))


def descendant_pids(roots: Iterable[int], proc: Path = Path("/proc")) -> set[int]:
    """``roots`` plus every live descendant, from ``/proc/PID/task/TID/children`` where the kernel has
    it (CONFIG_PROC_CHILDREN) and otherwise from the ppid field of every ``/proc/PID/stat``."""
    found = {pid for pid in roots if pid > 0}
    frontier = list(found)
    children_files = True
    while frontier and children_files:
        pid = frontier.pop()
        try:
            tasks = list((proc / str(pid) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                text = (task / "children").read_text()
            except FileNotFoundError:
                if (task / "stat").exists():  # the thread lives: the kernel lacks the file
                    children_files = False
                continue
            except OSError:
                continue
            for child in (int(word) for word in text.split()):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
    if children_files:
        return found
    parents: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # comm may hold spaces and parentheses
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    frontier = list(found)
    while frontier:
        for child in parents.get(frontier.pop(), ()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class _Ring:
    """One ring buffer of one GPU: where the last read stopped and how often the driver fills it."""

    last_seen_us: int = 0
    last_stamp_us: int | None = None
    last_fresh_mono_ns: int | None = None  # when a read last returned a placeable entry
    deltas_us: list[int] = field(default_factory=list)
    stale_after_ns: int = RING_STALE_NS

    def add_delta(self, delta_us: int) -> None:
        if len(self.deltas_us) < MAX_RING_DELTAS:
            self.deltas_us.append(delta_us)
        # A driver that fills its ring more slowly than RING_STALE_NS must not be taken for idle
        # between two entries. One long gap (the GPU idled) widens it only while it is the latest,
        # and never past RING_STALE_MAX_NS, so the idle edge is still caught.
        self.stale_after_ns = min(RING_STALE_MAX_NS, max(RING_STALE_NS, 2 * delta_us * 1000))

    def period_ns(self) -> int | None:
        return int(statistics.median(self.deltas_us) * 1000) if self.deltas_us else None


@dataclass
class _Gpu:
    index: int
    handle: Any
    name: str = ""
    uuid: str = ""
    memory_total_bytes: int | None = None
    rings: dict[str, _Ring] = field(default_factory=lambda: {"gpu_util": _Ring(), "mem_util": _Ring()})
    process_last_seen_us: int = 0
    unsupported: set[str] = field(default_factory=set)


class _Unsupported(Exception):
    """The driver answered Not Supported; the caller stops asking."""


class _Empty(Exception):
    """A ring buffer with nothing newer than ``lastSeenTimeStamp`` (Not Found)."""


class NvmlCollector:
    """GPU utilization, memory, clocks and power at ``rate_hz``, from NVML (the ``pynvml`` module)."""

    name = "nvml"

    def __init__(self, rate_hz: float = 100.0, *, nvml: Any = None,
                 pids: Callable[[], set[int]] | None = None) -> None:
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        self.rate_hz = float(rate_hz)
        self._nvml = nvml
        self._pids_source = pids
        self._probed: tuple[bool, str] | None = None
        self._initialised = False
        self._driver_version = ""
        self._gpus: list[_Gpu] = []
        self._session: SessionInfo | None = None
        self._out: capture_files.JsonlAppender | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._roots_lock = threading.Lock()
        self._roots: set[int] = set()
        self._pids: set[int] = set()
        self._pending: list[dict[str, Any]] = []
        # Counters: written by the sampler thread only, read after it has been joined.
        self.errors: dict[str, int] = {}
        self._rows_by_source = dict.fromkeys(SOURCES, 0)
        self._ticks = 0
        self._overruns = 0
        self._tick_cost_total_ns = 0
        self._tick_cost_max_ns = 0
        self._call_cost: dict[str, list[int]] = {}  # function -> [calls, total ns, max ns]
        self._clock_domain: dict[str, str | None] = {"samples": None, "process": None}
        self._clock_evidence: dict[str, dict[str, Any]] = {}
        self._unplaced = 0
        self._before_start = 0
        self._rejected = 0
        self._dropped = 0
        self._process_supported: bool | None = None
        self._started_ns = 0
        self._stopped_ns = 0

    # ------------------------------------------------------------------------------ protocol

    def available(self) -> tuple[bool, str]:
        """Load NVML and list the GPUs, once; any failure is one sentence and GPU sampling is skipped."""
        if self._probed is None:
            self._probed = self._probe()
        return self._probed

    def start(self, session: SessionInfo) -> None:
        ok, reason = self.available()
        self._session = session
        self._started_ns = time.time_ns()
        if not ok:
            self._write_meta(reason)
            return
        with self._roots_lock:
            if session.ollama_pid:
                self._roots.add(session.ollama_pid)
        if self._pids_source is None and session.ollama_pid is None and session.ollama_host:
            self._add_ollama_server(session.ollama_host)
        path = session.directory / RAW_SAMPLES
        path.unlink(missing_ok=True)  # the appender appends; a --force re-capture starts empty
        self._out = capture_files.JsonlAppender(path)
        self._write_meta()
        self._thread = threading.Thread(target=self._run, name="tracer-nvml", daemon=True)
        self._thread.start()

    def child_started(self, pid: int) -> None:
        """The captured command is of interest too (a workload that uses the GPU itself)."""
        with self._roots_lock:
            self._roots.add(pid)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():  # a driver call that never returns; what it had is still written
                self._count_error("stop:sampler_did_not_stop")
        self._flush()
        if self._out is not None:
            self._out.close()
        self._stopped_ns = time.time_ns()
        if self._initialised:
            self._initialised = False
            try:
                self._module().nvmlShutdown()
            except Exception:
                self._count_error("nvmlShutdown")
        ok, reason = self._probed or (False, "the collector was never started")
        if self._session is not None:
            self._write_meta("" if ok else reason)
        written = self._out.stats() if self._out is not None else {}
        return {
            "samples": self._written() - int(written.get("lost", 0)),
            "ticks": self._ticks,
            "errors": dict(self.errors),
            "dropped": self._dropped + int(written.pop("lost", 0)),
            **written,
            "unplaced": self._unplaced,
            "gpus": len(self._gpus),
            "clock_domain": dict(self._clock_domain),
        }

    # ------------------------------------------------------------------------------ set-up

    def _module(self) -> Any:
        if self._nvml is None:
            import pynvml

            self._nvml = pynvml
        return self._nvml

    def _const(self, name: str) -> int:
        return int(getattr(self._module(), name, _DEFAULTS[name]))

    def _probe(self) -> tuple[bool, str]:
        try:
            nvml = self._module()
        except ImportError:
            return False, ("the nvidia-ml-py package is not installed; GPU sampling skipped "
                           "(pip install nvidia-ml-py)")
        try:
            nvml.nvmlInit()
        except Exception as err:
            code = getattr(err, "value", None)
            if code == self._const("NVML_ERROR_LIBRARY_NOT_FOUND"):
                return False, f"no NVIDIA driver ({err}); GPU sampling skipped"
            if code == self._const("NVML_ERROR_DRIVER_NOT_LOADED"):
                return False, f"the NVIDIA driver is not loaded ({err}); GPU sampling skipped"
            return False, f"NVML could not start ({err}); GPU sampling skipped"
        self._initialised = True
        try:
            count = int(nvml.nvmlDeviceGetCount())
            self._driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception as err:
            self._shutdown_quietly()
            return False, f"NVML could not list the GPUs ({err}); GPU sampling skipped"
        for index in range(count):
            try:
                gpu = _Gpu(index=index, handle=nvml.nvmlDeviceGetHandleByIndex(index))
            except Exception:
                self._count_error("nvmlDeviceGetHandleByIndex")
                continue
            for attr, function in (("name", "nvmlDeviceGetName"), ("uuid", "nvmlDeviceGetUUID")):
                try:
                    setattr(gpu, attr, _text(getattr(nvml, function)(gpu.handle)))
                except Exception:
                    self._count_error(function)
            try:
                gpu.memory_total_bytes = int(nvml.nvmlDeviceGetMemoryInfo(gpu.handle).total)
            except Exception:
                self._count_error("nvmlDeviceGetMemoryInfo")
            self._gpus.append(gpu)
        if not self._gpus:
            self._shutdown_quietly()
            if count == 0:
                return False, "NVML found no GPU on this machine; GPU sampling skipped"
            return False, f"NVML lists {count} GPU(s) but none could be opened; GPU sampling skipped"
        return True, ""

    def _shutdown_quietly(self) -> None:
        self._initialised = False
        try:
            self._module().nvmlShutdown()
        except Exception:
            self._count_error("nvmlShutdown")

    def _add_ollama_server(self, host: str) -> None:
        try:
            from ollama_tracer.deployment import server_pid

            pid = server_pid(host)
        except Exception:
            return
        if pid is not None:
            with self._roots_lock:
                self._roots.add(pid)

    # ------------------------------------------------------------------------------ sampling

    def _run(self) -> None:
        period_ns = max(1, round(1e9 / self.rate_hz))
        next_tick = time.monotonic_ns()
        next_pids = next_tick
        next_flush = next_tick + FLUSH_EVERY_NS
        while not self._stop.is_set():
            began = time.monotonic_ns()
            try:
                if began >= next_pids:
                    next_pids = began + PID_REFRESH_NS
                    self._refresh_pids()
                self._tick(self._ticks)
                if began >= next_flush:
                    next_flush = began + FLUSH_EVERY_NS
                    self._flush()
            except Exception as err:  # the thread must outlive anything a driver or a disk does
                self._count_error(f"tick:{type(err).__name__}")
            self._ticks += 1
            ended = time.monotonic_ns()
            cost = ended - began
            self._tick_cost_total_ns += cost
            self._tick_cost_max_ns = max(self._tick_cost_max_ns, cost)
            next_tick += period_ns
            if ended > next_tick:
                # Missed ticks are skipped, not bunched up: a burst of catch-up queries would
                # oversample exactly when the machine is busiest.
                self._overruns += 1
                next_tick = ended + period_ns - (ended - next_tick) % period_ns
            self._stop.wait((next_tick - time.monotonic_ns()) / 1e9)

    def _tick(self, tick: int) -> None:
        for gpu in self._gpus:
            self._read_utilization(gpu)
            if tick % PROCESS_EVERY == 0 and "nvmlDeviceGetProcessUtilization" not in gpu.unsupported:
                self._read_processes(gpu)
            if tick % SLOW_EVERY == 0:
                self._read_slow(gpu)

    def _call(self, function: str, *args: Any, empty_ok: bool = False) -> Any:
        """One NVML call, timed; errors are counted under the function's name and return None."""
        began = time.perf_counter_ns()
        try:
            return getattr(self._nvml, function)(*args)
        except Exception as err:
            code = getattr(err, "value", None)
            if empty_ok and code in (self._const("NVML_ERROR_NOT_FOUND"), self._const("NVML_SUCCESS")):
                # Not Found means nothing newer than lastSeenTimeStamp; pynvml raises code 0 when
                # the first call of nvmlDeviceGetProcessUtilization finds no process at all.
                raise _Empty from None
            if code == self._const("NVML_ERROR_NOT_SUPPORTED"):
                raise _Unsupported from None
            self._count_error(function)
            return None
        finally:
            cost = time.perf_counter_ns() - began
            entry = self._call_cost.setdefault(function, [0, 0, 0])
            entry[0] += 1
            entry[1] += cost
            entry[2] = max(entry[2], cost)

    def _query(self, gpu: _Gpu, function: str, *args: Any) -> tuple[Any, int]:
        """A point query stamped at the midpoint of the call (epoch ns); None when it failed."""
        if function in gpu.unsupported:
            return None, 0
        before = time.time_ns()
        try:
            result = self._call(function, gpu.handle, *args)
        except _Unsupported:
            gpu.unsupported.add(function)
            return None, 0
        after = time.time_ns()
        return result, (before + after) // 2

    def _read_utilization(self, gpu: _Gpu) -> None:
        now_mono = time.monotonic_ns()
        stale = []
        for metric, kind in (("gpu_util", "NVML_GPU_UTILIZATION_SAMPLES"),
                             ("mem_util", "NVML_MEMORY_UTILIZATION_SAMPLES")):
            ring = gpu.rings[metric]
            if f"nvmlDeviceGetSamples/{metric}" not in gpu.unsupported:
                self._read_ring(gpu, metric, self._const(kind))
            if ring.last_fresh_mono_ns is None or now_mono - ring.last_fresh_mono_ns > ring.stale_after_ns:
                stale.append(metric)
        if not stale:
            return
        rates, stamp = self._query(gpu, "nvmlDeviceGetUtilizationRates")
        if rates is None:
            return
        values = {"gpu_util": rates.gpu, "mem_util": rates.memory}
        for metric in stale:
            self._emit(stamp, gpu.index, metric, values[metric], "query")

    def _read_ring(self, gpu: _Gpu, metric: str, sampling_type: int) -> None:
        ring = gpu.rings[metric]
        try:
            answer = self._call("nvmlDeviceGetSamples", gpu.handle, sampling_type, ring.last_seen_us, empty_ok=True)
        except _Empty:
            return
        except _Unsupported:
            gpu.unsupported.add(f"nvmlDeviceGetSamples/{metric}")
            return
        if answer is None:
            return
        value_type, entries = answer
        if not entries:
            return
        newest = max(int(entry.timeStamp) for entry in entries)
        ring.last_seen_us = max(ring.last_seen_us, newest)
        domain = self._domain_for("samples", newest)
        if domain is None:
            self._unplaced += len(entries)
            return
        placed = False
        for entry in sorted(entries, key=lambda e: int(e.timeStamp)):
            stamp_us = int(entry.timeStamp)
            if ring.last_stamp_us is not None and stamp_us > ring.last_stamp_us:
                ring.add_delta(stamp_us - ring.last_stamp_us)
            ring.last_stamp_us = stamp_us
            placed |= self._emit(self._to_epoch(domain, stamp_us), gpu.index, metric,
                                 sample_value(value_type, entry.sampleValue), "samples")
        if placed:
            ring.last_fresh_mono_ns = time.monotonic_ns()

    def _read_processes(self, gpu: _Gpu) -> None:
        function = "nvmlDeviceGetProcessUtilization"
        try:
            entries = self._call(function, gpu.handle, gpu.process_last_seen_us, empty_ok=True)
        except _Empty:
            self._process_supported = True
            return
        except _Unsupported:
            gpu.unsupported.add(function)
            if self._process_supported is None:
                self._process_supported = False
            return
        if entries is None:
            return
        self._process_supported = True
        if not entries:
            return
        newest = max(int(entry.timeStamp) for entry in entries)
        gpu.process_last_seen_us = max(gpu.process_last_seen_us, newest)
        domain = self._domain_for("process", newest)
        # With no pid of interest known yet (no Ollama pid, no command started), keep every
        # process: the rows carry the pid, so attribution can still filter.
        interesting = self._pids
        for entry in entries:
            pid = int(entry.pid)
            if interesting and pid not in interesting:
                continue
            if domain is None:
                self._unplaced += 2
                continue
            when = self._to_epoch(domain, int(entry.timeStamp))
            self._emit(when, gpu.index, "proc_sm_util", entry.smUtil, "process", pid)
            self._emit(when, gpu.index, "proc_mem_util", entry.memUtil, "process", pid)

    def _read_slow(self, gpu: _Gpu) -> None:
        memory, stamp = self._query(gpu, "nvmlDeviceGetMemoryInfo")
        if memory is not None:
            self._emit(stamp, gpu.index, "mem_used_bytes", memory.used, "query")
        for metric, clock in (("sm_clock_mhz", "NVML_CLOCK_SM"), ("mem_clock_mhz", "NVML_CLOCK_MEM")):
            function = f"nvmlDeviceGetClockInfo/{metric}"
            if function in gpu.unsupported:
                continue
            before = time.time_ns()
            try:
                mhz = self._call("nvmlDeviceGetClockInfo", gpu.handle, self._const(clock))
            except _Unsupported:
                gpu.unsupported.add(function)
                continue
            if mhz is not None:
                self._emit((before + time.time_ns()) // 2, gpu.index, metric, mhz, "query")
        milliwatts, stamp = self._query(gpu, "nvmlDeviceGetPowerUsage")
        if milliwatts is not None:
            self._emit(stamp, gpu.index, "power_w", milliwatts / 1000.0, "query")

    # ------------------------------------------------------------------------------ clocks

    def _domain_for(self, api: str, newest_us: int) -> str | None:
        """The decided domain of an API, deciding it now if this batch is fresh enough to tell."""
        decided = self._clock_domain[api]
        if decided is not None and decided != "unknown":
            self._clock_evidence[api]["last"] = self._evidence(newest_us)
            return decided
        evidence = self._evidence(newest_us)
        domain = evidence["nearest_within_tolerance"]
        self._clock_evidence.setdefault(api, {})["first" if domain != "unknown" else "undecided"] = evidence
        # An undecided batch may be stale history from before the capture (a ring buffer keeps its
        # last entries while the GPU idles); a later, fresh batch decides. "unknown" stays recorded
        # until then, so a driver whose stamps match no clock says so in the meta.
        self._clock_domain[api] = domain
        return None if domain == "unknown" else domain

    @staticmethod
    def _evidence(newest_us: int) -> dict[str, Any]:
        epoch_ns = time.time_ns()
        boottime_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        monotonic_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        return {
            "stamp_us": newest_us, "epoch_ns": epoch_ns, "boottime_ns": boottime_ns, "monotonic_ns": monotonic_ns,
            "distance_ns": {"epoch": newest_us * 1000 - epoch_ns, "boottime": newest_us * 1000 - boottime_ns,
                            "monotonic": newest_us * 1000 - monotonic_ns},
            "tolerance_ns": CLOCK_DOMAIN_TOLERANCE_NS,
            "nearest_within_tolerance": detect_clock_domain(newest_us, epoch_ns, boottime_ns, monotonic_ns),
        }

    def _to_epoch(self, domain: str, stamp_us: int) -> int:
        stamp_ns = stamp_us * 1000
        if domain == "epoch" or self._session is None:
            return stamp_ns
        return self._session.clock.to_epoch(domain, stamp_ns)

    # ------------------------------------------------------------------------------ output

    def _emit(self, t_ns: int, gpu: int, metric: str, value: Any, source: str, pid: int | None = None) -> bool:
        number = float(value)
        if not math.isfinite(number) or (metric.endswith("_util") and not 0.0 <= number <= 100.0):
            self._rejected += 1  # drivers have been seen to return garbage utilization (e.g. 808334905)
            return False
        if t_ns < self._started_ns - BEFORE_START_SLACK_NS:
            self._before_start += 1
            return False
        row: dict[str, Any] = {"t_ns": int(t_ns), "gpu": gpu, "metric": metric, "value": number, "source": source}
        if pid is not None:
            row["pid"] = pid
        self._pending.append(row)
        self._rows_by_source[source] += 1
        return True

    def _flush(self) -> None:
        if not self._pending or self._out is None:
            return
        rows, self._pending = self._pending, []
        try:
            self._out.append(rows)
        except (OSError, ValueError):
            self._dropped += len(rows)
            self._count_error("write")

    def _written(self) -> int:
        return self._out.rows if self._out is not None else 0

    def _refresh_pids(self) -> None:
        if self._pids_source is not None:
            try:
                self._pids = set(self._pids_source())
            except Exception:
                self._count_error("pids")
            return
        with self._roots_lock:
            roots = set(self._roots)
        # Keep pids that have exited: their last samples may still arrive in a later batch.
        self._pids = self._pids | descendant_pids(roots)

    def _count_error(self, function: str) -> None:
        self.errors[function] = self.errors.get(function, 0) + 1

    def _alignment_error_ns(self) -> int:
        """How far a row's t_ns can be from when NVML took the reading, as far as this side can tell:
        half the longest point query (they are stamped at the call's midpoint), or the uncertainty of
        the clock offset used to convert ring and process stamps. The driver's own latency between
        measuring and stamping is not knowable from here and is not included."""
        queries = ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetClockInfo",
                   "nvmlDeviceGetPowerUsage")
        error = max((self._call_cost[f][2] // 2 for f in queries if f in self._call_cost), default=0)
        if self._session is not None:
            for domain in self._clock_domain.values():
                if domain in self._session.clock.start:
                    error = max(error, self._session.clock.start[domain].uncertainty_ns)
        return int(error)

    def _write_meta(self, reason: str = "") -> None:
        assert self._session is not None
        ticks = max(self._ticks, 1)
        meta = {
            "schema": META_SCHEMA,
            "available": not reason,
            "reason": reason,
            "driver_version": self._driver_version,
            "gpus": [{"index": g.index, "name": g.name, "uuid": g.uuid, "memory_total_bytes": g.memory_total_bytes,
                      "ring_period_ns": {m: r.period_ns() for m, r in g.rings.items()},
                      "unsupported": sorted(g.unsupported)} for g in self._gpus],
            "rate_hz": self.rate_hz,
            "period_ns": round(1e9 / self.rate_hz),
            "alignment_error_ns": self._alignment_error_ns(),
            "cadence_ticks": {"utilization": 1, "process": PROCESS_EVERY, "memory_clocks_power": SLOW_EVERY},
            "ring_stale_ns": RING_STALE_NS,
            "clock_domain": dict(self._clock_domain),
            "clock_evidence": self._clock_evidence,
            "process_utilization_supported": self._process_supported,
            "pids": sorted(self._pids),
            "errors": dict(self.errors),
            "samples": self._written(),
            "rows_by_source": dict(self._rows_by_source),
            "ticks": self._ticks,
            "tick_overruns": self._overruns,
            "tick_cost_ns": {"mean": self._tick_cost_total_ns // ticks, "max": self._tick_cost_max_ns},
            "call_cost_ns": {f: {"calls": c[0], "mean": c[1] // max(c[0], 1), "max": c[2]}
                             for f, c in sorted(self._call_cost.items())},
            "unplaced": self._unplaced,
            "skipped_before_start": self._before_start,
            "rejected_values": self._rejected,
            "dropped": self._dropped,
            "started_ns": self._started_ns,
            "stopped_ns": self._stopped_ns or None,
        }
        capture_files.write_json(self._session.directory / RAW_META, meta)


# ----------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class GpuSample:
    """One row of ``raw/gpu_samples.jsonl`` on the epoch clock."""

    time_ns: int
    gpu: int
    metric: str
    value: float
    source: str
    pid: int | None = None


def _parse_row(row: dict[str, Any]) -> GpuSample | None:
    t_ns, gpu, metric, value, source = (row.get(k) for k in ("t_ns", "gpu", "metric", "value", "source"))
    pid = row.get("pid")
    if type(t_ns) is not int or type(gpu) is not int or not isinstance(metric, str) or source not in SOURCES:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    if pid is not None and type(pid) is not int:
        return None
    return GpuSample(time_ns=t_ns, gpu=gpu, metric=metric, value=float(value), source=source, pid=pid)


def load_gpu_samples(directory: Path) -> tuple[list[GpuSample], dict[str, Any], int]:
    """(samples in time order, the collector's meta, number of unreadable rows); never raises on
    missing or damaged files, because a GPU-less capture is a normal capture."""
    meta = capture_files.read_json_object(directory / RAW_META) or {}
    rows, bad = capture_files.read_jsonl(directory / RAW_SAMPLES)
    samples = []
    for row in rows:
        sample = _parse_row(row)
        if sample is None:
            bad += 1
        else:
            samples.append(sample)
    samples.sort(key=lambda s: s.time_ns)
    return samples, meta, bad


@dataclass
class GpuRecords:
    """NVML samples of the capture (values below 2**64: no reading reaches it) and the collector's meta."""

    samples: list[GpuSample]
    meta: dict[str, Any]
    unreadable: dict[str, int] = field(default_factory=dict)


def load(directory: Path, clock: ClockModel | None) -> GpuRecords | None:
    """NVML's timestamps were converted to epoch ns when sampled: ``clock`` is not needed."""
    if not (directory / RAW_SAMPLES).exists():
        return None
    samples, meta, bad = load_gpu_samples(directory)
    # No NVML reading reaches 2**64 (bytes of memory at most); past it, a sum or a difference is infinite.
    usable = [sample for sample in samples if abs(sample.value) < 2**64]
    return GpuRecords(usable, meta, {RAW_SAMPLES: bad + len(samples) - len(usable)})


__all__ = ["RAW_META", "RAW_SAMPLES", "GpuRecords", "GpuSample", "NvmlCollector", "descendant_pids",
           "detect_clock_domain", "load", "load_gpu_samples", "sample_value"]
