"""What produced a result: package versions, git commit, platform, device."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("leakbench", "torch", "torchvision", "numpy", "scipy", "opacus", "captum", "torchmetrics",
            "scikit-learn", "scikit-image", "pandas")


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the leakbench checkout (with ``+dirty`` when it has uncommitted changes), if any."""
    where = path or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect(device: str = "cpu") -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "git_commit": git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "torch_threads": torch.get_num_threads()}
