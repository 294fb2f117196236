import pytest
import torch

# Test tensors are tiny: one thread avoids oversubscribing the CPU (Ray workers and servers run beside the tests).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
