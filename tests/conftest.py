import pytest
import torch

import fwagen


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (runs on the GPU machine; skipped elsewhere)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine: GPU tests run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_warning_state():
    """The op warns once per reason per process: let every test see its own fallback warnings."""
    saved = set(fwagen.op._warned)
    fwagen.op._warned.clear()
    yield
    fwagen.op._warned.clear()
    fwagen.op._warned.update(saved)
