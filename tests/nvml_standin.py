"""A stand-in for the ``pynvml`` module that replays recorded NVML answers from a JSON fixture.

The collector takes its NVML module as an argument, so the tests hand it this instead of the real
driver. Return values are pynvml's own ctypes structures (``c_nvmlSample_t``,
``c_nvmlProcessUtilizationSample_t``, ``c_nvmlUtilization_t``, ``c_nvmlMemory_t``), built without the
driver, so a misspelt field name fails here exactly as it would on a GPU machine.

Fixture format (``tests/fixtures/nvml/*.json``):

* Top level: ``clock_domain`` per API (``{"samples": "boottime", "process": "epoch"}``), then
  answer queues for the library-wide functions (``nvmlInit``, ``nvmlSystemGetDriverVersion``,
  ``nvmlDeviceGetCount``) and ``devices``: one object of answer queues per GPU.
* An answer queue is a list replayed in order and then from the start again, so a test's run
  length does not matter. ``{"error": "NVML_ERROR_NOT_FOUND"}`` (or the number) raises
  ``NVMLError`` with that code; ``{"raise": "RuntimeError"}`` raises a non-NVML exception (a
  binding bug); ``{"malformed": 42}`` returns 42 as is.
* Functions with a selector argument key their queue by it:
  ``nvmlDeviceGetSamples/NVML_GPU_UTILIZATION_SAMPLES``, ``nvmlDeviceGetClockInfo/NVML_CLOCK_SM``.
* Sample timestamps are ``{"age_us": N}``: N µs before the call, on the API's clock. Recorded
  absolute stamps would lie outside every test's run window, so the replay re-bases them; an
  integer is used verbatim (to simulate a driver whose stamps match no clock). As the driver
  does, entries not newer than ``lastSeenTimeStamp`` are left out, and an empty answer is
  ``NVML_ERROR_NOT_FOUND``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pynvml  # the structures only; nothing here loads the driver

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"

_ERROR_STRINGS = {
    0: "Success", 1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported", 4: "Insufficient Permissions",
    6: "Not Found", 7: "Insufficient Size", 9: "Driver Not Loaded", 12: "NVML Shared Library Not Found",
    15: "GPU is lost", 999: "Unknown Error",
}
_CLOCKS = {"epoch": time.CLOCK_REALTIME, "boottime": time.CLOCK_BOOTTIME, "monotonic": time.CLOCK_MONOTONIC}


class NVMLError(Exception):
    """Shaped like pynvml's: the code is in ``.value`` and ``str()`` is NVML's message."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_NotFound(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


_SUBCLASSES: dict[int, type[NVMLError]] = {12: NVMLError_LibraryNotFound, 6: NVMLError_NotFound,
                                           3: NVMLError_NotSupported}


class _Handle:
    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<stand-in nvmlDevice_t {self.index}>"


class NvmlStandIn:
    """The subset of ``pynvml`` the collector uses, answering from a fixture; ``calls`` counts each call."""

    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_UNKNOWN = 999
    NVML_GPU_UTILIZATION_SAMPLES = 1
    NVML_MEMORY_UTILIZATION_SAMPLES = 2
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_NotSupported = NVMLError_NotSupported

    def __init__(self, fixture: dict[str, Any]) -> None:
        self.fixture = fixture
        self.calls: Counter[str] = Counter()
        self._positions: Counter[tuple[int, str]] = Counter()
        self._initialised = False

    @classmethod
    def load(cls, name: str, **overrides: Any) -> NvmlStandIn:
        """The fixture ``tests/fixtures/nvml/NAME.json``, with top-level keys replaced by ``overrides``."""
        fixture = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
        fixture.update(overrides)
        return cls(fixture)

    # ------------------------------------------------------------------------------ replay

    def _answer(self, key: str, device: int = -1) -> Any:
        self.calls[key.split("/")[0]] += 1
        queues = self.fixture if device < 0 else self.fixture["devices"][device]
        queue = queues.get(key)
        if queue is None:
            raise KeyError(f"the fixture has no answers for {key} (device {device})")
        position = self._positions[(device, key)]
        self._positions[(device, key)] += 1
        answer = queue[position % len(queue)]
        if isinstance(answer, dict):
            if "error" in answer:
                code = answer["error"]
                code = getattr(self, code) if isinstance(code, str) else int(code)
                raise _SUBCLASSES.get(code, NVMLError)(code)
            if "raise" in answer:
                raise {"RuntimeError": RuntimeError, "OSError": OSError}[answer["raise"]]("stand-in failure")
            if "malformed" in answer:
                return answer["malformed"]
        return answer

    def _require_init(self) -> None:
        if not self._initialised:
            raise NVMLError(1)  # Uninitialized, as the real library answers

    def _stamp(self, api: str, stamp: Any) -> int:
        if isinstance(stamp, int):
            return stamp
        domain = self.fixture.get("clock_domain", {}).get(api, "epoch")
        now_us = time.clock_gettime_ns(_CLOCKS[domain]) // 1000
        return int(now_us - int(stamp["age_us"]))

    # ------------------------------------------------------------------------------ library

    def nvmlInit(self) -> None:
        if "nvmlInit" in self.fixture:
            self._answer("nvmlInit")
        else:
            self.calls["nvmlInit"] += 1
        self._initialised = True

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        self._require_init()
        self._initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._require_init()
        return str(self._answer("nvmlSystemGetDriverVersion"))

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return int(self._answer("nvmlDeviceGetCount"))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._require_init()
        self.calls["nvmlDeviceGetHandleByIndex"] += 1
        if not 0 <= index < len(self.fixture.get("devices", [])):
            raise NVMLError(2)
        return _Handle(index)

    # ------------------------------------------------------------------------------ device

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return str(self._answer("nvmlDeviceGetName", handle.index))

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return str(self._answer("nvmlDeviceGetUUID", handle.index))

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> Any:
        answer = self._answer("nvmlDeviceGetMemoryInfo", handle.index)
        memory = pynvml.c_nvmlMemory_t()
        memory.total, memory.free, memory.used = answer["total"], answer["free"], answer["used"]
        return memory

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> Any:
        answer = self._answer("nvmlDeviceGetUtilizationRates", handle.index)
        rates = pynvml.c_nvmlUtilization_t()
        rates.gpu, rates.memory = answer["gpu"], answer["memory"]
        return rates

    def nvmlDeviceGetClockInfo(self, handle: _Handle, clock_type: int) -> int:
        name = {self.NVML_CLOCK_SM: "NVML_CLOCK_SM", self.NVML_CLOCK_MEM: "NVML_CLOCK_MEM"}[clock_type]
        return int(self._answer(f"nvmlDeviceGetClockInfo/{name}", handle.index))

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return int(self._answer("nvmlDeviceGetPowerUsage", handle.index))

    def nvmlDeviceGetSamples(self, handle: _Handle, sampling_type: int, last_seen_us: int) -> Any:
        name = {self.NVML_GPU_UTILIZATION_SAMPLES: "NVML_GPU_UTILIZATION_SAMPLES",
                self.NVML_MEMORY_UTILIZATION_SAMPLES: "NVML_MEMORY_UTILIZATION_SAMPLES"}[sampling_type]
        answer = self._answer(f"nvmlDeviceGetSamples/{name}", handle.index)
        if not isinstance(answer, dict):
            return answer  # malformed on purpose
        samples = []
        for entry in answer["samples"]:
            sample = pynvml.c_nvmlSample_t()
            sample.timeStamp = self._stamp("samples", entry["timeStamp"])
            for union_field, value in entry["sampleValue"].items():
                setattr(sample.sampleValue, union_field, value)
            if sample.timeStamp > last_seen_us:
                samples.append(sample)
        if not samples:
            raise NVMLError_NotFound(self.NVML_ERROR_NOT_FOUND)
        return (int(answer["sampleValueType"]), samples)

    def nvmlDeviceGetProcessUtilization(self, handle: _Handle, last_seen_us: int) -> Any:
        answer = self._answer("nvmlDeviceGetProcessUtilization", handle.index)
        samples = []
        for entry in answer:
            sample = pynvml.c_nvmlProcessUtilizationSample_t()
            sample.timeStamp = self._stamp("process", entry["timeStamp"])
            for name in ("pid", "smUtil", "memUtil", "encUtil", "decUtil"):
                setattr(sample, name, entry[name])
            if sample.timeStamp > last_seen_us:
                samples.append(sample)
        if not samples:
            raise NVMLError_NotFound(self.NVML_ERROR_NOT_FOUND)
        return samples
