"""Fixtures of the probes tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def one_torch_thread():
    """One torch thread: the test machine's cores are shared, and spinning OpenMP threads on
    small tensors made the batched solvers' tests 10x slower there."""
    import torch  # deferred: heavy optional dependency
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
