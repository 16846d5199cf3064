"""Shared by every test file: the project root on the import path, random weights, and the
digits' feature network (trained once per session)."""
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(net, info, cache path): quality.py's feature net at its default recipe, trained into a
    tmp cache."""
    import quality
    cache = tmp_path_factory.mktemp("quality") / "features.pt"
    net, info = quality.load_feature_net(cache)
    return net, info, cache
