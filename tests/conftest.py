"""Shared test setup: one hypothesis profile and a fixed torch seed for every test."""

import os

import pytest
import torch
from hypothesis import settings

# No deadline: the first example of a test pays for torch's lazy init and dispatcher warm-up.
# Derandomised under CI so a run there is reproducible; locally hypothesis explores freely.
settings.register_profile(
    "tokenreduce",
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.load_profile("tokenreduce")

SEED = 0


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(SEED)
    yield
