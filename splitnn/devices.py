"""The device cells run on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` in a config (``--device`` on the CLI).

Cells run on the CPU. Moving training, every attack's solver and the metrics onto CUDA is not done yet: a
config that asks for ``cuda`` is refused with that reason rather than silently run on the CPU, and ``auto``
resolves to ``cpu`` (with a note when a GPU is visible).
"""
from __future__ import annotations

import platform
import re
from functools import lru_cache

import torch

from leakbench.splitnn.errors import ParameterError

PATTERN = r"^(auto|cpu|cuda(:\d{1,2})?)$"
NOT_YET = "running cells on CUDA is not implemented yet (cells run on the CPU)"


def resolve(spec: str) -> tuple[str, str | None]:
    """``(device, note)`` for a device spec; ParameterError for one that cannot be used here."""
    if not isinstance(spec, str) or not re.match(PATTERN, spec):
        raise ParameterError("device", spec, "auto, cpu, cuda or cuda:N")
    if spec == "cpu":
        return "cpu", None
    if spec == "auto":
        return "cpu", (f"a CUDA device is visible, but {NOT_YET}" if torch.cuda.is_available() else None)
    if not torch.cuda.is_available():
        raise ParameterError("device", spec, "auto or cpu: no CUDA device is visible here "
                                             "(torch.cuda.is_available() is False)")
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ParameterError("device", spec, f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    raise ParameterError("device", spec, f"auto or cpu: {NOT_YET}")


@lru_cache(maxsize=None)
def describe(device: str) -> str:
    """The device's name for provenance, e.g. ``cpu (AMD EPYC 7B13)``."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    model = None
    try:
        with open("/proc/cpuinfo") as file:
            model = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), None)
    except OSError:
        pass
    return f"cpu ({model or platform.processor() or platform.machine()})"
