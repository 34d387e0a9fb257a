"""GPU protection through NVML: readings, and a guard that waits while a GPU is too hot or full.

The reader is injected (`GpuGuard(reader=…)`), so the throttling logic is tested with
a scripted fake and the real NVML reader once, against a real GPU where there is one.
Without NVML (no driver, no GPU) there is no reader: readings are null, nothing blocks.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import structlog

from spoold.config import GpuConfig

log = structlog.get_logger("spoold.gpu")


@dataclass(frozen=True)
class GpuReading:
    index: int
    memory_percent: float
    temperature_c: float
    utilization_percent: float | None = None
    power_w: float | None = None
    name: str | None = None


def _text(value: Any) -> str:
    """NVML strings are bytes in older bindings, str in newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuReader(Protocol):
    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


def visible_devices(spec: str | None, uuids: list[str]) -> list[int]:
    """The NVML indices of the GPUs `CUDA_VISIBLE_DEVICES=spec` leaves to this process
    (`uuids`: every GPU's UUID, by NVML index), read the way CUDA reads it: unset means
    all; entries are indices or (prefixes of) UUIDs; the list stops at the first entry
    that names no GPU. NVML itself ignores the variable: without this, a daemon given
    one GPU (spoold@.service) would throttle on, and report, its neighbours'."""
    if spec is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if entry.isdigit():
            index = int(entry)
            if index >= len(uuids):
                break
        else:
            matches = [i for i, u in enumerate(uuids) if entry and u.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        if index in chosen:
            break
        chosen.append(index)
    return chosen


class NvmlReader:
    """Readings of the GPUs this process may use (CUDA_VISIBLE_DEVICES), from NVIDIA's
    management library; each reading's `index` is the GPU's NVML (nvidia-smi) index."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        every = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in every]
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._indices = visible_devices(spec, uuids)
        if not self._indices and every and spec and spec.strip() not in ("", "-1"):
            # MIG-… instances, or a name NVML does not know: guarding every GPU is
            # better than silently guarding none.
            log.warning(
                "CUDA_VISIBLE_DEVICES names no GPU NVML knows (MIG?): watching every GPU",
                cuda_visible_devices=spec,
            )
            self._indices = list(range(len(every)))
        self._handles = [every[i] for i in self._indices]

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        readings = []
        for index, handle in zip(self._indices, self._handles, strict=True):
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            temp = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            util = power = None
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            except nvml.NVMLError:
                pass  # not every board reports these; memory and temperature are what we guard
            name = nvml.nvmlDeviceGetName(handle)
            readings.append(
                GpuReading(
                    index=index,
                    memory_percent=round(100.0 * mem.used / mem.total, 1) if mem.total else 0.0,
                    temperature_c=float(temp),
                    utilization_percent=util,
                    power_w=power,
                    name=_text(name),
                )
            )
        return readings

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def open_nvml() -> GpuReader | None:
    """The NVML reader, or None where there is no NVML or no GPU (nothing will block)."""
    try:
        reader = NvmlReader()
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, driver not loaded…
        log.info("no NVML: GPU readings off, GPU protection inactive", reason=str(e))
        return None
    if not reader._handles:
        reader.close()
        return None
    return reader


class GpuGuard:
    """Decides, with hysteresis, whether work may go on.

    Throttle when any GPU is over `max_memory_percent` or `max_temperature_c`; once
    throttled, resume only when every GPU is under `resume_temperature_c` and the
    memory limit, so a GPU hovering at the limit does not flap.
    """

    def __init__(self, cfg: GpuConfig, reader: GpuReader | None) -> None:
        self.cfg = cfg
        self.reader = reader
        self.throttled = False
        self.reason: str | None = None
        self.last: list[GpuReading] = []

    def sample(self) -> list[dict[str, Any]] | None:
        """Fresh readings for the heartbeat, each GPU with `healthy`; None without NVML."""
        if self.reader is None:
            return None
        try:
            readings = self.reader.read()
        except Exception:
            readings = self.last
        return [
            {**asdict(r), "healthy": self._problem([r], cooling=False) is None} for r in readings
        ]

    def _problem(self, readings: list[GpuReading], cooling: bool) -> str | None:
        """Why work must wait, or None. `cooling`: already throttled, so the resume bar."""
        for r in readings:
            if r.memory_percent > self.cfg.max_memory_percent:
                return (
                    f"GPU {r.index} memory {r.memory_percent:.1f}% > "
                    f"gpu.max_memory_percent {self.cfg.max_memory_percent:g}"
                )
            if r.temperature_c > self.cfg.max_temperature_c:
                return (
                    f"GPU {r.index} at {r.temperature_c:g}°C > "
                    f"gpu.max_temperature_c {self.cfg.max_temperature_c:g}"
                )
            if cooling and r.temperature_c > self.cfg.resume_temperature_c:
                return (
                    f"GPU {r.index} cooling: {r.temperature_c:g}°C > "
                    f"gpu.resume_temperature_c {self.cfg.resume_temperature_c:g}"
                )
        return None

    def check(self) -> bool:
        """Read the GPUs; True when work may go on."""
        if self.reader is None:
            return True
        try:
            self.last = self.reader.read()
        except Exception as e:  # a flaky read must not stop the queue
            log.warning("GPU reading failed", error=str(e))
            return not self.throttled
        problem = self._problem(self.last, cooling=self.throttled)
        if problem and not self.throttled:
            log.warning("GPU protection: throttling", reason=problem)
        elif not problem and self.throttled:
            log.info("GPU protection: resuming", after=self.reason)
        self.throttled = problem is not None
        self.reason = problem
        return not self.throttled
