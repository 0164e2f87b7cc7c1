"""Shared test configuration: paths to the real paper CSVs and GPU skipping."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (CI lays a copy there too); never copied into the repo.
PAPER_DATA = REPO.parent / "shared" / "datasets" / "paper"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
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
