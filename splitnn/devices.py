"""The device cells run on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` in a config (``--device`` on the CLI).

``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` and ``cuda:N`` are accepted when that
device is present and refused (a ParameterError naming the key) when it is not, rather than silently run on the CPU.

Where things live. The runner moves the target model after training or loading, the attacked images, the
auxiliary data and the evaluation classifier to the device; every module that indexes the training set (the
training loop, a fitted defense) moves each batch to the device of the module it feeds (``of``); the attacks make
their tensors on their inputs' device. Random starts that must not depend on the device are drawn on the CPU. What
is stored (rows, reconstructions) comes back to the CPU first, and checkpoints are written from CPU copies and read
with ``map_location="cpu"``, so a cache written on one device loads on another. The device never enters a cell's
key: the run's provenance names it (``describe``).

Determinism. On CUDA, ``use`` turns on ``torch.use_deterministic_algorithms(True, warn_only=True)`` and sets
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set) before any CUDA work, so a seed gives the same rows on the
same device (an operation without a deterministic CUDA kernel warns rather than fails). Rows on the GPU agree with
the CPU's to float tolerance, not bit for bit: the kernels differ, and a defense's noise is drawn from a generator on
the features' device, whose stream differs from the CPU's. Nothing changes on the CPU.
"""
from __future__ import annotations

import os
import platform
import re
from functools import lru_cache

import torch
from torch import nn

from leakbench.splitnn.errors import ParameterError

PATTERN = r"^(auto|cpu|cuda(:\d{1,2})?)$"
#: cuBLAS's workspace setting for reproducible matrix products (CUDA's "Reproducibility" notes).
CUBLAS_WORKSPACE = ":4096:8"


def resolve(spec: str) -> tuple[str, str | None]:
    """``(device, note)`` for a device spec; ParameterError for one that cannot be used here."""
    if not isinstance(spec, str) or not re.match(PATTERN, spec):
        raise ParameterError("device", spec, "auto, cpu, cuda or cuda:N")
    if spec == "cpu":
        return "cpu", None
    if spec == "auto":
        return ("cuda", None) if torch.cuda.is_available() else ("cpu", None)
    if not torch.cuda.is_available():
        raise ParameterError("device", spec, "auto or cpu: no CUDA device is visible here "
                                             "(torch.cuda.is_available() is False)")
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ParameterError("device", spec, f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return spec, None


def use(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, made ready for deterministic work: on CUDA, ``CUBLAS_WORKSPACE_CONFIG`` (if
    unset) and deterministic algorithms (warn only); nothing on the CPU. Cheap to call again."""
    device = torch.device(device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        if not torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer): where its inputs must go; the CPU for a module
    that holds no tensors."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


@lru_cache(maxsize=None)
def describe(device: str) -> str:
    """The device's name for provenance, e.g. ``cpu (AMD EPYC 7B13)``, ``cuda (NVIDIA H200)``."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    model = None
    try:
        with open("/proc/cpuinfo") as file:
            model = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), None)
    except OSError:
        pass
    return f"cpu ({model or platform.processor() or platform.machine()})"
