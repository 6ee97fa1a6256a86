"""Fixtures every folder uses; what they are built from is tests/harness.py."""
import pytest
import torch

import harness
from leakbench.splitnn.training import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Trained models go to a per-session temporary cache, never the user's. Session-scoped and autouse, so it is
    set before any other session or module fixture trains (a function-scoped one would come after those)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_split() -> harness.SmallSplit:
    """ResNet-20 trained 4 epochs on 16x16 digits, split after layer1 (client and server in eval mode): trained once
    per session (a few seconds on a CPU) and shared by the attack tests."""
    data = harness.digits16()
    trained, client, server = harness.trained_split(data)
    return harness.SmallSplit(data, trained, client, server)


@pytest.fixture
def tiny_config(tmp_path):
    """harness.TINY_CONFIG written to ``tmp_path/config.yaml``."""
    return harness.write_config(tmp_path)
