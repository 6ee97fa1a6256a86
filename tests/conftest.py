import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Trained models go to a per-session temporary cache, never the user's."""
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
