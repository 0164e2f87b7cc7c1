"""Shared test configuration: paths to the real paper CSVs and GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Without a GPU, Triton kernels run under its interpreter. triton.jit (its standard library
# included) reads TRITON_INTERPRET when triton is first imported, so it is set here, before any
# test module can import triton; a later switch cannot undo already-compiled helpers.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI lays a copy there too); never copied into the repo.
PAPER_DATA = REPO.parent / "shared" / "datasets" / "paper"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run bench/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def paper_data() -> Path:
    if not (PAPER_DATA / "world_place.csv").exists():
        pytest.fail(f"the paper's CSVs are expected in {PAPER_DATA} (../shared/datasets/paper)")
    return PAPER_DATA
