"""Shared by every test file: the project root on the import path, and random weights."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def perturb():
    """perturb(module, scale=0.05, seed=1): random weights everywhere (zero-initialised adaLN and
    biases too), so every input of a freshly built model matters."""
    def perturb_(module, scale=0.05, seed=1):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        return module
    return perturb_
